"""KTO on unpaired rows: the KL estimate from mismatched pairs and the loss against a hand
computation on unpacked sequences, TRL's metric names, the reference, the rows' checks."""

import json
import re

import pytest
import torch

from fastalign.algorithms.kto import KTOConfig, KTOTrainer, per_label
from fastalign.data import Sequence, pack
from fastalign.data.unpaired import UnpairedEncoder, mismatched, unpair
from fastalign.errors import DataError
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks.sort_digits import make_preference_pairs

ROWS = [{"prompt": "3914=", "completion": "1349", "label": True},
        {"prompt": "52=", "completion": "25", "label": False},
        {"prompt": "807=", "completion": "0781", "label": True}]


def test_mismatched_pairs_each_prompt_with_the_previous_completion():
    p, c = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11], [12], [13, 14, 15]]
    batch = pack([[Sequence(a + b, [False] * len(a) + [True] * len(b))] for a, b in zip(p, c)])
    kl = mismatched(batch)
    cu = kl.cu_seqlens.tolist()
    got = [kl.input_ids[0, s:e].tolist() for s, e in zip(cu[:-1], cu[1:])]
    assert got == [p[0] + c[2], p[1] + c[0], p[2] + c[1]]
    # The loss on the mismatched completion only: each of its tokens is a label, nothing else.
    labels = [kl.labels[s:e].tolist() for s, e in zip(cu[:-1], cu[1:])]
    assert labels == [[-100, -100, 13, 14, 15, -100], [-100, 10, 11, -100], [-100, -100, -100, 12, -100]]


def sequence_sum(model, prompt, completion):
    """The summed log-prob of ``completion`` after ``prompt``, from an unpacked forward."""
    ids = prompt + completion
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logp[len(prompt) - 1:].gather(-1, torch.tensor(completion)[:, None]).sum()


def kto_trainer(tmp_path, rows=ROWS, **options):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=0)
    args = KTOConfig(output_dir=str(tmp_path), disable_tqdm=True, **{"max_tokens_per_batch": 4096, **options})
    trainer = KTOTrainer(model, args=args, train_dataset=rows, tokenizer=char_tokenizer())
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves away from its reference, so every log-ratio is non-zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    return trainer


def test_kl_from_mismatched_pairs_and_loss_by_hand(tmp_path):
    beta, wd, wu = 0.3, 1.2, 0.8
    trainer = kto_trainer(tmp_path, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    (order,) = trainer.train_batches.plan  # the rows of the one micro-batch, in its order
    tok = char_tokenizer()
    rows = [ROWS[i] for i in order]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    completions = [tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]

    def log_ratio(prompt, completion):
        return sequence_sum(trainer.model, prompt, completion) - sequence_sum(trainer.ref_model, prompt, completion)

    # TRL 1.16: row i's prompt with row i-1's completion (rotated by one within the batch).
    kl = torch.stack([log_ratio(prompts[i], completions[i - 1]) for i in range(3)]).mean().clamp(min=0)
    rho = torch.stack([log_ratio(p, c) for p, c in zip(prompts, completions)])
    good = torch.tensor([r["label"] for r in rows])
    losses = torch.cat((wd * (1 - torch.sigmoid(beta * (rho[good] - kl))),
                        wu * (1 - torch.sigmoid(beta * (kl - rho[~good])))))
    assert float(kl) > 0

    loss_sum, sums = trainer.compute_loss(trainer.train_batches[0])
    assert float(sums["kl"]) / 3 == pytest.approx(float(kl), rel=1e-4)
    assert float(loss_sum.detach()) / 3 == pytest.approx(float(losses.mean()), rel=1e-4)
    assert float(sums["rewards/chosen"]) == pytest.approx(float(beta * rho[good].sum()), rel=1e-4)
    assert float(sums["rewards/rejected"]) == pytest.approx(float(beta * rho[~good].sum()), rel=1e-4)
    assert (int(sums["_chosen"]), int(sums["_rejected"])) == (2, 1)


def test_apo_zero_unpaired_runs_no_kl_sequences(tmp_path, monkeypatch):
    import fastalign.algorithms.kto as kto

    trainer = kto_trainer(tmp_path, loss_type="apo_zero_unpaired")
    monkeypatch.setattr(kto, "mismatched", lambda batch: pytest.fail("no KL batch for apo_zero_unpaired"))
    _, sums = trainer.compute_loss(trainer.train_batches[0])
    assert float(sums["kl"]) == 0.0


def test_precomputed_reference_gives_the_same_loss(tmp_path):
    live = kto_trainer(tmp_path / "live")
    pre = kto_trainer(tmp_path / "pre", precompute_ref_log_probs=True)
    assert pre.ref_model is None  # freed after the one pass
    for a, b in zip(live.compute_loss(live.train_batches[0]), pre.compute_loss(pre.train_batches[0])):
        if isinstance(a, dict):
            assert {k: pytest.approx(float(v), rel=1e-5) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
        else:
            assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)


def test_trains_and_logs_trl_metric_names(tmp_path):
    rows = unpair(make_preference_pairs(16, seed=0))
    trainer = kto_trainer(tmp_path, rows=rows, max_steps=2, logging_steps=1, max_tokens_per_batch=128)
    result = trainer.train()
    assert result["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
            "rewards/margins"} <= set(records[0])
    assert not any(k.startswith("_") for r in records for k in r)


def test_per_label_means_and_missing_labels():
    # Shares 0.5 / 0.5 of the rows: sums over rows / rows -> means over each label's rows.
    got = per_label({"rewards/chosen": 0.2, "rewards/rejected": 0.1, "logps/chosen": -1.0, "logps/rejected": -2.0,
                     "_chosen": 0.5, "_rejected": 0.5, "kl": 0.3})
    assert got == pytest.approx({"rewards/chosen": 0.4, "rewards/rejected": 0.2, "rewards/margins": 0.2,
                                 "logps/chosen": -2.0, "logps/rejected": -4.0, "kl": 0.3})
    only = per_label({"eval/rewards/chosen": 0.0, "eval/rewards/rejected": 0.3, "eval/logps/chosen": 0.0,
                      "eval/logps/rejected": -1.0, "eval/_chosen": 0.0, "eval/_rejected": 1.0}, "eval/")
    assert only == pytest.approx({"eval/rewards/rejected": 0.3, "eval/logps/rejected": -1.0})


@pytest.mark.parametrize("label,message", [
    ("yes", "row 1, column 'label': expected true (desirable) or false (undesirable), got 'yes'"),
    (None, "row 1, column 'label': expected true (desirable) or false (undesirable), got null"),
    (2, "got 2"),
])
def test_a_bad_label_names_its_row(label, message):
    rows = [dict(ROWS[0]), {**ROWS[1], "label": label}]
    with pytest.raises(DataError, match=re.escape(message)):
        UnpairedEncoder(char_tokenizer())(rows, [0, 1])


def test_a_missing_label_or_completion_names_its_row():
    with pytest.raises(DataError, match="row 0, column 'label': missing"):
        UnpairedEncoder(char_tokenizer())([{"prompt": "1=", "completion": "1"}], [0])
    with pytest.raises(DataError, match="row 3, column 'completion'"):
        UnpairedEncoder(char_tokenizer())([{"prompt": "1=", "label": True}], [3])


def test_unpaired_rows_store_their_label():
    out = UnpairedEncoder(char_tokenizer())([ROWS[0], {**ROWS[1], "label": 0}], [0, 1])
    assert out["label"] == [True, False] and out["prompt"][0] > 0 and len(out["ids"][0]) > out["prompt"][0]
