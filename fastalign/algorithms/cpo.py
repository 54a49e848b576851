"""Contrastive preference optimisation and SimPO: preference losses with no reference model
(Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
Machine Translation", 2024, arXiv:2401.08417; Meng et al., "SimPO: Simple Preference Optimization
with a Reference-Free Reward", 2024, arXiv:2405.14734).

CPO is the DPO family with every reference log-prob taken as 0, plus a behaviour-cloning term:

    loss = mean over pairs of L(beta, pi_c - pi_r)  +  cpo_alpha * NLL(chosen completions)

with ``L`` TRL 1.16's ``loss_type``: ``sigmoid`` ``-(1-eps) log s(beta h) - eps log s(-beta h)``,
``hinge`` ``relu(1 - beta h)``, ``ipo`` ``(h - 1/(2 beta))^2``, ``simpo`` the sigmoid loss of
``beta h - simpo_gamma``; ``pi`` is the summed completion log-prob, or the mean per token for ipo and
simpo (as TRL). SimPO is CPO with ``loss_type="simpo"`` and ``cpo_alpha=0``, as TRL runs it:
``SimPOConfig``/``SimPOTrainer`` (``fastalign train simpo``) are that, with SimPO's own defaults
(``beta=2.0``, ``simpo_gamma=0.5``: its ``gamma_beta_ratio`` of 0.25). TRL's AlphaPO reward shape
(``alpha``, ``loss_type="alphapo"``) is not supported by the trainer (``fastalign.functional.cpo_loss``
has it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.options import option

from .reference_free import PairLossConfig, ReferenceFreeTrainer

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


@dataclass
class CPOConfig(PairLossConfig):
    beta: float = option(0.1, "the preference loss's scale (for ipo: its regularisation, tau)", gt=0)
    loss_type: str = option("sigmoid", "the preference loss", choices=CPO_LOSS_TYPES)
    label_smoothing: float = option(0.0, "the assumed fraction of flipped labels (sigmoid, simpo)", ge=0, lt=0.5)
    cpo_alpha: float = option(1.0, "weight of the chosen completions' NLL (the behaviour-cloning term; 0: "
                              "none, as SimPO)", ge=0)
    simpo_gamma: float = option(0.5, "the target reward margin of the simpo loss", ge=0)


@dataclass
class SimPOConfig(CPOConfig):
    """CPO with the simpo loss and no NLL term, SimPO's defaults."""

    beta: float = option(2.0, "the reward scale: rewards are beta times mean log-probs per token", gt=0)
    loss_type: str = option("simpo", "the preference loss (SimPO: simpo only)", choices=("simpo",))
    cpo_alpha: float = option(0.0, "weight of the chosen completions' NLL (SimPO: 0)", ge=0)


class CPOTrainer(ReferenceFreeTrainer):
    config_class = CPOConfig

    @property
    def nll_coef(self) -> float:
        return self.args.cpo_alpha

    def loss_options(self) -> dict:
        args = self.args
        return {"loss_type": args.loss_type, "beta": args.beta, "label_smoothing": args.label_smoothing,
                "simpo_gamma": args.simpo_gamma, "average_log_prob": args.loss_type in ("ipo", "simpo")}


class SimPOTrainer(CPOTrainer):
    """``CPOTrainer`` with a ``SimPOConfig`` by default."""

    config_class = SimPOConfig
