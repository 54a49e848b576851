"""The value-head model: packed values and log-probs from one body call, saving and loading, dropout."""

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
    with torch.no_grad():
        logp, values = packed_logprobs_and_values(model, b)
        assert torch.allclose(logp, packed_logprobs(model, b), atol=1e-6)
        cu = b.cu_seqlens.tolist()
        for s, start in zip(seqs, cu):
            _, _, alone = model(input_ids=torch.tensor([s.input_ids]))
            n = len(s.input_ids)
            where = b.labels[start:start + n] != -100  # loss positions of this sequence
            assert torch.allclose(values[start:start + n][where], alone[0][where], atol=1e-5)
            assert (values[start:start + n][~where] == 0).all()


def test_gradients_reach_the_head_and_the_body():
    model = CausalLMWithValueHead(small())
    _, b = batch()
    logp, values = packed_logprobs_and_values(model, b)
    (values.sum() + logp.sum()).backward()
    assert model.v_head.summary.weight.grad.abs().sum() > 0
    assert model.pretrained_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_dropout_acts_in_training_mode_only():
    model = CausalLMWithValueHead(small(), summary_dropout_prob=0.5)
    _, b = batch()
    with torch.no_grad():
        a, c = packed_logprobs_and_values(model.train(), b)[1], packed_logprobs_and_values(model, b)[1]
        assert not torch.equal(a, c)
        e, f = packed_logprobs_and_values(model.eval(), b)[1], packed_logprobs_and_values(model, b)[1]
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
        assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)
        assert torch.allclose(packed_logprobs(lm, b), want[0], atol=1e-6)
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        CausalLMWithValueHead(small(), v_head_init_strategy="xavier")
