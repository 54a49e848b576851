"""RewardTrainer: packed scores equal the classifier's own, the loss (margin, centering), PEFT, saving."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from fastalign.algorithms import RewardConfig, RewardTrainer
from fastalign.models import as_reward_model, packed_scores
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks.sort_digits import make_preference_pairs
from helpers import assert_close

TOK = char_tokenizer()
ROWS = make_preference_pairs(10, seed=5)


def small(seed=1):
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=seed)


def config(tmp_path, **kw):
    return RewardConfig(**{"output_dir": str(tmp_path), "max_tokens_per_batch": 4096, "disable_tqdm": True,
                           "learning_rate": 1e-2, **kw})


def own_scores(model, batch):
    """Each sequence scored alone by the classifier's own forward (transformers' last-token pick)."""
    cu = batch.cu_seqlens.tolist()
    return torch.cat([model(input_ids=batch.input_ids[:, a:b]).logits[:, 0] for a, b in zip(cu, cu[1:])]).float()


def test_a_causal_lm_becomes_a_scalar_classifier_with_its_body():
    lm = small()
    rm = as_reward_model(lm)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, rm.model.state_dict()[k])


def test_packed_scores_equal_the_classifiers_own_forward(tmp_path):
    trainer = RewardTrainer(small(), args=config(tmp_path), train_dataset=ROWS, tokenizer=TOK)
    (batch,) = trainer.train_batches
    with torch.no_grad():
        assert_close(packed_scores(trainer.model, batch), own_scores(trainer.model, batch), 1e-5, "scores")


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_loss_and_gradients_equal_the_plain_path(tmp_path, margin, center):
    rows = [dict(r, margin=0.5 * i) for i, r in enumerate(ROWS)] if margin else ROWS
    trainer = RewardTrainer(small(), args=config(tmp_path, center_rewards_coefficient=center), train_dataset=rows,
                            tokenizer=TOK)
    (batch,) = trainer.train_batches
    model = trainer.model
    loss_sum, sums = trainer.compute_loss(batch)
    n = batch.chosen.numel()
    (loss_sum / n).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    scores = own_scores(model, batch)
    r_c, r_r = scores[batch.chosen], scores[batch.rejected]
    m = batch.extras["margin"][batch.chosen] if margin else 0.0
    loss = -F.logsigmoid(r_c - r_r - m).mean() + (center or 0.0) * ((r_c + r_r) ** 2).mean()
    loss.backward()
    assert_close(loss_sum / n, loss, 1e-5, "loss")
    assert sums["accuracy"] / n == pytest.approx(float((r_c > r_r).float().mean()))
    assert_close(sums["margin"] / n, (r_c - r_r).mean(), 1e-5, "margin")
    for k, p in model.named_parameters():
        assert_close(packed[k], p.grad, 1e-5, k)
    if margin:  # the margin is really used: without it the loss differs
        assert abs(float(loss.detach() + F.logsigmoid(r_c - r_r).detach().mean())) > 1e-3


def parity_pairs(n, seed):
    """Pairs a reward model can learn in a few steps: the chosen answer ends in an even digit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        stem = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": stem + "=", "chosen": stem[::-1] + rng.choice("02468"),
                     "rejected": stem[::-1] + rng.choice("13579")})
    return rows


def test_training_raises_pair_accuracy_and_the_model_loads_back(tmp_path):
    trainer = RewardTrainer(small(2), args=config(tmp_path, max_steps=40, learning_rate=3e-3, warmup_ratio=0.1,
                                                     max_tokens_per_batch=256),
                            train_dataset=parity_pairs(400, 0), eval_dataset=parity_pairs(60, 1), tokenizer=TOK)
    before = trainer.evaluate()["eval/accuracy"]
    result = trainer.train()
    assert result["eval/accuracy"] >= 0.95 and before < 0.8, (before, result["eval/accuracy"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(records[0])
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = trainer.eval_batches[0]
    with torch.no_grad():
        assert_close(own_scores(loaded, batch), trainer.score(batch), 1e-5, "reloaded scores")


def test_peft_seq_cls_trains_adapters_and_the_head_only(tmp_path):
    from peft import LoraConfig, TaskType

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS)
    trainer = RewardTrainer(small(), args=config(tmp_path, max_steps=3), train_dataset=ROWS, tokenizer=TOK,
                            peft_config=lora)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all("lora_" in k or "score" in k for k in changed)
    assert any("score" in k for k in changed)
    assert (tmp_path / "adapter_model.safetensors").exists()
