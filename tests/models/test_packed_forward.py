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
from fastalign.models.varlen import register_varlen_attention

VOCAB = 131


def _tiny(arch, attn="sdpa"):
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
    model = cls(cfg).eval()
    if attn != "sdpa":
        register_varlen_attention()
        model.set_attn_implementation(attn)
    return model


def _alone_logprobs(model, seq):
    ids = torch.tensor(seq.input_ids)[None]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(seq.loss_mask[1:] if seq.loss_mask else [True] * (len(seq.input_ids) - 1), dtype=torch.bool)
    return torch.cat([torch.where(mask, logp, 0.0), torch.zeros(1)])


@pytest.mark.parametrize("attn", ["sdpa", "fastalign_varlen"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_equals_each_sequence_alone(arch, attn):
    torch.manual_seed(0)
    model = _tiny(arch, attn)
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


def test_varlen_backend_gradients_equal_sdpa():
    """Per-sequence attention (fastalign_varlen off CUDA) against sdpa with the block mask."""
    torch.manual_seed(1)
    seqs = [Sequence(torch.randint(2, VOCAB, (n,)).tolist()) for n in (9, 3, 14, 1, 6)]
    batch = pack([[s] for s in seqs])
    grads = []
    for attn in ("sdpa", "fastalign_varlen"):
        torch.manual_seed(0)
        model = _tiny("qwen2", attn)
        packed_logprobs(model, batch).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_varlen_backend_keeps_padding_masks_for_generation():
    """Outside the packed forward the backend is sdpa with sdpa's mask: left-padded generation
    gives what each prompt gives alone."""
    torch.manual_seed(2)
    model = _tiny("llama", "fastalign_varlen")
    prompts = [[5, 9, 11, 4], [7, 3]]
    ids = torch.tensor([prompts[0], [0, 0] + prompts[1]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row, p in zip(out, prompts):
            alone = model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert row[-5:].tolist() == alone[0, -5:].tolist()
