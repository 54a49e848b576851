"""fastalign's GRPO, RLOO, ORPO, SimPO, CPO and KTO math against TRL 1.16 on the same inputs.

    PYTHONPATH=. benchmarks/out/venv-peers/bin/python -m benchmarks.trl_parity

Runs in the peer venv (``make bench-peers`` makes it: TRL 1.16 and its torch; TRL is no dependency
of fastalign), imports fastalign's kernels from this checkout, and calls TRL's own code wherever
it is a callable unit: ``GRPOTrainer._compute_loss``, ``RLOOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, ``CPOTrainer.cpo_loss`` and ``get_batch_loss_metrics`` (the NLL
term), ``ORPOTrainer.odds_ratio_loss``, each on a stand-in trainer that holds only the settings
those methods read and a stand-in model that returns given log-probs or logits (no network, no
data set). TRL computes the group advantages of GRPO and RLOO inside its generation step, which
needs a model and reward functions; those are written out here from TRL 1.16's lines
(grpo_trainer.py: the ``sum_then_normalize`` branch; rloo_trainer.py: the leave-one-out
baseline), with TRL's own ``nanstd``.

Each case prints the largest absolute difference of its losses, gradients and metrics. Both sides
compute in fp32, where a value of size v is held to about v * 6e-8, so the run fails if a
difference exceeds 1e-6 times max(1, |TRL's value|).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6


def _fastalign():
    """``fastalign.functional``, with ``kernels/`` mounted as ``fastalign.kernels`` as the installed
    package does (the peer venv has no editable install of this checkout)."""
    sys.path.insert(0, str(ROOT))
    import fastalign

    if "fastalign.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastalign.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastalign.kernels"] = module
        spec.loader.exec_module(module)
        fastalign.kernels = module
    import fastalign.functional as F

    return F


class _Accelerator:
    """One process: every gather and reduce is the identity."""

    num_processes = 1
    device = torch.device("cpu")

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


class Diff(tuple):
    """``(largest absolute difference, largest |TRL value| there)``; ``max`` of several keeps the
    worst by the scaled test."""

    def scaled(self) -> float:
        return self[0] / max(1.0, self[1])

    def __lt__(self, other):
        return self.scaled() < other.scaled()

    def __gt__(self, other):
        return self.scaled() > other.scaled()


def _diff(ours, trl) -> Diff:
    a = torch.as_tensor(ours).detach().to(torch.float64).flatten()
    b = torch.as_tensor(trl).detach().to(torch.float64).flatten()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs TRL's {tuple(b.shape)}")
    if not a.numel():
        return Diff((0.0, 0.0))
    d = torch.where(torch.isnan(a) & torch.isnan(b), 0.0, (a - b).abs())
    scaled = d / b.abs().nan_to_num(0.0).clamp(min=1.0)
    i = int(scaled.nan_to_num(float("inf")).argmax())
    return Diff((float(d[i]), float(b[i].abs())))


def _metrics_diff(ours: dict, trl_metrics: dict) -> Diff:
    keys = set(trl_metrics) & set(ours)
    if not keys:
        raise AssertionError("no metric in common")
    return max(_diff(ours[k], trl_metrics[k]) for k in keys)


# ---- advantages (TRL 1.16's lines, written out) --------------------------------------------------

def _trl_grpo_advantages(rewards, g, scale):
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(g) if g > 1 else torch.zeros_like(rewards)
    adv = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std)).float().mean()
    return torch.nan_to_num(adv, nan=0.0), {"reward": torch.nanmean(rewards), "reward_std": nanstd(rewards),
                                            "frac_reward_zero_std": zero_std}


def _trl_rloo_advantages(rewards, k, normalize):
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baseline = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    adv = rewards - baseline
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def case_advantages(F):
    rewards = torch.randn(8 * 4)
    rewards[4:8] = 0.5  # a group whose rewards are all equal
    rewards[9] = float("nan")  # an unscored completion
    rewards[20:23] = float("nan")  # a group with one scored completion
    rows = []
    for scale in ("group", "batch", "none"):
        want, want_metrics = _trl_grpo_advantages(rewards, 4, scale)
        got = F.group_advantages(rewards, 4, scale)
        rows.append((f"group_advantages ({scale})", _diff(got, want)))
        rows.append((f"group_reward_metrics ({scale})", _metrics_diff(F.group_reward_metrics(rewards, 4, scale), want_metrics)))
    for normalize in (False, True):
        rows.append((f"rloo_advantages (normalize={normalize})",
                     _diff(F.rloo_advantages(rewards, 4, normalize), _trl_rloo_advantages(rewards, 4, normalize))))
    return rows


# ---- GRPO and RLOO losses (TRL's _compute_loss) ----------------------------------------------------

B, T = 12, 16


def _padded_batch():
    """Completion log-probs of B rows of up to T tokens (right padding, one row empty); the old
    policy's spread so that a fair share of tokens is clipped on either side."""
    lengths = [16, 4, 0, 11, 1, 9, 16, 7, 13, 2, 15, 6]
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = torch.randn(B, T) * 0.5 - 1.5
    old = logp + torch.randn(B, T) * 0.25
    ref = logp + torch.randn(B, T) * 0.3
    return logp, old, ref, mask, lengths


