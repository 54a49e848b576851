"""Odds ratio preference optimisation: SFT and preference alignment in one loss, no reference model
(Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model", 2024,
arXiv:2403.07691).

With ``pi`` the mean log-prob per completion token and ``odds(y) = p / (1 - p)``, ``p = e^pi``:

    log_odds = log odds(y_c) - log odds(y_r)
    loss     = NLL(chosen)  -  beta * mean over pairs of log s(log_odds)

(``beta`` is the paper's lambda). The NLL is a token mean over the chosen sequences' prompt *and*
completion tokens, as TRL 1.16 computes it (``chosen_nll_loss`` over the whole chosen input, a
choice TRL made to follow ORPO's own code, kept after a revert: huggingface/trl#1516, #2527) and as
ORPO's code does by default. The completion part comes from ``fused_preference_loss``'s NLL term;
the prompt part runs the lm_head at the chosen prompts' positions only (the rejected prompts, and
the logits, are never computed). ``disable_prompt_loss=True`` (the name of ORPO's own switch) takes
the NLL over the chosen completions only. Logged besides the common metrics, with TRL's names:
``nll_loss``, ``log_odds_ratio`` (mean ``log s(log_odds)``) and ``log_odds_chosen`` (mean
``log_odds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fastalign.kernels import PreferenceLossOutput
from fastalign.kernels.preference import log_odds_ratio
from fastalign.options import option

from .reference_free import PairLossConfig, ReferenceFreeTrainer


@dataclass
class ORPOConfig(PairLossConfig):
    beta: float = option(0.1, "the odds-ratio term's weight against the NLL (the paper's lambda)", gt=0)
    disable_prompt_loss: bool = option(False, "the NLL over the chosen completion only (false: over the chosen "
                                       "prompt and completion, as TRL and ORPO's code)")


class ORPOTrainer(ReferenceFreeTrainer):
    config_class = ORPOConfig
    nll_coef = 1.0

    @property
    def nll_on_prompt(self) -> bool:
        return not self.args.disable_prompt_loss

    def loss_options(self) -> dict:
        return {"loss_type": "orpo", "beta": self.args.beta, "average_log_prob": True}

    def more_metrics(self, out: PreferenceLossOutput) -> dict:
        log_odds = log_odds_ratio(out.chosen_logps, out.rejected_logps)
        return {"log_odds_ratio": F.logsigmoid(log_odds).sum(), "log_odds_chosen": log_odds.sum()}
