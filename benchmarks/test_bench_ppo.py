"""One PPO step, phase by phase: fastalign's packed step against a padded TRL 0.7.10-style step.

Workload: 64 samples per step, prompts of 8-64 tokens and responses of 8-128 tokens drawn
uniformly (uneven, as sampled answers are), a random Llama (hidden 256, 4 layers, 8 heads,
vocabulary 8,192) as policy with a value head, a frozen copy as reference, a reward model of the
same shape. PPO: 4 epochs in mini-batches of 16, TRL's defaults otherwise, fp32, AdamW 1e-5.

Phases, each timed in the same process, interleaved round by round:

- generation: ``PPOTrainer.generate`` (left-padded batches of 16, 8-128 new tokens, no early end);
  the same call serves both paths (TRL generates the same way), so it is reported once;
- scoring: the reward model over query+response, packed rows (``PPOTrainer.score``) against one
  padded batch through the classifier's own forward;
- forward passes: the policy (log-probs, values) and the reference (log-probs); packed, the heads
  only at response tokens, against padded full-width logits for every position;
- rewards and GAE: the fused KL shaping and the scan over ``[B, longest response]`` against TRL's
  shaping and its per-step Python loop over the full padded width;
- optimisation: the 16 mini-batch forwards/backwards and 4 optimizer steps, packed rows against
  mini-batches sliced from the padded batch (as TRL does).

The padded path is ``tests/ppo_padded.py`` (plain torch, checked against TRL 0.7.10 itself). The
table goes to benchmarks/out/ppo.md (and stdout). ``FASTALIGN_BENCH_QUICK=1``: 1 round, 16 samples.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ppo_padded import _pad_inputs, padded_ppo_step  # noqa: E402

from fastalign.algorithms import PPOConfig, PPOTrainer  # noqa: E402
from fastalign.models import CausalLMWithValueHead, as_reward_model  # noqa: E402
from fastalign.models.tiny import tiny_model  # noqa: E402

OUT = Path(__file__).parent / "out"
QUICK = os.environ.get("FASTALIGN_BENCH_QUICK") == "1"
BATCH = 16 if QUICK else 64
ROUNDS = 1 if QUICK else 3
MODEL = dict(vocab_size=8192, hidden_size=256, layers=4, heads=8, max_positions=256)
PHASES = ["generation", "scoring", "forward_pass", "rewards_and_gae", "optimize_step"]


class _Tok:
    """What PPOTrainer reads of a tokenizer, for token-id workloads."""

    pad_token_id, eos_token_id = 0, 2


def _samples(seed):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(4, MODEL["vocab_size"], (int(torch.randint(8, 65, (1,), generator=g)),), generator=g)
               for _ in range(BATCH)]
    lengths = [int(torch.randint(8, 129, (1,), generator=g)) for _ in range(BATCH)]
    return queries, lengths


def _padded_scores(reward, queries, responses):
    ids, attention = _pad_inputs(queries, responses, 0, "cpu")
    with torch.no_grad():
        return reward(input_ids=ids, attention_mask=attention).logits[:, 0]


def _run(results):
    torch.manual_seed(0)
    lm = tiny_model("llama", **MODEL, seed=0)
    reward = as_reward_model(tiny_model("llama", **MODEL, seed=1)).eval()
    reward.config.pad_token_id = 0
    padded_policy = CausalLMWithValueHead(copy.deepcopy(lm), summary_dropout_prob=0.0)
    padded_ref = copy.deepcopy(lm).eval()
    padded_reward = copy.deepcopy(reward)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=BATCH // 4, ppo_epochs=4, learning_rate=1e-5,
                       output_dir=str(OUT / "ppo_run"), disable_tqdm=True, max_tokens_per_batch=8192)
    trainer = PPOTrainer(config, CausalLMWithValueHead(lm, summary_dropout_prob=0.0), tokenizer=_Tok(),
                         reward_model=reward)
    padded_opt = torch.optim.AdamW(padded_policy.parameters(), lr=1e-5)
    for rnd in range(ROUNDS):
        queries, lengths = _samples(rnd)
        t = time.perf_counter()
        responses = []
        for k in range(0, BATCH, 16):  # one length per generation batch: every answer runs its full length
            responses += trainer.generate(queries[k:k + 16], batch_size=16, return_prompt=False, do_sample=True,
                                          top_k=0, top_p=1.0, max_new_tokens=max(lengths[k:k + 16]), eos_token_id=None)
        responses = [r[:n] for r, n in zip(responses, lengths)]
        results["generation"].append(time.perf_counter() - t)
        real = sum(len(q) + len(r) for q, r in zip(queries, responses))
        width = max(len(q) + len(r) for q, r in zip(queries, responses))
        results["tokens"] = (real, width * BATCH)

        t = time.perf_counter()
        scores = trainer.score(queries, responses)
        results["fastalign", "scoring"].append(time.perf_counter() - t)
        t = time.perf_counter()
        padded = _padded_scores(padded_reward, queries, responses)
        results["padded", "scoring"].append(time.perf_counter() - t)
        assert torch.allclose(scores, padded, atol=1e-4)

        stats = trainer.step(queries, responses, scores)
        results["fastalign", "forward_pass"].append(stats["time/ppo/forward_pass"])
        results["fastalign", "rewards_and_gae"].append(stats["time/ppo/compute_rewards"] + stats["time/ppo/compute_advantages"])
        results["fastalign", "optimize_step"].append(stats["time/ppo/optimize_step"])
        results["fastalign", "step"].append(stats["time/ppo/total"])

        timings = {}
        g = torch.Generator().manual_seed(rnd)
        t = time.perf_counter()
        padded_ppo_step(padded_policy, padded_ref, padded_opt, queries, responses, scores, kl_coef=0.2,
                        permutations=[torch.randperm(BATCH, generator=g).tolist() for _ in range(4)],
                        mini_batch_size=BATCH // 4, ppo_epochs=4, pad_token_id=0, timings=timings)
        results["padded", "step"].append(time.perf_counter() - t)
        results["padded", "forward_pass"].append(timings["forward_pass"])
        results["padded", "rewards_and_gae"].append(timings["compute_rewards"] + timings["compute_advantages"])
        results["padded", "optimize_step"].append(timings["optimize_step"])


def _table(results) -> str:
    med = {k: statistics.median(v) for k, v in results.items() if isinstance(v, list)}
    real, padded = results["tokens"]
    gen = med["generation"]
    rows = ["| phase | fastalign (packed) s | padded, TRL 0.7.10-style s | padded / fastalign |", "|---|---|---|---|",
            f"| generation (shared) | {gen:.3f} | {gen:.3f} | 1.00 |"]
    for phase in PHASES[1:]:
        a, b = med["fastalign", phase], med["padded", phase]
        rows.append(f"| {phase.replace('_', ' ')} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    a = sum(med["fastalign", p] for p in PHASES[1:]) + gen
    b = sum(med["padded", p] for p in PHASES[1:]) + gen
    rows.append(f"| whole step | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    head = (f"PPO step, {date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"{BATCH} samples, {real} real tokens ({padded} padded: {1 - real / padded:.1%} pad); medians of "
            f"{ROUNDS} rounds.")
    return head + "\n\n" + "\n".join(rows) + "\n"


@pytest.mark.benchmark(group="ppo step")
def test_ppo_step_by_phase(benchmark):
    results = {k: [] for k in ["generation"] + [(p, ph) for p in ("fastalign", "padded") for ph in PHASES[1:] + ["step"]]}
    benchmark.pedantic(_run, args=(results,), rounds=1, iterations=1)
    table = _table(results)
    OUT.mkdir(exist_ok=True)
    (OUT / "ppo.md").write_text(table)
    print("\n" + table)
    med = {k: statistics.median(v) for k, v in results.items() if isinstance(v, list)}
    assert med["fastalign", "forward_pass"] > 0 and med["padded", "forward_pass"] > 0
