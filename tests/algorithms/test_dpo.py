"""DPOTrainer: the packed fused path against the plain padded one, the reference options, metrics."""

import copy
import json

import pytest
import torch

from fastalign.algorithms import DPOConfig, DPOTrainer
from fastalign.data import IGNORE_INDEX, tokenize_pairs
from fastalign.functional import LOSS_TYPES, dpo_loss, get_batch_logps
from fastalign.models import sequence_logprobs
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks.sort_digits import make_preference_pairs
from helpers import assert_close

TOK = char_tokenizer()
ROWS = make_preference_pairs(12, seed=3)


def small(seed):
    return tiny_model("llama", hidden_size=32, layers=2, heads=2, seed=seed)


def config(tmp_path, **kw):
    kw = {"output_dir": str(tmp_path), "max_tokens_per_batch": 4096, "disable_tqdm": True, "seed": 0,
          "learning_rate": 1e-2, **kw}
    return DPOConfig(**kw)


def stored_pairs(args):
    """``ROWS`` as the trainer tokenizes and truncates them, as ``Pair``s."""
    pairs, _ = tokenize_pairs(ROWS, TOK, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                              truncation_mode=args.truncation_mode)
    return pairs


def padded_logps(model, pairs, average):
    """The plain path: chosen and rejected of every pair right-padded into one [2P, T] batch, one
    forward with an attention mask, then ``get_batch_logps`` (chosen rows first)."""
    seqs = [p.chosen_prompt + p.chosen for p in pairs] + [p.rejected_prompt + p.rejected for p in pairs]
    prompts = [len(p.chosen_prompt) for p in pairs] + [len(p.rejected_prompt) for p in pairs]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (s, n) in enumerate(zip(seqs, prompts)):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        labels[i, n:len(s)] = torch.tensor(s[n:])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = get_batch_logps(logits, labels, average_log_prob=average)
    return logps[:len(pairs)], logps[len(pairs):]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_packed_fused_loss_and_gradients_equal_the_padded_path(tmp_path, loss_type):
    kw = {"label_smoothing": 0.1} if loss_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_pair") else {}
    trainer = DPOTrainer(small(1), ref_model=small(2), args=config(tmp_path, loss_type=loss_type, beta=0.3, **kw),
                         train_dataset=ROWS, tokenizer=TOK)
    (batch,) = trainer.train_batches  # every pair in one packed row
    model = trainer.model
    # Packed: one forward of all 24 sequences, the fused loss from the hidden states.
    loss_sum, sums = trainer.compute_loss(batch)
    n = batch.chosen.numel()
    (loss_sum / n).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # Padded: two models' padded forwards, get_batch_logps, dpo_loss.
    pairs = stored_pairs(trainer.args)
    avg = trainer.args.average_log_prob
    pi_c, pi_r = padded_logps(model, pairs, avg)
    with torch.no_grad():
        ref_c, ref_r = padded_logps(trainer.ref_model, pairs, avg)
    losses, c, r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.3, loss_type=loss_type, **kw)
    losses.mean().backward()
    assert_close(loss_sum / n, losses.mean(), 1e-5, "loss")
    assert_close(sums["rewards/chosen"] / n, c.mean(), 1e-5, "rewards/chosen")
    assert_close(sums["logps/rejected"] / n, pi_r.mean(), 1e-5, "logps/rejected")
    assert_close(sums["rewards/accuracies"] / n, (c > r).float().mean(), 1e-5, "accuracies")
    for k, p in model.named_parameters():
        assert_close(packed[k], p.grad, 1e-5, f"grad {k}")


def test_a_step_over_several_micro_batches_is_the_mean_over_all_pairs(tmp_path):
    """Pairs packed into several micro-batches: the step's gradient is that of the padded path's
    mean loss over every pair (read off an SGD step with a learning rate large enough that the
    update, not the rounding of the weights, dominates the difference)."""
    args = config(tmp_path, max_tokens_per_batch=64, max_steps=1, gradient_accumulation_steps=8, max_grad_norm=None)
    model = small(1)
    start = copy.deepcopy(model)
    trainer = DPOTrainer(model, ref_model=small(2), args=args, train_dataset=ROWS, tokenizer=TOK,
                         optimizers=(torch.optim.SGD(model.parameters(), lr=1e4), None))
    assert 1 < len(trainer.train_batches) <= 8
    pairs = stored_pairs(args)
    pi_c, pi_r = padded_logps(start, pairs, False)
    with torch.no_grad():
        ref_c, ref_r = padded_logps(trainer.ref_model, pairs, False)
    losses, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    losses.mean().backward()
    trainer.train()
    for (k, p), q in zip(model.named_parameters(), start.parameters()):
        assert_close((q.detach() - p.detach()) / 1e4, q.grad, 1e-5, k)


