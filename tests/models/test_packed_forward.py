"""The packing invariant: a packed forward gives each sequence what it gets when run alone."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastalign.data import Sequence, pack
from fastalign.models import packed_hidden, packed_logprobs

VOCAB = 131


def _tiny(arch):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        cls = Qwen2ForCausalLM
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        cls = GPT2LMHeadModel
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def _alone_logprobs(model, seq):
    ids = torch.tensor(seq.input_ids)[None]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(seq.loss_mask[1:] if seq.loss_mask else [True] * (len(seq.input_ids) - 1), dtype=torch.bool)
    return torch.cat([torch.where(mask, logp, 0.0), torch.zeros(1)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_equals_each_sequence_alone(arch):
    torch.manual_seed(0)
    model = _tiny(arch)
    seqs = [
        Sequence(torch.randint(2, VOCAB, (n,)).tolist(), [t >= p for t in range(n)])
        for n, p in [(7, 2), (1, 0), (12, 5), (4, 0), (9, 8)]
    ]
    batch = pack([[s] for s in seqs])
    with torch.no_grad():
        got = packed_logprobs(model, batch)
        hidden = packed_hidden(model, batch)
    want = torch.cat([_alone_logprobs(model, s) for s in seqs])
    assert (got - want).abs().max().item() < 1e-5
    # The invariant must be able to fail: without restarting positions the sequences mix.
    with torch.no_grad():
        mixed = model.base_model(input_ids=batch.input_ids, use_cache=False).last_hidden_state[0]
    assert (mixed - hidden).abs().max().item() > 1e-3


def test_only_loss_positions_reach_the_head():
    model = _tiny("llama")
    batch = pack([[Sequence([5, 6, 7, 8], [False, False, False, True])]])
    logp = packed_logprobs(model, batch)
    assert logp.shape == (4,) and (logp[[0, 1, 3]] == 0).all() and logp[2] < 0
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None
