"""The built-in tokenizer and tiny models: the embedded default runs end to end, offline."""

import pytest
import torch

from fastalign.data import pack_all
from fastalign.data.formats import tokenize_sft
from fastalign.models import packed_logprobs
from fastalign.models.tiny import char_tokenizer, tiny_model


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    tok = char_tokenizer()
    text = "sort: 3 1 2\n-> 1 2 3"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 100 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_trains_a_step_on_packed_rows(arch):
    tok = char_tokenizer()
    rows = [{"prompt": f"{a} {b}:", "completion": f"{min(a, b)} {max(a, b)}"} for a in range(5) for b in range(3)]
    seqs, _ = tokenize_sft(rows, tok)
    (batch, *rest) = pack_all([[s] for s in seqs], max_tokens=256)
    model = tiny_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = -packed_logprobs(model, batch).sum() / batch.num_loss_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=0.2)  # near uniform at init
    assert losses[-1] < losses[0]


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny arch 'mamba'"):
        tiny_model("mamba")
