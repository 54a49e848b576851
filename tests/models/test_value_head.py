"""The value-head model: the policy forward (log-probs, values, entropy at the loss positions from one body
call), saving and loading, dropout."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastalign.data import Sequence, pack
from fastalign.models import CausalLMWithValueHead, packed_logprobs, packed_logprobs_and_values
from fastalign.models.tiny import tiny_model


def small(seed=1):
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=seed)


def batch():
    torch.manual_seed(0)
    seqs = [Sequence(torch.randint(4, 99, (n,)).tolist(), [t >= p for t in range(n)]) for n, p in [(9, 3), (5, 1), (12, 6)]]
    return seqs, pack([[s] for s in seqs])


def test_packed_values_and_logprobs_equal_each_sequence_alone():
    model = CausalLMWithValueHead(small()).eval()
    seqs, b = batch()
    where = b.labels != -100  # the loss positions, in order
    with torch.no_grad():
        out = packed_logprobs_and_values(model, b)
        assert out.entropy is None and out.hidden.shape == (int(where.sum()), 32)
        assert torch.allclose(out.logprobs, packed_logprobs(model, b)[where], atol=1e-6)
        alone = []
        for s, start in zip(seqs, b.cu_seqlens.tolist()):
            _, _, values = model(input_ids=torch.tensor([s.input_ids]))
            alone.append(values[0][where[start:start + len(s.input_ids)]])  # this sequence's loss positions
        assert torch.allclose(out.values, torch.cat(alone), atol=1e-5)


def test_entropy_and_temperature_match_the_logits():
    model = CausalLMWithValueHead(small()).eval()
    _, b = batch()
    labels = b.labels[b.labels != -100]
    with torch.no_grad():
        logits = model.get_output_embeddings()(packed_logprobs_and_values(model, b).hidden).float()
        for temperature in (1.0, 0.7):
            out = packed_logprobs_and_values(model, b, temperature=temperature, return_entropy=True)
            logp = torch.log_softmax(logits / temperature, -1)
            torch.testing.assert_close(out.logprobs, logp.gather(-1, labels[:, None])[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_head_and_the_body():
    model = CausalLMWithValueHead(small())
    _, b = batch()
    out = packed_logprobs_and_values(model, b)
    (out.values.sum() + out.logprobs.sum()).backward()
    assert model.v_head.summary.weight.grad.abs().sum() > 0
    assert model.pretrained_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_dropout_acts_in_training_mode_only():
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.5)
    _, b = batch()
    with torch.no_grad():
        a, c = packed_logprobs_and_values(model.train(), b).values, packed_logprobs_and_values(model, b).values
        assert not torch.equal(a, c)
        e, f = packed_logprobs_and_values(model.eval(), b).values, packed_logprobs_and_values(model, b).values
        assert torch.equal(e, f)


def test_saves_in_hf_format_and_loads_back(tmp_path):
    model = CausalLMWithValueHead(small(), v_head_init_strategy="normal").eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "value_head.safetensors").exists()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)  # the language model loads on its own
    again = CausalLMWithValueHead.from_pretrained(str(tmp_path)).eval()
    _, b = batch()
    with torch.no_grad():
        want = packed_logprobs_and_values(model, b)
        got = packed_logprobs_and_values(again, b)
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-6)
        assert torch.allclose(got.values, want.values, atol=1e-6)
        assert torch.allclose(packed_logprobs(lm, b)[b.labels != -100], want.logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        CausalLMWithValueHead(small(), v_head_init_strategy="xavier")