def _policy_stub(trainer_cls, leaf, **settings):
    stub = SimpleNamespace(
        accelerator=_Accelerator(), model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        aux_loss_enabled=False, current_gradient_accumulation_steps=1, **settings,
    )
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.ones_like(leaf), None)
    return stub


def _trl_grpo(logp, old, ref, adv, mask, n_items, **settings):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs: (loss, its gradient, metrics)."""
    from trl import GRPOTrainer

    leaf = logp.clone().requires_grad_()
    stub = _policy_stub(
        GRPOTrainer, leaf, top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        epsilon_low=0.2, use_vllm=False, max_completion_length=12, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), **settings,
    )
    b, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": n_items}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, grad, {k: v[-1] for k, v in stub._metrics["train"].items()}


def case_grpo(F):
    logp, old, ref, mask, lengths = _padded_batch()
    adv = F.group_advantages(torch.randn(B), 3)
    n_items = torch.tensor(float(mask.sum() * 3))  # dapo: as if three processes' tokens
    keep = mask.bool()
    cu = torch.tensor([0] + lengths).cumsum(0)
    rows = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta, eps_high in ((0.04, 0.2), (0.0, 0.28)):
            want, want_grad, want_metrics = _trl_grpo(logp, old, ref, adv, mask, n_items, beta=beta,
                                                      loss_type=loss_type, epsilon_high=eps_high)
            kw = dict(epsilon=0.2, epsilon_high=eps_high, beta=beta, loss_type=loss_type, max_completion_length=12,
                      num_items_in_batch=n_items)
            ours = logp.clone().requires_grad_()
            got, metrics = F.grpo_loss(ours, old, ref, adv, mask, **kw)
            (grad,) = torch.autograd.grad(got, ours)
            flat = logp[keep].clone().requires_grad_()
            packed, packed_metrics = F.grpo_loss_packed(flat, old[keep], ref[keep], adv, cu, **kw)
            (packed_grad,) = torch.autograd.grad(packed, flat)
            name = f"grpo_loss ({loss_type}, beta={beta}, eps_high={eps_high})"
            rows.append((name + " padded", max(_diff(got, want), _diff(grad, want_grad), _metrics_diff(metrics, want_metrics))))
            rows.append((name + " packed", max(_diff(packed, want), _diff(packed_grad, want_grad[keep]),
                                               _metrics_diff(packed_metrics, want_metrics))))
    # Advantages per token ([B, T]), which TRL takes too.
    adv_t = torch.randn(mask.shape)
    want, want_grad, want_metrics = _trl_grpo(logp, old, ref, adv_t, mask, n_items, beta=0.04, loss_type="grpo",
                                              epsilon_high=0.28)
    ours = logp.clone().requires_grad_()
    got, metrics = F.grpo_loss(ours, old, ref, adv_t, mask, epsilon_high=0.28)
    (grad,) = torch.autograd.grad(got, ours)
    rows.append(("grpo_loss (grpo, advantages per token) padded",
                 max(_diff(got, want), _diff(grad, want_grad), _metrics_diff(metrics, want_metrics))))
    return rows


def case_rloo(F):
    from trl import RLOOTrainer

    logp, old, _, mask, lengths = _padded_batch()
    mask[2, 0] = 1  # RLOO's ratio is per sequence: give every one a token
    lengths[2] = 1
    adv = F.rloo_advantages(torch.randn(B), 3)
    old_logps = (old * mask).sum(1)
    leaf = logp.clone().requires_grad_()
    stub = _policy_stub(RLOOTrainer, leaf, epsilon_low=0.2, epsilon_high=0.28)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "old_logps": old_logps, "advantages": adv}
    want = RLOOTrainer._compute_loss(stub, None, inputs)
    (want_grad,) = torch.autograd.grad(want, leaf)
    keep = mask.bool()
    flat = logp[keep].clone().requires_grad_()
    logps = F.segment_sum(flat, cu_seqlens=torch.tensor([0] + lengths).cumsum(0))
    got, metrics = F.rloo_loss(logps, old_logps, adv, epsilon=0.2, epsilon_high=0.28)
    (grad,) = torch.autograd.grad(got, flat)
    want_metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return [("rloo_loss", max(_diff(got, want), _diff(grad, want_grad[keep]), _metrics_diff(metrics, want_metrics)))]


# ---- CPO, SimPO, ORPO ------------------------------------------------------------------------------

def case_cpo_orpo(F):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    pc, pr = -torch.rand(16) * 2 - 0.05, -torch.rand(16) * 2 - 0.05  # mean log-probs per token
    rows = []
    for loss_type in ("sigmoid", "hinge", "ipo", "simpo"):
        for alpha in (0.0, 0.25):
            stub = SimpleNamespace(alpha=alpha, beta=0.3, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.4,
                                   accelerator=_Accelerator())
            want = CPOTrainer.cpo_loss(stub, pc, pr)
            got = F.cpo_loss(pc, pr, 0.3, loss_type, 0.1, simpo_gamma=0.4, alpha=alpha)
            rows.append((f"cpo_loss ({loss_type}, alpha={alpha})", max(_diff(g, w) for g, w in zip(got, want))))
            if alpha == 0.0 and loss_type in ("sigmoid", "simpo"):
                pref = F.preference_loss(pc, pr, None, None, 0.3, loss_type, 0.1, True, simpo_gamma=0.4)
                rows.append((f"preference_loss ({loss_type}, reference-free)", max(_diff(g, w) for g, w in zip(pref, want))))
    stub = SimpleNamespace(beta=0.1, accelerator=_Accelerator())
    want = ORPOTrainer.odds_ratio_loss(stub, pc, pr)
    rows.append(("odds_ratio_loss", max(_diff(g, w) for g, w in zip(F.odds_ratio_loss(pc, pr, 0.1), want))))
    orpo = F.preference_loss(pc, pr, loss_type="orpo", beta=0.1)
    rows.append(("preference_loss (orpo) = -TRL's losses", max(_diff(orpo[0], -want[0]), _diff(orpo[1], want[1]))))
    return rows


def _pair_batch(n_pairs=3, vocab=37, hidden=8):
    """Pairs of (prompt, completion) token rows, as TRL's padded batch and as one packed row."""
    g = torch.Generator().manual_seed(3)
    seqs, prompt_lens = [], []
    for _ in range(2 * n_pairs):
        p, c = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        seqs.append(torch.randint(1, vocab, (p + c,), generator=g))
        prompt_lens.append(p)
    embed = torch.randn(vocab, hidden, generator=g)
    return seqs, prompt_lens, embed


