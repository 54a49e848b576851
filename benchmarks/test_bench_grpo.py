"""One GRPO step, phase by phase: fastalign's packed step against a padded TRL 1.16-style step.

Workload: one generation of 8 prompts x 8 completions (64), prompts of 8-64 tokens and completions
of 8-128 tokens drawn uniformly (uneven, as sampled answers are), a random Llama (hidden 256, 4
layers, 8 heads, vocabulary 8,192) as policy, a frozen copy as reference (``beta`` 0.04), a reward
model of the same shape. GRPO: 2 micro-batches of 32 completions, one optimizer step, 2 iterations
per generation (so the old log-probs are computed, as TRL does then), the dapo loss, fp32.

Phases, each timed in the same process, round by round (each round a fresh copy of the models):

- generation: the policy's ``generate`` over all 64 (``ModelGenerator``: one left-padded batch,
  128 new tokens, cut to the drawn lengths); both paths generate the same way, reported once;
- scoring: the reward model over prompt+completion, packed rows against one right-padded batch
  through the classifier's own forward (TRL's);
- forwards: the policy's old log-probs and the reference's, at completion tokens;
- loss: the 2 micro-batches' forward (log-probs and entropies) and backward, and the step.

The padded path is ``tests/grpo_padded.py`` (plain torch, TRL 1.16's step, checked against
fastalign's to 1e-6 in ``tests/algorithms/test_grpo_trainer.py``) with TRL 1.16's fused lm_head: the body
over the padded ``[64, P + C]`` batch, then the head at the completion tokens only (labels -100 at
the padding), through the same fused ``linear_logprobs`` fastalign uses. So the two differ by the
packing alone. fastalign's figures are the trainer's own phase timings (``time/*``). The table goes
to benchmarks/out/grpo.md (and stdout). ``FASTALIGN_BENCH_QUICK=1``: 1 round, 2 prompts.
"""

from __future__ import annotations

import collections
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

from grpo_padded import padded_batch, padded_steps  # noqa: E402

from benchmarks.test_bench_ppo import _padded_scores  # noqa: E402  (prompt+completion right-padded, TRL's way)
from fastalign.algorithms.grpo import GRPOConfig, GRPOTrainer, ModelGenerator  # noqa: E402
from fastalign.kernels import linear_logprobs  # noqa: E402
from fastalign.models import as_reward_model  # noqa: E402
from fastalign.models.tiny import tiny_model  # noqa: E402

OUT = Path(__file__).parent / "out"
QUICK = os.environ.get("FASTALIGN_BENCH_QUICK") == "1"
PROMPTS, G = (2, 8) if QUICK else (8, 8)
ROUNDS = 1 if QUICK else 3
MODEL = dict(vocab_size=8192, hidden_size=256, layers=4, heads=8, max_positions=256)
PHASES = ["scoring", "forwards", "loss"]


class _Tok:
    """What the trainer reads of a tokenizer, for token-id workloads."""

    pad_token_id, eos_token_id = 0, 2

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)

    def decode(self, ids, skip_special_tokens=True):
        return ""


class Replay:
    """A ``Generator`` handing back completions sampled beforehand, in order."""

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompt_ids, n, **sampling):
        return list(self.completions)


def trl_fused_logprobs(model, ids, attention, P, temperature=1.0, entropy=False):
    """TRL 1.16's forward: the body over the padded batch, the fused head at completion tokens."""
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
    hidden = hidden[:, P - 1:-1]
    labels = ids[:, P:].masked_fill(attention[:, P:] == 0, -100)
    B, C = labels.shape
    out = linear_logprobs(hidden.reshape(B * C, -1), model.lm_head.weight, labels.reshape(-1), temperature=temperature,
                          return_entropy=entropy)
    if entropy:
        return out[0].view(B, C), out[1].view(B, C)
    return out.view(B, C)


def _workload(seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, MODEL["vocab_size"], (int(torch.randint(8, 65, (1,), generator=g)),), generator=g)
               for _ in range(PROMPTS)]
    lengths = [int(torch.randint(8, 129, (1,), generator=g)) for _ in range(PROMPTS * G)]
    return prompts, lengths


