"""The ``fastalign`` command.

    fastalign train ALGO --config FILE [--key value ...]   train from a YAML config
    fastalign demo [--output-dir DIR]                      the embedded end-to-end demo (CPU, ~80 s)
    fastalign plot RUN_DIR                                 PNG curves of a run's metrics

A config is a flat YAML mapping of the algorithm config's field names (``SFTConfig`` for sft,
...) plus the run's own keys (``RUN_KEYS``: which model and data). ``--key value`` overrides a
key; values are read as YAML (``--bf16 true``, ``--report_to [tensorboard]``). An unknown key is
an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path

import yaml

# What to train on, besides the algorithm's own options.
RUN_KEYS = {
    "model_name_or_path": "a hub name, a local path, or a built-in (fastalign/tiny-llama, fastalign/tiny-qwen2)",
    "tokenizer_name_or_path": "defaults to the model's",
    "ref_model_name_or_path": "dpo: a separate reference model (default: a frozen copy, or the model with its "
                              "adapters disabled under use_peft)",
    "dtype": "float32, bfloat16, float16 or auto (the checkpoint's)",
    "trust_remote_code": "run code shipped with the model (off by default)",
    "reward_model_name_or_path": "ppo: a reward model (a RewardTrainer's output dir, or a hub name) scoring "
                                 "query+response; it must share the policy's tokenizer",
    "reward_function": "ppo: instead of a reward model, 'sort_digits' (the built-in task's sortedness) or "
                       "'package.module:function' taking (queries, responses) texts, returning one float each; "
                       "ddpo: 'jpeg_compressibility', 'jpeg_incompressibility' or 'package.module:function' "
                       "taking (images, prompts, metadata), returning (rewards, metadata)",
    "pipeline_name_or_path": "ddpo: a Stable Diffusion pipeline (hub name or local path), or fastalign/tiny-sd "
                             "(built in, random weights)",
    "prompt_function": "ddpo: 'animals' (simple animal names) or 'package.module:function' returning "
                       "(prompt, metadata)",
    "generation_kwargs": "ppo: a mapping of sampling options (max_new_tokens, top_k, top_p, temperature, ...)",
    "num_shared_layers": "ppo: bottom layers the frozen reference shares with the policy (frozen in both)",
    "dataset_name": "a hub name, a data file (.json/.jsonl/.parquet/.csv, .gz ok) or a folder",
    "dataset_config": "the dataset's configuration name, if any",
    "dataset_train_split": "default train",
    "dataset_test_split": "evaluated at eval_steps and at the end when given",
    "use_peft": "train LoRA adapters instead of the whole model",
    "lora_r": "LoRA rank (default 16)",
    "lora_alpha": "LoRA alpha (default 32)",
    "lora_dropout": "LoRA dropout (default 0.05)",
    "lora_target_modules": "module names to adapt (default: the model type's usual ones)",
}


def algorithms() -> dict:
    """Algorithm name -> (Config class, Trainer class)."""
    from fastalign.algorithms import (
        DDPOConfig,
        DDPOTrainer,
        DPOConfig,
        DPOTrainer,
        PPOConfig,
        PPOTrainer,
        RewardConfig,
        RewardTrainer,
        SFTConfig,
        SFTTrainer,
    )

    return {"sft": (SFTConfig, SFTTrainer), "reward": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer),
            "ppo": (PPOConfig, PPOTrainer), "ddpo": (DDPOConfig, DDPOTrainer)}


# Run keys whose values are names and paths, kept as written.
_TEXT_RUN_KEYS = {"model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path", "dtype", "dataset_name", "dataset_config",
                  "dataset_train_split", "dataset_test_split", "reward_model_name_or_path", "reward_function",
                  "pipeline_name_or_path", "prompt_function"}


def parse_overrides(items: list[str]) -> dict:
    """``["--lr", "1e-4", "--bf16", "--name=x"]`` -> ``{"lr": "1e-4", "bf16": "true", "name": "x"}``
    (values stay text until ``build_config`` reads them for their field)."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise SystemExit(f"fastalign: expected --key value, got {item!r}")
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            value, i = items[i + 1], i + 1
        else:
            value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _coerce(annotation: str, value, key: str):
    """A value for a field annotated ``annotation``: text fields keep text, others read it as YAML.
    Floats written like ``1e-5`` (text to YAML 1.1) become floats."""
    if isinstance(value, str) and annotation.replace(" ", "") not in ("str", "str|None"):
        value = yaml.safe_load(value) if value else value
    if isinstance(value, str) and "float" in annotation:
        try:
            value = float(value)
        except ValueError:
            raise SystemExit(f"fastalign: {key} expects a number, got {value!r}") from None
    return value


