"""Model and tokenizer names that cannot be loaded fail at once, in one line: a misspelled built-in
(with the closest names), a local path that does not exist, a Hub name while the Hub is unreachable."""

import os
import re
import time

import huggingface_hub.constants
import pytest

from fastalign.errors import ConfigError
from fastalign.models import load_model, load_reward_model, load_tokenizer

LOADERS = [load_model, load_tokenizer, load_reward_model]


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub's address points at a closed local port: every request to it fails at once."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize("load", LOADERS)
def test_a_misspelled_built_in_suggests_the_closest_names(hub_unreachable, load):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^'fastalign/tiny-lama' is not a built-in model; did you mean "
                                          r"'fastalign/tiny-llama'\? \(built-in: fastalign/tiny-llama, fastalign/tiny"):
        load("fastalign/tiny-lama")
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("name", ["./my-model", "~/no-such-fastalign-model", "models/mine", "/no/such/model"])
def test_a_local_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, hub_unreachable, load,
                                                                      name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(name)}: no such model folder .*{re.escape(os.getcwd())}"):
        load(name)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("load", LOADERS)
def test_a_hub_name_while_the_hub_is_unreachable_fails_at_once_in_one_line(hub_unreachable, load):
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load("fastalign-tests/no-such-model")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith("model 'fastalign-tests/no-such-model': the Hugging Face Hub could not be reached")
    assert "fastalign/tiny-llama, fastalign/tiny-qwen2" in message and "\n" not in message


def test_a_hub_model_in_the_local_cache_loads_at_once_while_the_hub_is_unreachable(tmp_path, monkeypatch,
                                                                                  hub_unreachable):
    from fastalign.models.tiny import char_tokenizer, tiny_model

    repo = tmp_path / "models--fastalign-tests--cached"  # huggingface_hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    tiny_model("qwen2", hidden_size=32, layers=1, heads=2).save_pretrained(repo / "snapshots" / ("0" * 40))
    char_tokenizer().save_pretrained(repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    model, _ = load_model("fastalign-tests/cached", device="cpu")
    tokenizer = load_tokenizer("fastalign-tests/cached")
    assert time.monotonic() - start < 5
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.hidden_size == 32
    assert tokenizer("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]


def _saved(folder, vocab_size=100, tokenizer=None):
    from fastalign.models.tiny import tiny_model

    model = tiny_model("llama", vocab_size=vocab_size, hidden_size=32, layers=1, heads=2)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


def test_a_second_model_must_read_the_policys_tokens(tmp_path):
    from fastalign.errors import ConfigError
    from fastalign.models.loading import check_shared_tokens
    from fastalign.models.tiny import char_tokenizer, tiny_model

    policy, tokenizer = tiny_model("llama", hidden_size=32, layers=1, heads=2), char_tokenizer()
    same = _saved(tmp_path / "same", tokenizer=char_tokenizer())
    check_shared_tokens(policy, tokenizer, same, str(tmp_path / "same"), "ref_model_name_or_path")
    check_shared_tokens(policy, tokenizer, same, "fastalign/tiny-qwen2", "ref_model_name_or_path")  # one tokenizer
    other = char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"ref_model_name_or_path=.*other: its tokenizer is not the policy's \(101 tokens"):
        check_shared_tokens(policy, tokenizer, _saved(tmp_path / "other", 101, other), str(tmp_path / "other"),
                            "ref_model_name_or_path")
    bare = _saved(tmp_path / "bare", vocab_size=120)  # no tokenizer beside it: the vocabulary sizes
    with pytest.raises(ConfigError, match="reward_model=.*bare: its vocabulary has 120 tokens, the policy's 100"):
        check_shared_tokens(policy, tokenizer, bare, str(tmp_path / "bare"), "reward_model")


def test_dpo_refuses_a_reference_of_another_vocabulary(tmp_path):
    from fastalign.algorithms.launch import load_reference
    from fastalign.errors import ConfigError
    from fastalign.models.tiny import char_tokenizer, tiny_model

    _saved(tmp_path / "ref", vocab_size=120)
    with pytest.raises(ConfigError, match="ref_model_name_or_path"):
        load_reference({"ref_model_name_or_path": str(tmp_path / "ref")}, tiny_model("llama"), char_tokenizer())
