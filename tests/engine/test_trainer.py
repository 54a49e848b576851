"""The training loop: exact step means, accumulation, schedules, clipping, bf16, seeding, eval."""

import copy
import json
import math

import pytest
import torch

from fastalign.algorithms import SFTConfig, SFTTrainer
from fastalign.data import pack_all, tokenize_sft
from fastalign.models import packed_logprobs
from fastalign.models.tiny import char_tokenizer, tiny_model

ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(7) for b in range(6)]


def make_trainer(tmp_path, model=None, **overrides):
    options = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-2, max_steps=4, max_tokens_per_batch=64,
                   disable_tqdm=True, seed=0)
    options.update(overrides)
    model = model if model is not None else tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1)
    rows = options.pop("train_dataset", ROWS)
    return SFTTrainer(model, args=SFTConfig(**options), train_dataset=rows, tokenizer=char_tokenizer())


def losses(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def test_one_step_is_the_exact_mean_over_its_micro_batches(tmp_path):
    # Three micro-batches accumulated in one step == one manual AdamW step on the mean NLL.
    reference = tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1)
    trainer = make_trainer(tmp_path, model=copy.deepcopy(reference), max_steps=1, gradient_accumulation_steps=3,
                           max_grad_norm=None, shuffle=False)
    group = trainer.step_batches(0)
    assert len(group) == 3 and len({b.num_loss_tokens for b in group}) > 1  # uneven weights matter
    trainer.train()

    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    total = sum(b.num_loss_tokens for b in group)
    loss = sum(-packed_logprobs(reference, b).sum() for b in group) / total
    loss.backward()
    opt.step()
    for (name, got), want in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert losses(tmp_path / "run")[0] == pytest.approx(loss.item(), rel=1e-6)


def test_accumulation_split_does_not_change_the_step(tmp_path):
    # The same tokens per optimizer step, cut into 1 or 4 micro-batches: the same training.
    a = make_trainer(tmp_path / "a", max_tokens_per_batch=4096, gradient_accumulation_steps=1, max_steps=1, shuffle=False)
    b = make_trainer(tmp_path / "b", max_tokens_per_batch=4096 // 16, gradient_accumulation_steps=16, max_steps=1, shuffle=False)
    assert len(a.train_batches) == 1 and len(b.step_batches(0)) == len(b.train_batches) > 1
    a.train()
    b.train()
    assert losses(tmp_path / "a" / "run") == pytest.approx(losses(tmp_path / "b" / "run"), rel=1e-6)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_warmup_then_schedule(tmp_path, kind):
    trainer = make_trainer(tmp_path, max_steps=10, warmup_steps=4, lr_scheduler_type=kind, learning_rate=1.0)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.engine.lr)
        trainer.engine.optimizer.step()
        trainer.engine.lr_scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    after = {"linear": [1 - k / 6 for k in range(5)],
             "cosine": [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(5)],
             "constant": [1.0] * 5}[kind]
    assert lrs[4:9] == pytest.approx(after)


def test_clipping_bounds_the_update_and_logs_the_raw_norm(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, max_grad_norm=1e-3, learning_rate=0.0)
    group = trainer.step_plan(0)
    trainer._run_step(group)
    raw = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.model.parameters() if p.grad is not None))
    norm = trainer.engine.step()
    assert norm == pytest.approx(raw, rel=1e-5) and norm > 1e-3
    # The same step again, not stepped: after clipping the gradient norm is the bound.
    trainer._run_step(group)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1e-3)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.model.parameters() if p.grad is not None))
    assert clipped == pytest.approx(1e-3, rel=1e-4)


def test_seeded_runs_repeat_and_other_seeds_differ(tmp_path):
    runs = [make_trainer(tmp_path / str(i), seed=s, neftune_noise_alpha=5.0) for i, s in enumerate([3, 3, 4])]
    for t in runs:
        t.train()
    a, b, c = (losses(tmp_path / str(i) / "run") for i in range(3))
    assert a == b and a != c


def test_bf16_autocast_trains_near_fp32(tmp_path):
    fp32 = make_trainer(tmp_path / "fp32", max_steps=2)
    bf16 = make_trainer(tmp_path / "bf16", max_steps=2, bf16=True)
    fp32.train()
    bf16.train()
    a, b = losses(tmp_path / "fp32" / "run"), losses(tmp_path / "bf16" / "run")
    assert a != b and b == pytest.approx(a, rel=2e-2)


