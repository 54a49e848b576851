"""What the reference-free preference trainers (CPO, SimPO, ORPO) share: no reference model is built
or run; the loss goes from the packed hidden states through ``fused_preference_loss`` with
``reference_free=True``, the lm_head running at completion tokens only (and, for ORPO's NLL, at the
chosen prompt's tokens), never a ``[tokens, vocab]`` logits tensor.

Per micro-batch of P pairs the loss is

    mean over pairs of the preference loss  +  nll_coef * NLL of the chosen sequences

with the NLL a token mean over the micro-batch's chosen completions (CPO, as TRL 1.16), or over the
chosen prompts and completions together (ORPO, as TRL 1.16 and ORPO's own code). The rewards are
``beta * logps`` (means per token for orpo, simpo and ipo, sums otherwise). Logged with TRL's names:
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, ``nll_loss`` (means over pairs; ``nll_loss`` is the
micro-batch's token mean, weighted by its pairs), plus what a trainer adds (ORPO's odds ratio).
TRL's ``logits/chosen`` and ``logits/rejected`` are not logged: the logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.data import IGNORE_INDEX, PackedBatch
from fastalign.errors import ConfigError
from fastalign.kernels import PreferenceLossOutput, fused_preference_loss
from fastalign.models import head_logprobs, is_encoder_decoder, lm_head, load_model, packed_hidden, prepare_model
from fastalign.options import option

from .dpo import disable_dropout
from .launch import PACKED_KEYS, launch_packed
from .pairs import PairDataConfig, PairTrainer


@dataclass
class PairLossConfig(PairDataConfig):
    """The options CPO and ORPO share besides their loss (TRL 1.16's defaults: learning rate 1e-6,
    sequences of 1,024 tokens)."""

    learning_rate: float = 1e-6
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    disable_dropout: bool = option(True, "turn dropout off in the trained model")


def load_decoder_only(model, **options):
    """``load_model``, refusing an encoder-decoder model: CPO, SimPO, ORPO and KTO run packed only
    (SFT, DPO and PPO take encoder-decoder models, padded)."""
    model, report = load_model(model, **options)
    if is_encoder_decoder(model):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model: CPO, SimPO, ORPO and KTO take "
                          "decoder-only models (SFT, DPO and PPO train encoder-decoder ones)")
    return model, report


def chosen_prompt_nll(model, hidden: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor | None, int, int]:
    """``(sum of -log p or None, prompt positions, completion positions)`` of the chosen sequences:
    the first over the positions that predict a prompt token (every position but a sequence's last
    whose next token carries no loss), through the model's fused lm_head at those positions only;
    the last, the chosen loss positions (what the fused loss's NLL covers)."""
    seq = batch.seq_index
    is_chosen = torch.zeros(batch.num_sequences, dtype=torch.bool, device=seq.device)
    is_chosen[batch.chosen.long()] = True
    chosen_t = is_chosen[seq]
    same_next = torch.zeros_like(chosen_t)
    same_next[:-1] = seq[1:] == seq[:-1]
    scored = batch.labels != IGNORE_INDEX
    pos = (same_next & ~scored & chosen_t).nonzero()[:, 0]
    completion = int((scored & chosen_t).sum())
    if pos.numel() == 0:
        return None, 0, completion
    logp = head_logprobs(model, hidden[pos], batch.input_ids[0, pos + 1])
    return -logp.sum(), pos.numel(), completion


class ReferenceFreeTrainer(PairTrainer):
    """A pair trainer with no reference model: ``Trainer(model, args=Config(...), train_dataset,
    eval_dataset, tokenizer, peft_config)``. Subclasses set ``config_class``, ``loss_options()`` (what
    goes to ``fused_preference_loss``), ``nll_coef`` and ``nll_on_prompt``, and may add logged sums
    in ``more_metrics``."""

    model_loader = staticmethod(load_decoder_only)
    peft_task_type = "CAUSAL_LM"
    run_keys = PACKED_KEYS
    launch = classmethod(launch_packed)
    ref_model = None  # none is built or run
    config_class = PairLossConfig  # what args defaults to
    nll_on_prompt = False

    def __init__(self, model, args: PairLossConfig | None = None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, peft_config=None, optimizers=(None, None)):
        args = args or self.config_class()
        model, tokenizer, self.attention = prepare_model(model, tokenizer, peft_config, self.model_loader)
        if args.disable_dropout:
            disable_dropout(model)
        train, evals = self._datasets(args, train_dataset, eval_dataset, tokenizer)
        super().__init__(model, args, train, evals, tokenizer, optimizers)

    def loss_options(self) -> dict:
        raise NotImplementedError

    @property
    def nll_coef(self) -> float:
        return 0.0

    def more_metrics(self, out: PreferenceLossOutput) -> dict:
        return {}

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        hidden = packed_hidden(self.model, batch)
        weight, bias = lm_head(self.model)
        coef, share, prompt_nll, tokens = self.nll_coef, 1.0, None, 0
        if coef and self.nll_on_prompt:
            # One token mean over the chosen prompts and completions: the fused loss weighs its
            # completion-token mean by the completions' share of those tokens, the prompts add theirs.
            prompt_nll, prompt_tokens, completion_tokens = chosen_prompt_nll(self.model, hidden, batch)
            tokens = prompt_tokens + completion_tokens
            share = completion_tokens / max(tokens, 1)
        out = fused_preference_loss(
            hidden, weight, batch.labels, batch.chosen, batch.rejected, cu_seqlens=batch.cu_seqlens, bias=bias,
            reference_free=True, nll_coef=coef * share, **self.loss_options(),
        )
        loss, nll = out.loss, out.nll_loss * share
        if prompt_nll is not None:
            loss = loss + coef * prompt_nll / max(tokens, 1)
            nll = nll + prompt_nll.detach() / max(tokens, 1)
        n = batch.chosen.numel()
        c, r = out.chosen_rewards, out.rejected_rewards
        return loss * n, {
            "rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/accuracies": (c > r).sum(),
            "rewards/margins": (c - r).sum(), "logps/chosen": out.chosen_logps.sum(),
            "logps/rejected": out.rejected_logps.sum(), "nll_loss": nll * n, **self.more_metrics(out),
        }
