"""`fastalign train ALGO --help`: every key it takes, config fields and run keys, with its type,
default and what it does."""

import dataclasses
import json
import re

import pytest

from fastalign import cli


def key_blocks(text: str) -> dict[str, str]:
    """``--key`` -> the text of its entry (its line and the indented lines under it)."""
    blocks, name = {}, None
    for line in text.splitlines():
        found = re.match(r"  --(\w+)\b", line)
        if found:
            name = found.group(1)
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def field_help(config_class, name: str) -> str:
    """The help a config class (or the first of its bases that has one) gives a field."""
    for klass in config_class.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata.get("help"):
            return field.metadata["help"]
    return ""


@pytest.mark.parametrize("algo", sorted(cli.algorithms()))
def test_train_help_lists_every_key_with_type_default_and_help(algo, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", algo, "--help"])
    assert exit.value.code == 0
    blocks = key_blocks(capsys.readouterr().out)
    config_class, trainer_class = cli.algorithms()[algo]
    for field in dataclasses.fields(config_class):
        described = field_help(config_class, field.name)
        assert described, f"{config_class.__name__}.{field.name} has no help"
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        entry = blocks[field.name]
        assert " ".join(described.split()) in entry and f"default: {json.dumps(default)}" in entry
        assert str(field.type).split(" ")[0].split("[")[0] in entry  # the type (or its choices)
    for key in trainer_class.run_keys:
        entry = blocks[key.name]
        assert " ".join(key.help.split()) in entry and key.kind.__name__ in entry
        assert ("(required)" in entry) if key.required else f"default: {json.dumps(key.default)}" in entry


def test_version_and_the_demo_folder_in_either_spelling(capsys):
    from fastalign import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fastalign {__version__}"
    for flag in ("--output-dir", "--output_dir"):
        args = cli._parser().parse_args(["demo", flag, "somewhere"])
        assert args.output_dir == "somewhere"