def test_precomputed_reference_equals_the_reference_model(tmp_path):
    on_the_fly = DPOTrainer(small(1), args=config(tmp_path / "a", max_steps=3, max_tokens_per_batch=64),
                            train_dataset=ROWS, eval_dataset=ROWS[:4], tokenizer=TOK)
    pre = DPOTrainer(small(1), args=config(tmp_path / "b", max_steps=3, max_tokens_per_batch=64,
                                           precompute_ref_log_probs=True),
                     train_dataset=ROWS, eval_dataset=ROWS[:4], tokenizer=TOK)
    assert pre.ref_model is None  # no second model kept: the log-probs ride with the batches
    for a, b in zip([*on_the_fly.train_batches, *on_the_fly.eval_batches], [*pre.train_batches, *pre.eval_batches]):
        assert_close(b.extras["ref_logps"], on_the_fly.reference_logps(a), 1e-6, "ref logps")
    ra, rb = on_the_fly.train(), pre.train()
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
    assert ra["eval/loss"] == pytest.approx(rb["eval/loss"], rel=1e-6)


def test_separate_reference_stays_frozen(tmp_path):
    ref = small(2)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer = DPOTrainer(small(1), ref_model=ref, args=config(tmp_path, max_steps=2), train_dataset=ROWS, tokenizer=TOK)
    trainer.train()
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())


def test_default_reference_is_the_model_before_training(tmp_path):
    model = small(1)
    start = copy.deepcopy(model)
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=2), train_dataset=ROWS, tokenizer=TOK)
    trainer.train()
    (batch,) = trainer.train_batches
    assert_close(trainer.reference_logps(batch), sequence_logprobs(start.eval(), batch), 1e-6, "ref")
    assert not torch.allclose(sequence_logprobs(model, batch), sequence_logprobs(start, batch))


def test_peft_reference_is_the_model_with_adapters_disabled(tmp_path):
    from peft import LoraConfig

    base = small(1)
    start = copy.deepcopy(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(base, args=config(tmp_path, max_steps=3), train_dataset=ROWS, tokenizer=TOK, peft_config=lora)
    assert trainer.ref_model is None and trainer.is_peft  # no second copy of the model
    trainer.train()
    (batch,) = trainer.train_batches
    assert_close(trainer.reference_logps(batch), sequence_logprobs(start.eval(), batch), 1e-6, "adapters off")
    policy = sequence_logprobs(trainer.model, batch)
    assert (policy - trainer.reference_logps(batch)).abs().max() > 1e-3  # the adapters did learn
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_ref_adapter_name_computes_the_reference_with_that_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(small(1), lora)
    model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                        task_type="CAUSAL_LM"))
    model.set_adapter("default")
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=1, ref_adapter_name="ref", model_adapter_name="default"),
                         train_dataset=ROWS, tokenizer=TOK)
    (batch,) = trainer.train_batches
    ref = trainer.reference_logps(batch)
    assert model.active_adapter == "default"
    model.set_adapter("ref")
    with torch.no_grad():
        want = sequence_logprobs(model.eval(), batch)
    model.set_adapter("default")
    assert_close(ref, want, 1e-6, "ref adapter")
    assert not torch.allclose(ref, sequence_logprobs(model, batch))  # differs from the trained adapter
    trainer.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_reference_free_uses_no_reference(tmp_path):
    trainer = DPOTrainer(small(1), args=config(tmp_path, reference_free=True, beta=0.5), train_dataset=ROWS, tokenizer=TOK)
    assert trainer.ref_model is None
    (batch,) = trainer.train_batches
    _, sums = trainer.compute_loss(batch)
    assert sums["rewards/chosen"] == pytest.approx(0.5 * float(sums["logps/chosen"]), rel=1e-6)


def test_metrics_use_trl_names(tmp_path):
    trainer = DPOTrainer(small(1), args=config(tmp_path, max_steps=2, eval_steps=1, max_tokens_per_batch=64),
                         train_dataset=ROWS, eval_dataset=ROWS[:4], tokenizer=TOK)
    result = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "tokens_per_s", "peak_memory_gb", "padding_fraction"}
    assert names <= set(train[-1]) and train[-1]["padding_fraction"] == 0
    assert train[-1]["peak_memory_gb"] > 0 and 0 <= train[-1]["rewards/accuracies"] <= 1
    assert {f"eval/{n}" for n in ("loss", "rewards/accuracies", "rewards/margins")} <= set(result)
    r = train[-1]
    assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], rel=1e-5, abs=1e-7)


def test_average_log_prob_defaults_on_for_ipo_only():
    assert DPOConfig(loss_type="ipo").average_log_prob is True
    assert DPOConfig(loss_type="sigmoid").average_log_prob is False
    assert DPOConfig(loss_type="ipo", average_log_prob=False).average_log_prob is False
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(loss_type="dpo")


def test_disable_dropout(tmp_path):
    model = small(1)
    model.model.layers[0].self_attn.attention_dropout = 0.3
    DPOTrainer(model, args=config(tmp_path), train_dataset=ROWS, tokenizer=TOK)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


def test_a_pair_longer_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="max_tokens_per_batch=16"):
        DPOTrainer(small(1), args=config(tmp_path, max_tokens_per_batch=16), train_dataset=ROWS, tokenizer=TOK)
