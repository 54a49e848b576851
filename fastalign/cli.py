"""The ``fastalign`` command.

    fastalign train ALGO [--config FILE] [--key value ...]   train from a YAML config and overrides
    fastalign train ALGO --help                             every key ALGO takes: type, default, help
    fastalign demo [--output-dir DIR]                       the embedded end-to-end demo (CPU, ~80 s)
    fastalign plot RUN_DIR                                  PNG curves of a run's metrics

A config is a flat YAML mapping of the algorithm config's field names (``SFTConfig`` for sft,
...) plus the run keys its trainer declares (``run_keys``: which model and data, ...). ``--key
value`` overrides a key; values are read as YAML (``--bf16 true``, ``--report_to [tensorboard]``)
for the field's type, then checked with the config before anything loads. ``train`` prints the
result as JSON and writes the curves into ``OUTPUT_DIR/plots``.

A mistake in what was given (a key or value, a data row, a missing file) is one line, ``fastalign:
error: ...``, and exit status 2; a failure while running is one line with the exception's type and
status 1. ``--debug`` anywhere on the command line (or ``FASTALIGN_DEBUG=1``) adds the traceback
and shows the deprecation warnings of the libraries fastalign runs on.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import signal
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import yaml

from fastalign.errors import ConfigError, Interrupted, UsageError
from fastalign.options import fits, specs

# Libraries whose deprecation warnings are theirs to act on (one per process and call site, they
# break the progress bar); shown with --debug.
LIBRARIES = r"(torch|transformers|deepspeed|diffusers|datasets|peft|accelerate|huggingface_hub)(\.|$)"


def algorithms() -> dict:
    """Algorithm name -> (Config class, Trainer class)."""
    from fastalign.algorithms import ALGORITHMS

    return ALGORITHMS


def __getattr__(name: str):
    """``RUN_KEYS``: every algorithm's run keys by name (the trainers load on first use)."""
    if name == "RUN_KEYS":
        return run_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_keys(algo: str | None = None) -> dict:
    """Run key name -> ``RunKey``: those ``algo``'s trainer declares, or every algorithm's."""
    keys = {}
    for name, (_, trainer) in algorithms().items():
        if algo is None or name == algo:
            keys.update({k.name: k for k in trainer.run_keys})
    return keys


class UsageExit(SystemExit):
    """A usage error met by a Python caller of ``train`` or ``build_config``: exit status 2, and the
    error line as its text."""

    def __init__(self, error: Exception):
        super().__init__(2)
        self.line = error_line(error)

    def __str__(self) -> str:
        return self.line


