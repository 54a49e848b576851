"""Built-in tiny models and a character-level tokenizer: the embedded default, nothing downloaded.

The tokenizer maps each printable ASCII character (and newline) to one id, after four specials
(``<pad> <bos> <eos> <unk>``); its chat template renders ``<role>content`` lines. Models are
Llama- or Qwen2-style configs with random weights, small enough for a 2-core CPU.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in character-level tokenizer (100 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(arch: str = "llama", vocab_size: int = len(SPECIALS) + len(ALPHABET), hidden_size: int = 64,
               layers: int = 2, heads: int = 4, max_positions: int = 256, seed: int = 0):
    """A randomly initialised causal LM (``arch`` = "llama" or "qwen2") using sdpa attention."""
    import torch

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    configs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in configs:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {sorted(configs)}")
    config_cls, model_cls = configs[arch]
    config = config_cls(**common)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config)
