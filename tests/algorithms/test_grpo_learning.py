"""GRPO and RLOO learn on the built-in task: after the demo's short SFT, 120 steps with the task's
graded sortedness reward raise the mean reward of the sampled answers by more than 0.2.

Settings: the demo's SFT (40 steps, ``fastalign.demo.DemoSettings``), then 120 optimizer steps of
8 prompts x 8 completions (64 per step, one generation each), 9 new tokens at most, lr 1e-3
constant, TRL's defaults otherwise (GRPO: beta 0, dapo loss; RLOO: beta 0.05). Figures on a 2-core
CPU shared with other processes, mean sampled reward over the first 5 steps -> over the last 10,
for seeds 42 / 0 / 1: GRPO 0.20 -> 0.54 / 0.58 / 0.54 (6-10 s); RLOO 0.20 -> 0.53 / 0.55 / 0.52
(8-20 s; KL to the SFT model 0.4-0.6 nats per token at the end). At lr 2e-3 the gain swung from
+0.17 to +0.37 with the seed; 1e-3 is steadier.
"""

import copy

import pytest
import torch

from fastalign.algorithms import SFTConfig, SFTTrainer
from fastalign.algorithms.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from fastalign.demo import DemoSettings
from fastalign.engine.metrics import read_metrics
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks import sort_digits

STEPS = 120
MARGIN = 0.2


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s, tok = DemoSettings(), char_tokenizer()
    model = tiny_model("llama", hidden_size=s.hidden_size, layers=s.layers, heads=s.heads, seed=0)
    SFTTrainer(model, args=SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), learning_rate=s.sft_learning_rate,
                                     max_steps=s.sft_steps, warmup_ratio=s.sft_warmup_ratio, lr_scheduler_type="cosine",
                                     max_tokens_per_batch=s.max_tokens_per_batch, disable_tqdm=True),
               train_dataset=sort_digits.make_rows(6000, seed=1000), tokenizer=tok).train()
    yield model
    torch.set_num_threads(threads)


def run(tmp_path, sft_model, trainer_class, config_class) -> list[dict]:
    config = config_class(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=64, num_generations=8,
                          max_completion_length=sort_digits.MAX_DIGITS + 1, learning_rate=1e-3,
                          lr_scheduler_type="constant", max_tokens_per_batch=2048, disable_tqdm=True)
    prompts = [{"prompt": r["prompt"]} for r in sort_digits.make_rows(5000, seed=1000)]
    trainer_class(copy.deepcopy(sft_model), "sort_digits", args=config, train_dataset=prompts,
                  processing_class=char_tokenizer()).train()
    log = read_metrics(tmp_path)
    assert len(log) == STEPS
    return log


def mean(records, key):
    return sum(r[key] for r in records) / len(records)


def test_grpo_raises_the_sampled_reward(tmp_path, sft_model):
    log = run(tmp_path, sft_model, GRPOTrainer, GRPOConfig)
    first, last = mean(log[:5], "reward"), mean(log[-10:], "reward")
    assert last > first + MARGIN, (first, last)
    assert "kl" not in log[-1] and log[-1]["rewards/sort_digits/mean"] == pytest.approx(log[-1]["reward"])


def test_rloo_raises_the_sampled_reward(tmp_path, sft_model):
    log = run(tmp_path, sft_model, RLOOTrainer, RLOOConfig)
    first, last = mean(log[:5], "reward"), mean(log[-10:], "reward")
    assert last > first + MARGIN, (first, last)
    assert 0 < log[-1]["kl"] < 5  # the KL to the SFT model, paid in the reward (beta 0.05)