def _exiting(function):
    """``function`` for Python callers: a usage error becomes a ``UsageExit``, as the command exits
    on one (``function.__wrapped__`` raises the typed error)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UsageError as err:
            raise UsageExit(err) from None
    return wrapper


def error_line(error: BaseException, with_type: bool = False) -> str:
    text = f"{type(error).__name__}: {error}" if with_type else str(error)
    return "fastalign: error: " + " ".join(text.split())


BARE = object()  # a key given without a value: ``true`` for a key that takes a boolean, else an error


def parse_overrides(items: list[str]) -> dict:
    """``["--lr", "1e-4", "--bf16", "--name=x"]`` -> ``{"lr": "1e-4", "bf16": BARE, "name": "x"}``
    (values stay text until ``build_config`` reads them for their field)."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"expected --key value, got {item!r}")
        key = item[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            value, i = items[i + 1], i + 1
        else:
            value = BARE
        out[key.replace("-", "_")] = value
        i += 1
    return out


# transformers.TrainingArguments names a user may bring, and what fastalign's configs take instead
# (the TRL drop-in layer takes them as they are).
_BATCH = "fastalign batches by tokens: set max_tokens_per_batch, rows are packed up to it"
TRAINING_ARGUMENTS = {
    "per_device_train_batch_size": _BATCH, "per_device_eval_batch_size": _BATCH, "train_batch_size": _BATCH,
    "fp16": "float16 training is not supported: use bf16=true or dtype=bfloat16",
    "evaluation_strategy": "evaluation runs every eval_steps steps on dataset_test_split",
    "eval_strategy": "evaluation runs every eval_steps steps on dataset_test_split",
    "save_strategy": "checkpoints are written every save_steps steps",
    "logging_strategy": "metrics are logged every logging_steps steps",
    "optim": "fastalign trains with AdamW (learning_rate, adam_beta1/2, adam_epsilon, weight_decay); "
             "the TRL drop-in layer (from fastalign import trl) takes other optimizers",
    "lr": "did you mean 'learning_rate'?",
}


def _read(kind, text, key: str):
    """A field's value from its text (an override, or a YAML string): read as YAML for the field's
    annotation ``kind``, kept as text where the field takes text and YAML reads something else
    (``--output_dir 007``); ``1e-5`` (text to YAML 1.1) read as a number."""
    if not isinstance(text, str) or not text:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if fits(value, kind):
        return value
    if fits(text, kind):
        return text
    if isinstance(value, str) and fits(1.0, kind):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {text!r}") from None
    return value  # the config names what it expected


def _run_value(key, value):
    """A run key's value read for its kind (text stays text, the others are read as YAML), checked."""
    if key.kind is str:
        return value if value is None or isinstance(value, str) else str(value)
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            pass  # the check names the key and the text
    return key.check(value)


def _bare(key: str, kind, run_key) -> str:
    """A key given without a value: true for a key that takes a boolean, else an error."""
    if not (fits(True, kind) if kind is not None else run_key.kind is bool):
        raise ConfigError(f"--{key} needs a value (--{key} VALUE or --{key}=VALUE)")
    return "true"


@_exiting
def build_config(config_class, values: dict, keys: dict | None = None):
    """``(config, run)``: the algorithm config and the run keys (``keys``: name -> ``RunKey``, by
    default every algorithm's), each value read for its type and checked; unknown keys are an error."""
    keys = run_keys() if keys is None else keys
    fields = {spec.name: spec.type for spec in specs(config_class)}
    unknown = sorted(set(values) - set(fields) - set(keys))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(set(fields) | set(keys)), n=1)
            hint = TRAINING_ARGUMENTS.get(key) or (f"did you mean {close[0]!r}?" if close else "")
            hints.append(f"{key!r}" + (f" ({hint})" if hint else ""))
        raise ConfigError(f"unknown config key(s) for {config_class.__name__}: {', '.join(hints)}")
    values = {k: _bare(k, fields.get(k), keys.get(k)) if v is BARE else v for k, v in values.items()}
    run = {k: _run_value(keys[k], v) for k, v in values.items() if k in keys}
    return config_class(**{k: _read(fields[k], v, k) for k, v in values.items() if k in fields}), run


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    return values


@_exiting
def train(algo: str, config_path: str | None, overrides: list[str], plots: bool = False) -> dict:
    """Train ``algo`` from a config file and ``--key value`` overrides; prints the result (on the main
    process) and returns it; ``plots``: also writes the curves."""
    from fastalign.engine import distributed

    config_class, trainer_class = algorithms()[algo]
    values = load_config_file(config_path) if config_path else {}
    values.update(parse_overrides(overrides))
    _check_owner(algo, values)
    config, run = build_config.__wrapped__(config_class, values, run_keys(algo))
    _check_output_dir(getattr(config, "output_dir", None))
    result = trainer_class.launch(config, run)
    if distributed.is_main():
        print(json.dumps(result, indent=1))
        if plots:
            _plot(config.output_dir)
    return result


def _plot(output_dir) -> None:
    """The run's curves, or one line saying why there are none."""
    from fastalign.engine.plot import plot_run

    try:
        written = plot_run(output_dir)
    except (ImportError, FileNotFoundError) as err:
        print(f"fastalign: no plots: {err}", file=sys.stderr)
        return
    print(f"fastalign: {len(written)} plots in {Path(output_dir) / 'plots'}", file=sys.stderr)


def _check_output_dir(output_dir) -> None:
    """``output_dir`` names a folder (it may not exist yet): not empty text, not a file."""
    if isinstance(output_dir, str) and not output_dir.strip():
        raise ConfigError(f"output_dir must name a folder, got {output_dir!r}")
    if output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder")


def _check_owner(algo: str, values: dict) -> None:
    """Run keys of other algorithms, named with the algorithms that take them (before anything loads)."""
    own, everyone = run_keys(algo), run_keys()
    foreign = sorted(k for k in values if k in everyone and k not in own)
    if foreign:
        owners = [name for name in algorithms() if name != algo and any(k in run_keys(name) for k in foreign)]
        listed = " and ".join(owners) if len(owners) < 3 else ", ".join(owners[:-1]) + " and " + owners[-1]
        raise ConfigError(f"{algo} takes no {', '.join(foreign)} (run key(s) that are for {listed}, not {algo})")