def case_cpo_nll(F):
    """CPO's full loss: TRL's get_batch_loss_metrics (logits of a stand-in model) against
    fused_preference_loss with nll_coef = cpo_alpha on the same tokens, packed."""
    from trl.experimental.cpo import CPOTrainer

    seqs, prompt_lens, embed = _pair_batch()
    n = len(seqs) // 2
    rows = []
    for loss_type in ("sigmoid", "simpo", "ipo"):
        weight = (torch.randn(embed.shape[0], embed.shape[1]) * 0.5).requires_grad_()
        batch = {}
        for half, idx in (("chosen", range(n)), ("rejected", range(n, 2 * n))):
            width = max(len(seqs[i]) for i in idx)
            ids, labels = torch.zeros(n, width, dtype=torch.long), torch.full((n, width), -100)
            att = torch.zeros(n, width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])], att[row, :len(seqs[i])] = seqs[i], 1
                labels[row, prompt_lens[i]:len(seqs[i])] = seqs[i][prompt_lens[i]:]
            batch.update({f"{half}_input_ids": ids, f"{half}_attention_mask": att, f"{half}_labels": labels})
        stub = SimpleNamespace(alpha=0.0, beta=0.3, loss_type=loss_type, label_smoothing=0.0, simpo_gamma=0.4,
                               cpo_alpha=0.7, is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False,
                               accelerator=_Accelerator(), concatenated_inputs=CPOTrainer.concatenated_inputs,
                               get_batch_logps=CPOTrainer.get_batch_logps)
        for method in ("cpo_loss", "concatenated_forward"):
            setattr(stub, method, types.MethodType(getattr(CPOTrainer, method), stub))
        model = lambda input_ids, **kw: SimpleNamespace(logits=embed[input_ids] @ weight.t())  # noqa: E731
        want, want_metrics = CPOTrainer.get_batch_loss_metrics(stub, model, batch)
        (want_grad,) = torch.autograd.grad(want, weight)

        packed = torch.cat(seqs)
        labels = torch.full_like(packed, -100)
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        for s, (start, p) in enumerate(zip(cu[:-1].tolist(), prompt_lens)):
            labels[start + p - 1:start + len(seqs[s]) - 1] = seqs[s][p:]
        ours = weight.detach().clone().requires_grad_()
        out = F.fused_preference_loss(
            embed[packed], ours, labels, torch.arange(n), torch.arange(n, 2 * n), cu_seqlens=cu, beta=0.3,
            loss_type=loss_type, reference_free=True, average_log_prob=loss_type in ("ipo", "simpo"), nll_coef=0.7,
            simpo_gamma=0.4,
        )
        (grad,) = torch.autograd.grad(out.loss, ours)
        diffs = [_diff(out.loss, want), _diff(grad, want_grad), _diff(out.nll_loss, want_metrics["nll_loss"]),
                 _diff(out.chosen_rewards.mean(), want_metrics["rewards/chosen"]),
                 _diff(out.chosen_logps.mean(), want_metrics["logps/chosen"])]
        rows.append((f"fused_preference_loss CPO ({loss_type}, cpo_alpha=0.7)", max(diffs)))
    return rows


