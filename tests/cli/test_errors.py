"""What `fastalign` prints and exits with: one `fastalign: error:` line for every mistake (status 2 for
bad input or configuration, 1 for a failure at run time), a traceback only with --debug; the JSON
result on the main process only; third-party deprecation warnings hidden; plots at the end."""

import json
import warnings

import pytest

from fastalign.algorithms import SFTTrainer
from fastalign.engine import distributed
from fastalign.errors import DataError
from fastalign.tasks.sort_digits import make_rows


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "fastalign: error:" in line]


def sft_argv(tmp_path, rows=None, *extra) -> list[str]:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (rows or make_rows(16, seed=0))))
    return ["train", "sft", "--model_name_or_path", "fastalign/tiny-llama", "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--disable_tqdm", "true", *extra]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: a usage error must be found before anything loads."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("fastalign.algorithms.launch.load_policy", load)


@pytest.mark.parametrize("extra, named", [
    (["--max_steps", "abc"], "max_steps must be an integer >= -1, got 'abc'"),
    (["--max_steps", "2.5"], "max_steps must be an integer >= -1, got 2.5"),
    (["--seed", "abc"], "seed must be an integer >= 0 and <= 4294967295, got 'abc'"),
    (["--bf16", "maybe"], "bf16 must be true or false, got 'maybe'"),
    (["--save_steps", "-1"], "save_steps must be an integer >= 1 or null, got -1"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be a number >= 0 or null, got -1"),
    (["--weight_decay", "-0.01"], "weight_decay must be a number >= 0, got -0.01"),
    (["--dtype", "float33"], "dtype must be one of 'float32', 'bfloat16', 'float16', 'auto', got 'float33'"),
    (["--trust_remote_code", "nope"], "trust_remote_code must be true or false, got 'nope'"),
    (["--lora_r", "8.5"], "lora_r must be an integer, got 8.5"),
    (["--lora_r", "0"], "lora_r must be an integer >= 1, got 0"),  # peft's own ValueError, after loading
    (["--lora_dropout", "2"], "lora_dropout must be a number >= 0 and < 1, got 2.0"),  # accepted

    (["--learnin_rate", "1e-3"], "'learnin_rate' (did you mean 'learning_rate'?)"),
    (["stray"], "expected --key value, got 'stray'"),
    (["--config", "nope.yaml"], "nope.yaml"),
])
def test_a_usage_error_is_one_line_and_status_2_before_anything_loads(tmp_path, fastalign, no_loading, extra, named):
    status, out, err = fastalign(sft_argv(tmp_path, None, *extra))
    assert status == 2 and out == ""
    assert error_lines(err) == [err.strip()] and named in err and "Traceback" not in err


def test_a_data_error_names_the_file_and_row(tmp_path, fastalign):
    rows = [{"prompt": "21=", "completion": "12"}, {"prompt": None, "completion": "1"}]
    status, _, err = fastalign(sft_argv(tmp_path, rows))
    assert status == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith("fastalign: error: ") and "rows.jsonl" in line and "row 1" in line and "prompt" in line


def test_a_missing_data_file_is_status_2(tmp_path, fastalign):
    argv = sft_argv(tmp_path) + ["--dataset_name", str(tmp_path / "nothere.jsonl")]
    status, _, err = fastalign(argv)
    assert status == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "nothere.jsonl" in line


def _fail(error):
    def launch(config, run):
        raise error
    return launch


def test_a_failure_at_run_time_is_status_1_with_its_type(tmp_path, fastalign, monkeypatch):
    monkeypatch.setattr(SFTTrainer, "launch", _fail(RuntimeError("out of memory\nwhile packing")))
    status, _, err = fastalign(sft_argv(tmp_path))
    assert status == 1 and err.strip() == "fastalign: error: RuntimeError: out of memory while packing"


@pytest.mark.parametrize("how", ["flag first", "flag last", "environment"])
def test_debug_shows_the_traceback(tmp_path, fastalign, monkeypatch, how):
    monkeypatch.setattr(SFTTrainer, "launch", _fail(DataError("rows.jsonl: row 3, column 'prompt': expected text")))
    argv = sft_argv(tmp_path)
    if how == "environment":
        monkeypatch.setenv("FASTALIGN_DEBUG", "1")
    argv = ["--debug", *argv] if how == "flag first" else [*argv, "--debug"] if how == "flag last" else argv
    status, _, err = fastalign(argv)
    assert status == 2 and "Traceback" in err and "raise error" in err
    assert error_lines(err)[-1] == "fastalign: error: rows.jsonl: row 3, column 'prompt': expected text"


@pytest.mark.parametrize("main_process", [True, False])
def test_the_result_is_printed_by_the_main_process_only(tmp_path, fastalign, monkeypatch, main_process):
    monkeypatch.setattr(SFTTrainer, "launch", lambda config, run: {"steps": 1, "train_loss": 2.5})
    monkeypatch.setattr(distributed, "is_main", lambda: main_process)
    status, out, _ = fastalign(sft_argv(tmp_path))
    assert status == 0
    assert (json.loads(out) if main_process else out) == ({"steps": 1, "train_loss": 2.5} if main_process else "")


def _warns(config, run):
    for module in ("transformers.trainer", "torch.distributed.c10d_logger", "deepspeed.runtime.engine"):
        warnings.warn_explicit(f"{module} is deprecated", FutureWarning, f"{module}.py", 1, module=module)
    warnings.warn_explicit("a fastalign warning", UserWarning, "fastalign/x.py", 1, module="fastalign.x")
    return {"steps": 1}


@pytest.mark.parametrize("debug", [False, True])
def test_third_party_deprecation_warnings_show_only_with_debug(tmp_path, fastalign, monkeypatch, debug):
    monkeypatch.setattr(SFTTrainer, "launch", _warns)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        status, _, _ = fastalign(sft_argv(tmp_path) + (["--debug"] if debug else []))
    assert status == 0
    deprecated = [w for w in shown if w.category is FutureWarning]
    assert len(deprecated) == (3 if debug else 0)
    assert [str(w.message) for w in shown if w.category is UserWarning] == ["a fastalign warning"]


def test_train_writes_the_plots_and_says_where(tmp_path, fastalign):
    pytest.importorskip("matplotlib")
    status, out, err = fastalign(sft_argv(tmp_path))
    plots = tmp_path / "run" / "plots"
    assert status == 0 and json.loads(out)["steps"] == 1
    assert (plots / "loss.png").read_bytes()[:4] == b"\x89PNG" and str(plots) in err


def test_train_without_matplotlib_says_so_and_succeeds(tmp_path, fastalign, monkeypatch):
    def launch(config, run):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        return {"steps": 1}
    monkeypatch.setattr(SFTTrainer, "launch", launch)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    status, out, err = fastalign(sft_argv(tmp_path))
    assert status == 0 and json.loads(out) == {"steps": 1} and not (tmp_path / "run" / "plots").exists()
    [line] = [line for line in err.splitlines() if "matplotlib" in line]
    assert line.startswith("fastalign: ") and "plot" in line


@pytest.mark.parametrize("argv, named", [
    (["train"], "fastalign train needs the algorithm first"),
    (["train", "--max_steps", "2"], "fastalign train needs the algorithm first"),
    (["train", "sftt", "--config", "x.yaml"], "unknown algorithm 'sftt' (did you mean 'sft'?)"),
    (["trian", "sft"], "invalid choice: 'trian'"),
    (["train", "sft", "--config"], "fastalign train sft: argument --config: expected one argument"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_command_line_mistake_is_one_line_too(fastalign, no_loading, argv, named):
    status, out, err = fastalign(argv)
    assert status == 2 and out == "" and "usage:" not in err
    assert error_lines(err) == [err.strip()] and named in err


@pytest.mark.parametrize("output_dir, named", [("", "output_dir must name a folder, got ''"),
                                               ("notes.txt", "output_dir {tmp}/notes.txt is a file, not a folder")])
def test_an_output_dir_that_is_no_folder_is_refused_before_anything_loads(tmp_path, fastalign, no_loading,
                                                                          output_dir, named):
    # '' trained into the working directory; a file failed after loading with FileExistsError (status 1).
    (tmp_path / "notes.txt").write_text("mine")
    target = output_dir and str(tmp_path / output_dir)
    status, _, err = fastalign(sft_argv(tmp_path) + ["--output_dir", target])
    assert status == 2 and error_lines(err) == [f"fastalign: error: {named.format(tmp=tmp_path)}"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_eval_steps_without_a_split_to_evaluate_is_refused(tmp_path, fastalign, no_loading):
    # It was ignored: the run evaluated nothing.
    status, _, err = fastalign(sft_argv(tmp_path, None, "--eval_steps", "2"))
    assert status == 2 and error_lines(err) == [
        "fastalign: error: eval_steps=2 evaluates the dataset_test_split, and there is none: name the split to "
        "evaluate, or leave eval_steps out"]


@pytest.mark.parametrize("error, status, said", [
    (KeyboardInterrupt(), 130, "fastalign: interrupted"),  # Ctrl-C while loading: nothing to save
    ("interrupted", 143, "fastalign: interrupted at step 3 of 10: saved run/checkpoint-3; resume with "
                         "resume_from_checkpoint=true"),
])
def test_an_interrupted_run_is_one_line_and_128_plus_the_signal(tmp_path, fastalign, monkeypatch, error, status, said):
    import signal
    from pathlib import Path

    from fastalign.errors import Interrupted

    if error == "interrupted":
        error = Interrupted(signal.SIGTERM, 3, 10, Path("run/checkpoint-3"))
    monkeypatch.setattr(SFTTrainer, "launch", _fail(error))
    got, _, err = fastalign(sft_argv(tmp_path))
    assert got == status and err.strip() == said
