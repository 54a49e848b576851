"""The mappings of fastalign.trl, one by one: TrainingArguments to native configs, row counts to
token budgets, optimizers, metric names and results, the PPO building blocks, the collator, the
clear errors for what is not supported."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

from fastalign.errors import ConfigError
from fastalign.trl import (
    AutoModelForCausalLMWithValueHead,
    DataCollatorForCompletionOnlyLM,
    DPOTrainer,
    IterativeSFTTrainer,
    PPOConfig,
    PPOTrainer,
    SFTTrainer,
)
from fastalign.trl.args import map_training_arguments
from fastalign.trl.core import LengthSampler, logprobs_from_logits
from fastalign.trl.trainer import RunningMoments
from helpers import tiny_t5

ROWS = [{"text": "x" * n} for n in (10, 20, 30, 40, 50, 60, 70, 80)]
PAIRS = [{"prompt": f"q{i}?", "chosen": " yes" * (i + 1), "rejected": " no"} for i in range(8)]


def args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, **kw)


@pytest.fixture(scope="module")
def model_dir(assets):
    return str(assets / "tiny")


def sft(model_dir, tmp_path, rows=ROWS, **kw):
    training = kw.pop("args", None) or args(tmp_path, max_steps=2, per_device_train_batch_size=2)
    return SFTTrainer(model_dir, args=training, train_dataset=Dataset.from_list(rows), max_seq_length=128, **kw)


# ---- TrainingArguments -> native configs ---------------------------------------------------------
def test_training_arguments_map_field_by_field(tmp_path):
    from fastalign.algorithms import SFTConfig

    a = args(tmp_path, learning_rate=3e-4, num_train_epochs=2, warmup_steps=5, lr_scheduler_type="cosine",
             weight_decay=0.1, gradient_accumulation_steps=4, eval_strategy="steps", eval_steps=7, save_steps=9,
             save_total_limit=3, logging_steps=2, max_grad_norm=0.5, seed=3, remove_unused_columns=False)
    f = map_training_arguments(a, set(SFTConfig.__dataclass_fields__)).fields
    assert f["learning_rate"] == 3e-4 and f["num_train_epochs"] == 2 and f["warmup_steps"] == 5
    assert f["lr_scheduler_type"] == "cosine" and f["weight_decay"] == 0.1 and f["gradient_accumulation_steps"] == 4
    assert (f["eval_steps"], f["save_steps"], f["save_total_limit"], f["logging_steps"]) == (7, 9, 3, 2)
    assert f["max_grad_norm"] == 0.5 and f["seed"] == 3 and f["output_dir"].endswith("out")


def test_trl_era_names_and_what_changes_results(tmp_path):
    from fastalign.algorithms import SFTConfig

    fields = set(SFTConfig.__dataclass_fields__)
    legacy = args(tmp_path, evaluation_strategy="steps", eval_steps=3)  # removed from transformers, accepted
    assert map_training_arguments(legacy, fields).fields["eval_steps"] == 3
    with pytest.warns(UserWarning, match="fp16=True runs as bfloat16"):
        assert map_training_arguments(args(tmp_path, fp16=True), fields).fields["bf16"] is True
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        map_training_arguments(args(tmp_path, label_smoothing_factor=0.1), fields)
    with pytest.raises(ConfigError, match="lr_scheduler_type='polynomial'"):
        map_training_arguments(args(tmp_path, lr_scheduler_type="polynomial"), fields)
    with pytest.raises(ConfigError, match="whole epochs"):
        map_training_arguments(args(tmp_path, num_train_epochs=1.5), fields)
    harmless = args(tmp_path, dataloader_num_workers=4, group_by_length=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # harmless fields: no warning
        map_training_arguments(harmless, fields)


def test_defaults_are_transformers(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SFTTrainer(model_dir, train_dataset=Dataset.from_list(ROWS), dataset_text_field="text")
    assert trainer.args.num_train_epochs == 3 and trainer.args.learning_rate == 5e-5
    assert trainer.args.output_dir == "tmp_trainer" and trainer.args.max_length == 1024


def test_row_counts_become_a_token_budget(model_dir, tmp_path):
    trainer = sft(model_dir, tmp_path)
    longest = int(trainer.train_batches.store.lengths.max())
    assert trainer.args.max_tokens_per_batch == 2 * longest
    assert all(len(units) >= 2 for units in trainer.train_batches.plan)
    assert trainer.steps_per_epoch <= 4  # 8 rows, 2 or more a micro-batch
    budget = sft(model_dir, tmp_path, max_tokens_per_batch=100)
    assert budget.args.max_tokens_per_batch == 100


def test_optim_and_epoch_strategies(model_dir, tmp_path):
    a = args(tmp_path, max_steps=2, optim="rmsprop", eval_strategy="epoch", save_strategy="epoch",
             per_device_train_batch_size=4)
    trainer = sft(model_dir, tmp_path, args=a, eval_dataset=Dataset.from_list(ROWS[:2]))
    assert isinstance(trainer.engine.optimizer, torch.optim.RMSprop)
    assert trainer.args.eval_steps == trainer.steps_per_epoch == trainer.args.save_steps


# ---- results, names, callbacks ---------------------------------------------------------------------
def test_train_output_log_history_and_callbacks(model_dir, tmp_path):
    seen = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    a = args(tmp_path, max_steps=3, per_device_train_batch_size=2, logging_steps=2, logging_first_step=True)
    trainer = sft(model_dir, tmp_path, args=a, eval_dataset=Dataset.from_list(ROWS[:2]), callbacks=[Record()])
    out = trainer.train()
    assert isinstance(out, TrainOutput) and out.global_step == 3
    assert {"train_runtime", "train_samples_per_second", "train_loss", "epoch"} <= set(out.metrics)
    steps = [r["step"] for r in trainer.state.log_history]
    assert steps[:3] == [1, 2, 3]  # logging_first_step, then every 2 steps and the last
    assert "learning_rate" in seen[0] and "lr" not in seen[0]
    assert "eval_loss" in trainer.state.log_history[-2] and "train_runtime" in trainer.state.log_history[-1]
    assert "eval_loss" in trainer.evaluate()


def test_push_to_hub_fails_in_one_line_and_model_card(model_dir, tmp_path, offline):
    trainer = sft(model_dir, tmp_path)
    with pytest.raises(ConfigError, match="push_to_hub: the Hugging Face Hub cannot be reached"):
        trainer.push_to_hub()
    assert "SFTTrainer" in (tmp_path / "out" / "README.md").read_text()


def test_sft_predict_and_completion_collator(model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    collator = DataCollatorForCompletionOnlyLM(" ### Answer:", tokenizer=tokenizer)
    batch = collator([tokenizer("Q: 1+1 ### Answer: 2"), tokenizer("Q: two plus two ### Answer: 4")])
    kept = [tokenizer.decode([t for t in row if t != -100]) for row in batch["labels"].tolist()]
    assert kept == [" 2", " 4"]
    rows = [{"text": f"Q: {i} ### Answer: {i}"} for i in range(4)]
    trainer = sft(model_dir, tmp_path, rows=rows, data_collator=collator)
    store = trainer.train_batches.store
    assert int(store.weights[store.kept].max()) <= 2  # " i": the answer alone carries the loss
    assert trainer.predict(Dataset.from_list(rows)).predictions.shape == (4,)


def test_formatting_func_batched_as_in_trl(model_dir, tmp_path):
    with pytest.raises(ValueError, match="should return a list of processed strings"):
        sft(model_dir, tmp_path, formatting_func=lambda batch: "one string")


# ---- DPO -------------------------------------------------------------------------------------------
def test_dpo_signature_loss_and_game_log(model_dir, tmp_path):
    a = args(tmp_path, max_steps=1, per_device_train_batch_size=2)
    trainer = DPOTrainer(model_dir, None, beta=0.2, loss_type="ipo", args=a, train_dataset=PAIRS,
                         eval_dataset=PAIRS[:2], label_pad_token_id=-1, max_length=64, max_prompt_length=16,
                         max_target_length=32, generate_during_eval=True, padding_value=0)
    assert trainer.args.beta == 0.2 and trainer.args.average_log_prob  # ipo averages, as in TRL
    logps = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, chosen, rejected = trainer.dpo_loss(*logps, True)  # the fifth positional: reference_free
    assert torch.allclose(chosen - rejected, torch.tensor([0.2]))
    trainer.train()
    game = [json.loads(line) for line in (tmp_path / "out" / "game_log.jsonl").read_text().splitlines()]
    assert len(game) == 2 and {"prompt", "policy", "ref_model"} <= set(game[0])
    assert trainer.predict(PAIRS[:3]).predictions.shape == (3, 2)


def test_dpo_logits_metric_is_the_mean_logit(model_dir, tmp_path):
    a = args(tmp_path, max_steps=1, per_device_train_batch_size=1)
    trainer = DPOTrainer(model_dir, args=a, train_dataset=PAIRS[:1], max_length=64, max_prompt_length=16)
    batch = trainer.train_batches[0].to(trainer.engine.device)
    _, sums = trainer.compute_loss(batch)
    start, end = int(batch.cu_seqlens[0]), int(batch.cu_seqlens[1])
    with torch.no_grad():
        logits = trainer.model(batch.input_ids[:, start:end]).logits
    assert torch.allclose(sums["logits/chosen"], logits.mean(), atol=1e-4)


# ---- iterative SFT -----------------------------------------------------------------------------------
def test_iterative_sft_args_and_evaluate(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = IterativeSFTTrainer(model, args(tmp_path, per_device_train_batch_size=2, learning_rate=1e-3))
    assert trainer.batch_size == 2 and trainer.args.learning_rate == 1e-3
    stats = trainer.step(texts=["1+1=2", "2+2=4", "3+3=6", "4+4=8"])
    assert stats["optimizer_steps"] == 2
    out = trainer.evaluate(Dataset.from_list([{"text": "5+5=10"}]))
    assert set(out) == {"eval_loss"} and trainer.state.log_history[-1]["eval_loss"] == out["eval_loss"]


# ---- models ----------------------------------------------------------------------------------------
def test_value_head_from_pretrained_keeps_lora(model_dir):
    from peft import LoraConfig

    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"),
                                                              device_map=None, trust_remote_code=False)
    assert model.is_peft_model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("v_head") for n in trained)
    with pytest.raises(ValueError, match="use AutoModelForSeq2SeqLMWithValueHead"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_t5())


# ---- PPO -------------------------------------------------------------------------------------------
def test_ppo_config_and_building_blocks(model_dir, tmp_path):
    config = PPOConfig(model_name=model_dir, query_dataset="imdb", reward_model="sentiment-analysis:x",
                       log_with=None, tracker_kwargs={}, accelerator_kwargs={}, project_kwargs={}, exp_name="t",
                       forward_batch_size=None, batch_size=2, mini_batch_size=2, output_dir=str(tmp_path / "ppo"))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(config.model_name)
    trainer = PPOTrainer(config, model, None, AutoTokenizer.from_pretrained(model_dir))
    acc = trainer.accelerator
    assert acc.device == trainer.current_device and acc.is_main_process and acc.num_processes == 1
    assert acc.unwrap_model(trainer.model) is trainer.model
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    responses = [torch.tensor([10, 11]), torch.tensor([12, 13, 14])]
    logprobs, logits, values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, None, True)
    assert logprobs.shape == values.shape == masks.shape == (2, 4) and logits.shape[:2] == (2, 4)
    assert masks.sum(1).tolist() == [2, 3]
    rewards, non_score, kls = trainer.compute_rewards(torch.tensor([1.0, 0.0]), logprobs.detach(), logprobs.detach(),
                                                      masks)
    vals, advantages, returns = trainer.compute_advantages(values.detach(), rewards, masks)
    stats = trainer.train_minibatch(logprobs.detach(), vals, logprobs, logits, values, masks, advantages, returns)
    assert "policy/approxkl" in stats and "policy/entropy" in stats
    recorded = trainer.record_step_stats(0.2, scores=torch.tensor([1.0, 0.0]), logprobs=logprobs.detach(),
                                         ref_logprobs=logprobs.detach(), non_score_reward=non_score, masks=masks,
                                         train_stats=stats, queries=queries, responses=responses, kls=kls)
    assert {"objective/kl", "objective/logprobs", "ppo/policy/entropy", "ppo/val/var_explained"} <= set(recorded)
    assert trainer.gather_stats(recorded) is recorded
    loader = trainer.prepare_dataloader([{"query": "a", "input_ids": torch.tensor([5])}] * 4)
    assert len(loader) == 2
    trainer.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "README.md").exists() and (tmp_path / "saved" / "value_head.safetensors").exists()
    assert RunningMoments(acc).update(torch.tensor([1.0, 3.0]))[0] == 2.0


def test_core_helpers():
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(logprobs_from_logits(logits, labels), expected, atol=1e-5)
    assert all(2 <= LengthSampler(2, 5)() < 5 for _ in range(20))


# ---- what is not there, and the layering ---------------------------------------------------------------
def test_unsupported_names_say_why():
    with pytest.raises(ImportError, match="text environments"):
        from fastalign.trl import TextEnvironment  # noqa: F401


def test_nothing_else_imports_the_layer():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["grep", "-rlE", r"fastalign\.trl|from \.+trl", "fastalign", "kernels", "--include=*.py"],
                         cwd=root, capture_output=True, text=True).stdout.split()
    assert all(path.startswith("fastalign/trl/") for path in out), out
    code = "import sys, fastalign.algorithms, fastalign.cli; print('fastalign.trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
