"""The ``fastalign`` command.

    fastalign train ALGO --config FILE [--key value ...]   train from a YAML config
    fastalign demo [--output-dir DIR]                      the embedded end-to-end demo (CPU, ~80 s)
    fastalign plot RUN_DIR                                 PNG curves of a run's metrics

A config is a flat YAML mapping of the algorithm config's field names (``SFTConfig`` for sft,
...) plus the run keys its trainer declares (``run_keys``: which model and data, ...). ``--key value`` overrides a
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


def _run_value(key, value):
    """A run key's value read for its kind: text stays text, the others are read as YAML."""
    if key.kind is str:
        return value if value is None or isinstance(value, str) else str(value)
    if isinstance(value, str):
        value = yaml.safe_load(value) if value else None
    if value is None:
        return None
    if key.kind is list and isinstance(value, str):
        value = [value]
    if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, key.kind) or (key.kind is int and isinstance(value, bool)):
        raise SystemExit(f"fastalign: {key.name} expects {key.kind.__name__}, got {value!r}")
    return value


def build_config(config_class, values: dict, keys: dict | None = None):
    """``(config, run)``: the algorithm config and the run keys (``keys``: name -> ``RunKey``, by
    default every algorithm's); unknown keys are an error."""
    keys = run_keys() if keys is None else keys
    fields = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields) - set(keys))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(set(fields) | set(keys)), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SystemExit(f"fastalign: unknown config key(s) for {config_class.__name__}: {', '.join(hints)}")
    options = {k: _coerce(fields[k], v, k) for k, v in values.items() if k in fields}
    run = {k: _run_value(keys[k], v) for k, v in values.items() if k in keys}
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


def train(algo: str, config_path: str | None, overrides: list[str]) -> dict:
    """Train ``algo`` from a config file and ``--key value`` overrides; prints and returns the result."""
    from fastalign.errors import UsageError

    config_class, trainer_class = algorithms()[algo]
    values = load_config_file(config_path) if config_path else {}
    values.update(parse_overrides(overrides))
    _check_owner(algo, values)
    config, run = build_config(config_class, values, run_keys(algo))
    try:
        result = trainer_class.launch(config, run)
    except UsageError as err:
        raise SystemExit(f"fastalign: {err}") from None
    print(json.dumps(result, indent=1))
    return result


def _check_owner(algo: str, values: dict) -> None:
    """Run keys of other algorithms, named with the algorithms that take them (before anything loads)."""
    own, everyone = run_keys(algo), run_keys()
    foreign = sorted(k for k in values if k in everyone and k not in own)
    if foreign:
        owners = [name for name in algorithms() if name != algo and any(k in run_keys(name) for k in foreign)]
        listed = " and ".join(owners) if len(owners) < 3 else ", ".join(owners[:-1]) + " and " + owners[-1]
        raise SystemExit(f"fastalign: {algo} takes no {', '.join(foreign)} (run key(s) that are for {listed}, not {algo})")


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