# ---- KTO (TRL's KTOTrainer._compute_loss) ------------------------------------------------------------

def _kto_model(per_token, kl_per_token):
    """A stand-in for the model under TRL's fused lm_head: the given log-probs per token, the KL
    completions' for the KL rows (told apart by their width)."""

    def model(input_ids, labels=None, **kw):
        lp = kl_per_token if input_ids.shape[1] == kl_per_token.shape[1] + 1 else per_token
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))

    return model


def case_kto(F):
    from trl import KTOTrainer

    rows = []
    b, width, kl_width = 6, 8, 7
    label = torch.tensor([True, False, True, True, False, True])
    comp = torch.zeros(b, width, dtype=torch.long)
    kl_comp = torch.zeros(b, kl_width, dtype=torch.long)
    for i, (s, e, ks, ke) in enumerate([(2, 8, 1, 5), (3, 6, 2, 7), (1, 4, 3, 6), (4, 8, 1, 3), (2, 3, 0, 7), (5, 7, 2, 4)]):
        comp[i, s:e], kl_comp[i, ks:ke] = 1, 1
    per_token = (torch.randn(b, width - 1) * 0.4 - 1) * comp[:, 1:]
    kl_per_token = (torch.randn(b, kl_width - 1) * 0.4 - 1) * kl_comp[:, 1:]
    ref_logps, ref_kl_logps = per_token.sum(1) + torch.randn(b), kl_per_token.sum(1) + torch.randn(b) * 0.5
    settings = [("kto", ref_kl_logps - 1.0, "KL estimate > 0"), ("kto", ref_kl_logps + 5.0, "KL estimate clamped to 0"),
                ("apo_zero_unpaired", ref_kl_logps, "no KL")]
    for loss_type, ref_kl, what in settings:
        leaf = per_token.clone().requires_grad_()
        model = _kto_model(leaf, kl_per_token)
        stub = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=_Accelerator(), _metrics={"train": defaultdict(list)},
            calculate_KL=loss_type == "kto", precompute_ref_logps=True, loss_type=loss_type, beta=0.2,
            desirable_weight=1.0, undesirable_weight=1.5, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        )
        stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
        inputs = {"input_ids": torch.ones(b, width, dtype=torch.long), "attention_mask": torch.ones(b, width, dtype=torch.long),
                  "completion_mask": comp, "KL_input_ids": torch.ones(b, kl_width, dtype=torch.long),
                  "KL_attention_mask": torch.ones(b, kl_width, dtype=torch.long), "KL_completion_mask": kl_comp,
                  "label": label, "ref_logps": ref_logps, "ref_KL_logps": ref_kl}
        want = KTOTrainer._compute_loss(stub, model, inputs, False)
        (want_grad,) = torch.autograd.grad(want, leaf)
        m = {k: v[-1] for k, v in stub._metrics["train"].items()}

        ours = per_token.clone().requires_grad_()
        logps = ours.sum(1)
        losses, r_c, r_r, kl = F.kto_loss(
            logps[label], logps[~label], kl_per_token.sum(1), ref_logps[label], ref_logps[~label], ref_kl,
            beta=0.2, desirable_weight=1.0, undesirable_weight=1.5, loss_type=loss_type,
        )
        got = losses.mean()
        (grad,) = torch.autograd.grad(got, ours)
        diffs = [_diff(got, want), _diff(grad, want_grad), _diff(kl, m["kl"]), _diff(r_c.mean(), m["rewards/chosen"]),
                 _diff(r_r.mean(), m["rewards/rejected"])]
        if (float(kl) > 0) != (what == "KL estimate > 0"):
            raise AssertionError(f"the case '{what}' has a KL estimate of {float(kl)}")
        rows.append((f"kto_loss ({loss_type}, {what})", max(diffs)))
    return rows


def main() -> int:
    import trl

    torch.manual_seed(0)
    F = _fastalign()
    rows = []
    for case in (case_advantages, case_grpo, case_rloo, case_cpo_orpo, case_cpo_nll, case_kto):
        rows += case(F)
    print(f"fastalign vs TRL {trl.__version__} (torch {torch.__version__}), largest absolute difference")
    print("over each case's losses, gradients and metrics; tolerance 1e-6 x max(1, |TRL value|)\n")
    width = max(len(name) for name, _ in rows)
    print(f"  {'':<{width}}  {'abs diff':>9}  {'at |TRL|':>8}")
    for name, (diff, scale) in rows:
        ok = diff <= TOLERANCE * max(1.0, scale)
        print(f"  {name:<{width}}  {diff:9.3g}  {scale:8.3g}{'' if ok else '  FAIL'}")
    bad = [name for name, (diff, scale) in rows if not diff <= TOLERANCE * max(1.0, scale)]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} within {TOLERANCE} x max(1, |TRL value|)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