def keys_help(algo: str) -> str:
    """Every key ``algo`` takes, config fields then run keys: type, default and help."""
    def entry(name, kind, default, text, required=False):
        head = f"  --{name}  {kind}" + (" (required)" if required else f", default: {json.dumps(default, default=str)}")
        return head + "\n" + textwrap.fill(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)

    config_class, trainer_class = algorithms()[algo]
    lines = [f"config keys ({config_class.__name__}):"]
    lines += [entry(s.name, ", ".join(filter(None, [s.label, s.constraint])), s.default, s.help) for s in specs(config_class)]
    lines.append("run keys (what to train: the model, the data, ...):")
    for key in trainer_class.run_keys:
        kind = key.kind.__name__ + (f", one of {', '.join(map(repr, key.choices))}" if key.choices else "")
        kind += f", {key.constraint}" if key.bounds else ""
        lines.append(entry(key.name, kind, key.default, key.help, key.required))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes (an unknown command, a missing argument) as one ``fastalign: error:``
    line and exit status 2, like every other mistake, instead of its usage block."""

    def error(self, message):
        where = "" if self.prog == "fastalign" else f"{self.prog}: "
        raise ConfigError(f"{where}{message} (see {self.prog} --help)")


def _check_algorithm(argv: list[str]) -> None:
    """``fastalign train`` needs the algorithm first: a missing or unknown one named, with the choices."""
    if not argv or argv[0] != "train" or (len(argv) > 1 and argv[1] in ("-h", "--help")):
        return
    names = list(algorithms())
    given = argv[1] if len(argv) > 1 else None
    if given is None or given.startswith("-"):
        raise ConfigError(f"fastalign train needs the algorithm first: fastalign train ALGO [--config FILE] "
                          f"[--key value ...], ALGO one of {', '.join(names)}")
    if given not in names:
        close = difflib.get_close_matches(given, names, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown algorithm {given!r}{guess}; fastalign train takes {', '.join(names)}")


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(algorithms())
    parser = _Parser(
        prog="fastalign", allow_abbrev=False,
        description=f"Kernel-accelerated, padding-free alignment training. Algorithms: {names}.",
        epilog="Exit status: 0 done, 2 a mistake in the config, data or paths given, 1 a failure while running, "
               "130 or 143 stopped by SIGINT or SIGTERM (after saving a checkpoint).")
    from fastalign import __version__

    parser.add_argument("--version", action="version", version=f"fastalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="on a failure, the traceback too (also "
                        "FASTALIGN_DEBUG=1); show the libraries' deprecation warnings; anywhere on the line")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help=f"train with one algorithm ({names})", allow_abbrev=False)
    per_algo = p_train.add_subparsers(dest="algorithm", required=True, metavar="ALGO")
    for name, (config_class, _) in algorithms().items():
        p_algo = per_algo.add_parser(name, help=f"{config_class.__name__} and the run keys", allow_abbrev=False,
                                     epilog=keys_help(name), formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=f"fastalign train {name} [--config FILE] [--key value ...]")
        p_algo.add_argument("--config", help="YAML file of config keys (see configs/); --key value overrides one")
    p_demo = sub.add_parser("demo", help="the embedded demo: a tiny model learns to sort digits, then DDPO, on CPU")
    p_demo.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/demo",
                        help="where the demo's runs go (default: runs/demo)")
    p_plot = sub.add_parser("plot", help="write PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots")
    p_plot.add_argument("run_dir")
    return parser


def _command(argv: list[str]) -> int:
    _check_algorithm(argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train":
        train.__wrapped__(args.algorithm, args.config, rest, plots=True)
    elif args.command == "demo":
        from fastalign.demo import run_demo

        run_demo(args.output_dir)
    elif args.command == "plot":
        from fastalign.engine.plot import plot_run

        for path in plot_run(args.run_dir):
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fastalign ARGV``: its exit status (0 done, 2 a usage error, 1 a failure while running,
    128 + the signal when SIGINT or SIGTERM stopped it: 130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTALIGN_DEBUG", "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not debug:  # datasets logs a parse failure before raising it; the one error line says it better
        os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    with warnings.catch_warnings():
        if not debug:
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
        try:
            return _command(argv)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during training (Interrupted)
            if debug:
                traceback.print_exc()
            from fastalign.engine import distributed

            if distributed.is_main():
                print(f"fastalign: {err}" if isinstance(err, Interrupted) else "\nfastalign: interrupted", file=sys.stderr)
            return 128 + getattr(err, "signal", signal.SIGINT)
        except Exception as err:
            status = 2 if isinstance(err, (UsageError, FileNotFoundError)) else 1
            if debug:
                traceback.print_exc()
            print(error_line(err, with_type=status == 1), file=sys.stderr)
            return status


if __name__ == "__main__":
    sys.exit(main())
