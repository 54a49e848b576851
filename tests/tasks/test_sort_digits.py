"""The sort-digits demo task: rows, answer checks, preference pairs, greedy generation, evaluation."""

import pytest
import torch

from fastalign.data import pack_all
from fastalign.data.formats import tokenize_sft
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks import sort_digits as sd


def test_rows_are_deterministic_and_seeds_differ():
    assert sd.make_rows(50, seed=3) == sd.make_rows(50, seed=3)
    assert sd.make_rows(50, seed=3) != sd.make_rows(50, seed=4)
    train = {r["prompt"] for r in sd.make_rows(200, seed=0)}
    held_out = sd.make_rows(200, seed=1, exclude=train)
    assert not train & {r["prompt"] for r in held_out}


def test_row_format():
    rows = sd.make_rows(300, seed=0, min_digits=2, max_digits=5)
    lengths = set()
    for row in rows:
        prompt, completion = row["prompt"], row["completion"]
        assert set(row) == {"prompt", "completion"}
        assert prompt.endswith("=") and prompt[:-1].isdigit()
        assert completion == "".join(sorted(prompt[:-1]))
        lengths.add(len(completion))
    assert lengths == {2, 3, 4, 5}
    with pytest.raises(ValueError):
        sd.make_rows(1, min_digits=4, max_digits=3)


def test_rows_tokenize_one_token_per_character():
    tok = char_tokenizer()
    seqs, report = tokenize_sft([{"prompt": "3914=", "completion": "1349"}], tok, completion_only_loss=True)
    (seq,) = seqs
    assert report.dropped == 0
    assert tok.decode(seq.input_ids) == "3914=1349<eos>"
    assert seq.loss_mask == [False] * 5 + [True] * 5


def test_is_sorted_answer():
    assert sd.is_sorted_answer("3914=", "1349")
    assert sd.is_sorted_answer("3914=", "1349\n")
    assert sd.is_sorted_answer("3914=", "1349<eos>")
    assert sd.is_sorted_answer("5505=", "0555")
    assert not sd.is_sorted_answer("3914=", "1394")  # partly sorted
    assert not sd.is_sorted_answer("3914=", "1359")  # wrong digits
    assert not sd.is_sorted_answer("3914=", "134")  # a digit missing
    assert not sd.is_sorted_answer("3914=", "13499")  # a digit extra
    assert not sd.is_sorted_answer("3914=", "")


def test_sortedness_reward_is_graded():
    reward = sd.sortedness_reward
    assert reward("3914=", "1349") == 1.0
    assert reward("3914=", "1349<eos>") == 1.0
    assert reward("3914=", "1394") == pytest.approx(5 / 6)  # right digits, one pair swapped
    assert reward("3914=", "3914") == pytest.approx(1 / 2)  # the prompt echoed
    assert reward("3914=", "134") == pytest.approx(3 / 4)  # one digit missing
    assert reward("3914=", "1359") == pytest.approx(3 / 4)  # one digit wrong
    assert reward("3914=", "9431") == 0.0  # reversed
    assert reward("33=", "33") == 1.0 and reward("7=", "7") == 1.0
    assert reward("3914=", "") == 0.0
    assert reward("3914=", "5678") == 0.0  # no digit in common
    assert reward("3914=", "1a49") < reward("3914=", "1349")
    # Closer answers score higher; only the exact answer scores 1.
    assert reward("3914=", "1349") > reward("3914=", "1394") > reward("3914=", "3914") > reward("3914=", "9431")
    for row in sd.make_rows(100, seed=5):
        for answer in (row["completion"], row["prompt"][:-1], row["completion"][::-1], "x"):
            r = reward(row["prompt"], answer)
            assert 0.0 <= r <= 1.0
            assert (r == 1.0) == sd.is_sorted_answer(row["prompt"], answer)


def test_preference_pairs():
    pairs = sd.make_preference_pairs(300, seed=7, min_digits=1, max_digits=6)
    assert pairs == sd.make_preference_pairs(300, seed=7, min_digits=1, max_digits=6)
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert sd.is_sorted_answer(pair["prompt"], pair["chosen"])
        assert not sd.is_sorted_answer(pair["prompt"], pair["rejected"])
        assert pair["rejected"] and pair["rejected"].isdigit()
        assert sd.sortedness_reward(pair["prompt"], pair["rejected"]) < 1.0
    assert len({p["rejected"] for p in pairs}) > 200  # varied, not one fixed wrong answer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return tiny_model("llama", hidden_size=32, layers=1, heads=2), char_tokenizer()


def test_generate_returns_completion_strings(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [r["prompt"] for r in sd.make_rows(7, seed=2)]
    model.eval()
    out = sd.generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert len(out) == len(prompts)
    assert all(isinstance(text, str) and len(text) <= 5 for text in out)
    assert tok.padding_side == "right"  # restored
    # Left padding does not change an answer: each prompt alone gives the same completion.
    alone = [sd.generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts[:3]]
    assert alone == out[:3]


def test_generate_stops_at_eos():
    """A scripted model answers "7" then eos: the completion ends there, pads and eos dropped."""
    tok = char_tokenizer()
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2).eval()
    eq, seven = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("7")

    def script(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        nxt = torch.where(last == eq, seven, torch.where(last == seven, tok.eos_token_id, eq))
        logits = torch.full_like(output.logits, -1e4)
        logits[:, -1].scatter_(1, nxt[:, None], 0.0)
        output.logits = logits
        return output

    handle = model.register_forward_hook(script, with_kwargs=True)
    try:
        assert sd.generate(model, tok, ["12=", "43210=", "9="], max_new_tokens=4) == ["7", "7", "7"]
    finally:
        handle.remove()


def test_evaluate_returns_fractions_and_restores_mode(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = sd.make_rows(20, seed=3, max_digits=5)
    model.train()
    result = sd.evaluate(model, tok, rows)
    assert set(result) == {"exact_sorted", "reward_mean"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert model.training
    model.eval()
    sd.evaluate(model, tok, rows[:2], max_new_tokens=3)
    assert not model.training


def test_a_few_sft_steps_raise_the_reward():
    """The task is learnable: a few packed SFT steps already move the graded reward."""
    from fastalign.models import packed_logprobs

    tok = char_tokenizer()
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    rows = sd.make_rows(120, seed=0, min_digits=2, max_digits=4)
    seqs, _ = tokenize_sft(rows, tok, completion_only_loss=True)
    batches = pack_all([[s] for s in seqs], 256)
    held_out = sd.make_rows(16, seed=1, min_digits=2, max_digits=4)
    before = sd.evaluate(model, tok, held_out)["reward_mean"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in batches * 3:
        loss = -packed_logprobs(model, batch).sum() / batch.num_loss_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sd.evaluate(model, tok, held_out)["reward_mean"]
    assert after > before + 0.1, (before, after)