def test_eval_at_intervals_and_at_the_end(tmp_path):
    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), tokenizer=char_tokenizer(),
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=5, eval_steps=2, disable_tqdm=True,
                                        max_tokens_per_batch=64),
                         train_dataset=ROWS, eval_dataset=ROWS[:9])
    result = trainer.train()
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert steps == [2, 4, 5]
    # The eval loss is the exact mean NLL over the eval set's loss tokens.
    seqs, _ = tokenize_sft(ROWS[:9], char_tokenizer())
    batches = pack_all([[s] for s in seqs], 64)
    with torch.no_grad():
        want = sum(-packed_logprobs(trainer.model, b).sum() for b in batches) / sum(b.num_loss_tokens for b in batches)
    assert result["eval/loss"] == pytest.approx(want.item(), rel=1e-5)


def test_non_finite_loss_stops_before_the_weights_move(tmp_path):
    trainer = make_trainer(tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with torch.no_grad():
        trainer.model.get_input_embeddings().weight[5:].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.train()
    for p, q in zip(trainer.model.parameters(), before):
        if p is not trainer.model.get_input_embeddings().weight:
            torch.testing.assert_close(p, q)


def test_neftune_noise_only_while_training(tmp_path):
    trainer = make_trainer(tmp_path, neftune_noise_alpha=5.0)
    batch = trainer.train_batches[0]
    trainer.model.eval()
    with torch.no_grad():
        clean = [trainer.compute_loss(batch)[0].item() for _ in range(2)]
    trainer.model.train()
    with torch.no_grad():
        noisy = [trainer.compute_loss(batch)[0].item() for _ in range(2)]
    assert clean[0] == clean[1] and noisy[0] != noisy[1] and clean[0] not in noisy


def test_tensorboard_when_asked(tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, max_steps=2, report_to="tensorboard").train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert losses(tmp_path / "run") == pytest.approx([e.value for e in events.Scalars("loss")], rel=1e-6)


def test_rows_that_cannot_be_trained_on_are_named_with_their_file(tmp_path):
    # These were bare ValueErrors (exit status 1) that named no file.
    from fastalign.data import load_rows
    from fastalign.errors import DataError

    rows = ROWS[:8]
    rows[5] = {"prompt": "1=", "completion": "7" * 200}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^{path}: row 5 has 203 tokens, more than max_tokens_per_batch=64"):
        make_trainer(tmp_path, train_dataset=load_rows(str(path)), max_length=None)
    with pytest.raises(DataError, match=rf"^{path}: row 5 has 203 tokens"):  # a stream names the data set's row
        make_trainer(tmp_path, train_dataset=load_rows(str(path), streaming=True), max_length=None,
                     stream_window_rows=3).train()
    with pytest.raises(DataError, match=rf"^{path}: nothing left to train on .*: 8 rows: 8 truncated, 8 dropped"):
        make_trainer(tmp_path, train_dataset=load_rows(str(path)), max_length=2, truncation_mode="keep_start")


@pytest.mark.parametrize("overrides, said", [
    ({"warmup_steps": 50, "max_steps": 2}, "warmup_steps=50 is longer than the run (2 optimizer steps)"),
    ({"learning_rate": 0.0}, "learning_rate is 0"),
])
def test_a_rate_that_cannot_train_as_meant_is_said(tmp_path, capsys, overrides, said):
    make_trainer(tmp_path, **overrides).train()
    err = capsys.readouterr().err
    assert f"fastalign: warning: {said}" in err


def test_a_usual_schedule_says_nothing(tmp_path, capsys):
    make_trainer(tmp_path, warmup_steps=2, max_steps=4).train()
    assert "warning" not in capsys.readouterr().err


LONG = [{"prompt": "q", "completion": "ab" * 30}] + ROWS[:5]  # row 0: 62 tokens with BOS and EOS


def test_rows_past_the_models_positions_are_refused_for_learned_positions(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastalign.errors import DataError

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(DataError, match="row 0 has a sequence of .* tokens, more than the model's "
                                        "max_position_embeddings=32: set max_length to at most 32"):
        make_trainer(tmp_path, model=model, train_dataset=LONG)
    make_trainer(tmp_path, model=model, train_dataset=LONG, max_length=32)  # cut to fit: no error


def test_rows_past_the_models_positions_are_said_for_rotary_positions(tmp_path, capsys):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2, max_positions=40)
    make_trainer(tmp_path, model=model, train_dataset=LONG)
    assert "fastalign: warning: row 0 has a sequence of" in capsys.readouterr().err
    make_trainer(tmp_path, model=model, train_dataset=ROWS)
    assert "warning" not in capsys.readouterr().err
