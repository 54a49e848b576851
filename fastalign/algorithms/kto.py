"""Kahneman-Tversky optimisation on unpaired rows, on the packed core (Ethayarajh et al., "KTO: Model
Alignment as Prospect Theoretic Optimization", 2024, arXiv:2402.01306).

Rows are ``{"prompt", "completion", "label"}`` (``fastalign.data.unpaired``): each completion is
desirable (``label`` true) or undesirable on its own. With ``pi`` and ``ref`` the policy's and the
reference's summed completion log-probs and ``rho = pi - ref``:

    z0   = max(0, mean over the micro-batch's KL sequences of (pi_KL - ref_KL)), detached,
           averaged over processes before the clamp (TRL 1.16's estimate of KL(pi || ref))
    loss = mean over rows of  desirable_weight   * (1 - s(beta (rho - z0)))   for a desirable row
                              undesirable_weight * (1 - s(beta (z0 - rho)))   for an undesirable one

(``loss_type="apo_zero_unpaired"``: ``1 - s(beta rho)`` and ``s(beta rho)``, no KL estimate; APO,
D'Oosterlinck et al. 2024, arXiv:2408.06266). The KL sequences are mismatched pairs: in each packed
micro-batch, row ``i``'s prompt followed by row ``i - 1``'s completion (``mismatched``), as TRL 1.16
rotates the completions of a batch by one; they run through the policy without gradients and
through the reference, packed like the rows, the lm_head at completion tokens only. A micro-batch
of one row pairs it with its own completion (its KL estimate is then its own log-ratio, as in TRL
with a batch of one): keep ``max_tokens_per_batch`` several rows long.

The reference is DPO's (``DPOTrainer``, whose machinery this trainer reuses): a frozen copy,
``ref_model``, the model with its LoRA adapters disabled, or log-probs precomputed in one pass
(``precompute_ref_log_probs``; each row's and its KL sequence's, the KL pairing being fixed by the
plan of micro-batches). Logged with TRL 1.16's names: ``rewards/chosen`` and ``logps/chosen``
(means over the desirable rows), ``rewards/rejected`` and ``logps/rejected`` (undesirable rows),
``rewards/margins`` (their difference; each only when the step has such rows), ``kl`` (``z0``,
weighted by rows). TRL's ``logits/*`` are not logged (no logits exist), nor its ``entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastalign.data import PackedBatch
from fastalign.data.rows import TRUNCATION_MODES
from fastalign.data.store import SFT_HALVES
from fastalign.data.unpaired import UnpairedEncoder, mismatched
from fastalign.engine import distributed
from fastalign.kernels.kto import KTO_LOSS_TYPES, kto_kl, kto_loss
from fastalign.models import sequence_logprobs
from fastalign.options import option

from .dpo import DPOTrainer, ReferenceConfig
from .reference_free import load_decoder_only


@dataclass
class KTOConfig(ReferenceConfig):
    learning_rate: float = 1e-6
    beta: float = option(0.1, "the strength of the KL constraint to the reference (the implied reward's scale)",
                         gt=0)
    loss_type: str = option("kto", "the loss: kto, or apo_zero_unpaired (no KL estimate)", choices=KTO_LOSS_TYPES)
    desirable_weight: float = option(1.0, "weight of the desirable rows' losses (balances unequal counts)", gt=0)
    undesirable_weight: float = option(1.0, "weight of the undesirable rows' losses (balances unequal counts)",
                                       gt=0)
    max_length: int | None = option(1024, "tokens kept of prompt plus completion (null: all)", ge=1)
    truncation_mode: str = option("keep_start", "which tokens a too-long row keeps (keep_start: its end is cut, "
                                  "as TRL)", choices=TRUNCATION_MODES)
    # What DPO's reference machinery reads: KTO always has a reference, and sums log-probs.
    reference_free: ClassVar[bool] = False
    average_log_prob: ClassVar[bool] = False


def per_label(metrics: dict, prefix: str = "") -> dict:
    """Step (or evaluation) means over rows turned into TRL's means over the desirable and the
    undesirable rows (``_chosen`` and ``_rejected`` are their shares of the rows)."""
    out = dict(metrics)
    shares = {role: out.pop(f"{prefix}_{role}", 0.0) for role in ("chosen", "rejected")}
    for role, share in shares.items():
        for name in (f"{prefix}rewards/{role}", f"{prefix}logps/{role}"):
            if share > 0 and name in out:
                out[name] /= share
            else:
                out.pop(name, None)
    if all(shares.values()) and f"{prefix}rewards/chosen" in out:
        out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
    return out


class KTOTrainer(DPOTrainer):
    """``KTOTrainer(model, ref_model=None, args=KTOConfig(...), train_dataset, eval_dataset, tokenizer,
    peft_config)``: ``DPOTrainer``'s reference handling over unpaired rows."""

    halves = SFT_HALVES
    model_loader = staticmethod(load_decoder_only)

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, peft_config=None, optimizers=(None, None)):
        super().__init__(model, ref_model, args or KTOConfig(), train_dataset, eval_dataset, tokenizer, peft_config,
                         optimizers)

    def encoder(self, tokenizer, args):
        return UnpairedEncoder(tokenizer, args.max_length, args.truncation_mode)

    def batch_weight(self, batch: PackedBatch) -> float:
        return float(batch.num_sequences)

    @property
    def uses_kl(self) -> bool:
        return self.args.loss_type == "kto"

    def reference_logps(self, batch: PackedBatch, kl_batch: PackedBatch | None = None) -> torch.Tensor:
        """fp32 ``[2S]``: per row of ``batch``, the reference's summed log-prob of its completion,
        then of its KL sequence's (0 without a KL estimate)."""
        if "ref_logps" in batch.extras:
            return batch.extras["ref_logps"]
        rows = super().reference_logps(batch)
        if not self.uses_kl:
            return torch.stack((rows, torch.zeros_like(rows)), 1).view(-1)
        kl = super().reference_logps(mismatched(batch) if kl_batch is None else kl_batch)
        return torch.stack((rows, kl), 1).view(-1)

    def kl_estimate(self, kl_batch: PackedBatch, ref_kl: torch.Tensor) -> torch.Tensor:
        """The unclamped KL estimate of a micro-batch, averaged over the processes (each runs the
        same number of micro-batches, so they all reach this all-reduce together)."""
        with torch.no_grad():
            kl = kto_kl(sequence_logprobs(self.model, kl_batch), ref_kl)
        if distributed.world_size() == 1:
            return kl
        total = distributed.all_reduce_sum([float(kl)], self.engine.device)[0]
        return torch.tensor(total / distributed.world_size(), device=kl.device)

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        args = self.args
        kl_batch = mismatched(batch) if self.uses_kl else None
        ref = self.reference_logps(batch, kl_batch).view(-1, 2)
        kl = self.kl_estimate(kl_batch, ref[:, 1]) if self.uses_kl else None
        logps = sequence_logprobs(self.model, batch)
        good = batch.extras["label"].bool()
        losses, r_c, r_r, z0 = kto_loss(
            logps[good], logps[~good], None, ref[good, 0], ref[~good, 0], None, beta=args.beta,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
            loss_type=args.loss_type, kl=kl,
        )
        pi = logps.detach()
        return losses.sum(), {
            "rewards/chosen": r_c.sum(), "logps/chosen": pi[good].sum(), "_chosen": good.sum(),
            "rewards/rejected": r_r.sum(), "logps/rejected": pi[~good].sum(), "_rejected": (~good).sum(),
            "kl": z0 * batch.num_sequences,
        }

    def _run_step(self, group: list[int]) -> dict:
        return per_label(super()._run_step(group))

    def evaluate(self) -> dict:
        return per_label(super().evaluate(), "eval/")