def build_config(config_class, values: dict):
    """``(config, run)``: the algorithm config and the run keys; unknown keys are an error."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields) - set(RUN_KEYS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(set(fields) | set(RUN_KEYS)), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SystemExit(f"fastalign: unknown config key(s) for {config_class.__name__}: {', '.join(hints)}")
    options = {k: _coerce(fields[k], v, k) for k, v in values.items() if k in fields}
    run = {k: _coerce("str" if k in _TEXT_RUN_KEYS else "any", v, k) for k, v in values.items() if k in RUN_KEYS}
    try:
        return config_class(**options), run
    except (TypeError, ValueError) as err:
        raise SystemExit(f"fastalign: {config_class.__name__}: {err}") from None


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"fastalign: config file {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"fastalign: {path} must hold a mapping of config keys")
    return values


def peft_config(run: dict, task_type: str = "CAUSAL_LM"):
    if not run.get("use_peft"):
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=int(run.get("lora_r", 16)), lora_alpha=int(run.get("lora_alpha", 32)),
        lora_dropout=float(run.get("lora_dropout", 0.05)), target_modules=run.get("lora_target_modules"),
        task_type=task_type,
    )


def train(algo: str, config_path: str | None, overrides: list[str]) -> dict:
    from fastalign.data import load_rows
    from fastalign.models import load_model, load_tokenizer

    config_class, trainer_class = algorithms()[algo]
    values = load_config_file(config_path) if config_path else {}
    values.update(parse_overrides(overrides))
    config, run = build_config(config_class, values)
    if algo == "ddpo":
        return _train_ddpo(config, run)
    _check_run_keys(algo, run)  # before anything is loaded
    if "model_name_or_path" not in run or "dataset_name" not in run:
        raise SystemExit("fastalign: the config needs model_name_or_path and dataset_name")
    name = run["model_name_or_path"]
    tokenizer = load_tokenizer(run.get("tokenizer_name_or_path", name))
    model_kwargs = dict(dtype=run.get("dtype"), trust_remote_code=bool(run.get("trust_remote_code")))
    model, report = trainer_class.model_loader(name, **model_kwargs)
    print(f"fastalign: {name}: attention {report}", file=sys.stderr)
    extra = {}
    if run.get("ref_model_name_or_path"):
        extra["ref_model"] = load_model(run["ref_model_name_or_path"], **model_kwargs)[0]
    source = run["dataset_name"]
    train_rows = load_rows(source, run.get("dataset_train_split", "train"), run.get("dataset_config"),
                           streaming=bool(getattr(config, "streaming", False)))
    if algo == "ppo":
        return _train_ppo(config, run, model, tokenizer, train_rows, extra)
    test_split = run.get("dataset_test_split")
    eval_rows = load_rows(source, test_split, run.get("dataset_config")) if test_split else None
    trainer = trainer_class(model, args=config, train_dataset=train_rows, eval_dataset=eval_rows, tokenizer=tokenizer,
                            peft_config=peft_config(run, trainer_class.peft_task_type), **extra)
    for split, rep in trainer.reports.items():
        print(f"fastalign: {split} data: {rep}", file=sys.stderr)
    result = trainer.train()
    print(json.dumps(result, indent=1))
    return result


def _check_run_keys(algo: str, run: dict) -> None:
    """The run keys that do not fit ``algo`` (a language-model algorithm), named."""
    if any(k in run for k in ("pipeline_name_or_path", "prompt_function")):
        raise SystemExit(f"fastalign: pipeline_name_or_path and prompt_function are for ddpo, not {algo}")
    if run.get("ref_model_name_or_path") and algo not in ("dpo", "ppo"):
        raise SystemExit(f"fastalign: ref_model_name_or_path is for dpo and ppo, not {algo}")
    ppo_keys = ("reward_model_name_or_path", "reward_function", "generation_kwargs", "num_shared_layers")
    if algo != "ppo" and any(k in run for k in ppo_keys):
        raise SystemExit(f"fastalign: {', '.join(k for k in ppo_keys if k in run)} are for ppo, not {algo}")
    if algo == "ppo":
        if bool(run.get("reward_model_name_or_path")) == bool(run.get("reward_function")):
            raise SystemExit("fastalign: ppo needs exactly one of reward_model_name_or_path and reward_function")
        if run.get("dataset_test_split"):
            raise SystemExit("fastalign: ppo trains on prompts and has no evaluation split; drop dataset_test_split")


def _train_ppo(config, run, model, tokenizer, rows, extra) -> dict:
    """PPO over a dataset of prompts, rewarded by a reward model or a reward function."""
    from fastalign.algorithms import PPOTrainer
    from fastalign.algorithms.ppo import reward_function

    reward_fn = reward_function(run["reward_function"]) if run.get("reward_function") else None
    trainer = PPOTrainer(config, model, tokenizer=tokenizer, dataset=rows, peft_config=peft_config(run),
                         num_shared_layers=run.get("num_shared_layers"),
                         reward_model=run.get("reward_model_name_or_path"), **extra)
    result = trainer.train(reward_fn, run.get("generation_kwargs"))
    print(json.dumps(result, indent=1))
    return result


def _train_ddpo(config, run) -> dict:
    """DDPO of a Stable Diffusion pipeline: no dataset, prompts come from the prompt function."""
    from fastalign.algorithms import DDPOTrainer
    from fastalign.algorithms.ddpo import prompt_function, reward_function

    allowed = {"pipeline_name_or_path", "reward_function", "prompt_function"}
    extra = sorted(set(run) - allowed)
    if extra:
        raise SystemExit(f"fastalign: ddpo takes no {', '.join(extra)} (its keys: {', '.join(sorted(allowed))})")
    missing = [k for k in sorted(allowed) if not run.get(k)]
    if missing:
        raise SystemExit(f"fastalign: ddpo needs {', '.join(missing)}")
    try:
        reward_fn, prompt_fn = reward_function(run["reward_function"]), prompt_function(run["prompt_function"])
    except ValueError as err:
        raise SystemExit(f"fastalign: {err}") from None
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, run["pipeline_name_or_path"])
    result = trainer.train()
    print(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    names = ", ".join(algorithms())
    parser = argparse.ArgumentParser(
        prog="fastalign", description=f"Kernel-accelerated, padding-free alignment training. Algorithms: {names}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help=f"train with one algorithm ({names})")
    p_train.add_argument("algorithm", choices=sorted(algorithms()))
    p_train.add_argument("--config", help="YAML file of config keys (see configs/)")
    p_demo = sub.add_parser("demo", help="the embedded demo: a tiny model learns to sort digits, then DDPO, on CPU")
    p_demo.add_argument("--output-dir", default="runs/demo")
    p_plot = sub.add_parser("plot", help="write PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots")
    p_plot.add_argument("run_dir")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train":
        train(args.algorithm, args.config, rest)
    elif args.command == "demo":
        from fastalign.demo import run_demo

        run_demo(args.output_dir)
    elif args.command == "plot":
        from fastalign.engine.plot import plot_run

        for path in plot_run(args.run_dir):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