def _config(seed):
    return GRPOConfig(output_dir=str(OUT / "grpo_run"), per_device_train_batch_size=PROMPTS * G // 2,
                      gradient_accumulation_steps=2, num_generations=G, num_iterations=2, beta=0.04,
                      max_completion_length=128, learning_rate=1e-5, max_tokens_per_batch=8192, disable_tqdm=True,
                      shuffle_dataset=False, seed=seed)


def _models():
    """The policy and a reward model of its shape (the PPO benchmark's)."""
    torch.manual_seed(0)
    policy, reward = tiny_model("llama", **MODEL, seed=0), as_reward_model(tiny_model("llama", **MODEL, seed=1))
    reward.config.pad_token_id = 0
    return policy, reward.eval()


def _run(results):
    lm, reward = _models()
    for rnd in range(ROUNDS):
        prompts, lengths = _workload(rnd)
        # Generation, shared: all completions in one left-padded batch, 128 new tokens, then cut.
        generator = ModelGenerator(copy.deepcopy(lm), torch.device("cpu"), 0, None)
        t = time.perf_counter()
        sampled = generator.generate(prompts, G, max_new_tokens=max(lengths), top_k=0, top_p=1.0)
        results["generation"].append(time.perf_counter() - t)
        completions = [c[:n] for c, n in zip(sampled, lengths)]
        repeated = [p for p in prompts for _ in range(G)]
        real = sum(len(p) + len(c) for p, c in zip(repeated, completions))
        ids, _, _, _ = padded_batch(repeated, completions, 0)
        results["tokens"] = (real, ids.numel())

        rows = [{"query": "", "input_ids": p.tolist()} for p in prompts]
        trainer = GRPOTrainer(copy.deepcopy(lm), copy.deepcopy(reward), args=_config(rnd), train_dataset=rows,
                              processing_class=_Tok(), generator=Replay(completions))
        trainer.model.train()
        metrics = trainer.train_step(0)
        results["fastalign", "scoring"].append(metrics["time/scoring"])
        results["fastalign", "forwards"].append(metrics["time/logprobs"])
        results["fastalign", "loss"].append(metrics["time/optimization"])

        t = time.perf_counter()
        scores = _padded_scores(reward, repeated, completions)
        results["padded", "scoring"].append(time.perf_counter() - t)
        policy, reference = copy.deepcopy(lm), copy.deepcopy(lm).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        timings = {}
        padded_steps(policy, reference, optimizer, repeated, completions, scores, trainer.rollout.order, trainer.args, 1,
                     timings=timings, logprobs=trl_fused_logprobs)
        results["padded", "forwards"].append(timings["logprobs"])
        results["padded", "loss"].append(timings["optimization"])


def _table(results) -> str:
    med = {k: statistics.median(v) for k, v in results.items() if isinstance(v, list)}
    real, padded = results["tokens"]
    gen = med["generation"]
    names = {"scoring": "scoring (reward model)", "forwards": "forwards (old + reference log-probs)",
             "loss": "loss (2 micro-batches, forward + backward, 1 step)"}
    lines = [("generation (shared)", gen, gen)] + [(names[p], med["fastalign", p], med["padded", p]) for p in PHASES]
    a, b = (sum(med[path, p] for p in PHASES) for path in ("fastalign", "padded"))
    lines += [("step without generation", a, b), ("whole step", a + gen, b + gen)]
    rows = ["| phase | fastalign (packed) s | padded, TRL 1.16-style s | padded / fastalign |", "|---|---|---|---|"]
    rows += [f"| {name} | {x:.3f} | {y:.3f} | {y / x:.2f} |" for name, x, y in lines]
    return (f"GRPO step, {date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}; {PROMPTS} prompts x {G} completions, {real} real tokens ({padded} padded: "
            f"{1 - real / padded:.1%} pad); medians of {ROUNDS} rounds.\n\n" + "\n".join(rows) + "\n")


@pytest.mark.benchmark(group="grpo step")
def test_grpo_step_by_phase(benchmark):
    results = collections.defaultdict(list)
    benchmark.pedantic(_run, args=(results,), rounds=1, iterations=1)
    OUT.mkdir(exist_ok=True)
    (OUT / "grpo.md").write_text(table := _table(results))
    print("\n" + table)
    assert all(t > 0 for key, times in results.items() if key != "tokens" for t in times)
