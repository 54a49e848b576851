"""Direct preference optimisation and its family on the packed core (Rafailov et al., "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model", 2023).

Both halves of every pair of a micro-batch run in one padding-free forward pass; the loss goes
straight from the hidden states to ``fused_preference_loss`` (the lm_head runs only at completion
tokens, and a ``[tokens, vocab]`` logits tensor never exists). ``loss_type`` picks the loss: every
type of ``fastalign.kernels.preference`` (sigmoid, hinge, ipo, kto_pair, robust, ...).

The reference log-probs come, in this order, from:

- none, with ``reference_free=True`` (every reference log-prob is 0);
- ``precompute_ref_log_probs=True``: one pass over the train and eval sets before training (after
  DeepSpeed is set up, so it also runs under ZeRO-3), by the reference below; the reference is then
  dropped from memory;
- ``ref_model``, a separate frozen model (under ZeRO-3, sharded like the trained one);
- with PEFT and no ``ref_model``: the trained model with its adapters disabled (or, given
  ``ref_adapter_name``, with that adapter active): no second copy in memory;
- otherwise a frozen copy of the model as it is before training.

An encoder-decoder model (T5, BART) runs padded (``fastalign.models.seq2seq``; packing cannot
isolate its sequences): the prompt goes once through the encoder for both halves of a pair, the
completions are the decoder's targets, and the lm_head runs only at their tokens.

Sequence log-probs are sums over completion tokens, or means with ``average_log_prob`` (on by
default for ``ipo``, as in TRL 0.7.10). Logged, with TRL's names: ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` (means over pairs), besides loss, tokens/s and peak memory.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastalign.data import PackedBatch, plan_padded
from fastalign.engine import TrainingConfig, distributed
from fastalign.kernels import LOSS_TYPES, fused_preference_loss
from fastalign.models import (
    Seq2SeqBatch,
    batch_sequence_logprobs,
    eval_mode,
    is_encoder_decoder,
    lm_head,
    load_model,
    packed_hidden,
    prepare_model,
    seq2seq_collator,
)
from fastalign.models.seq2seq import loss_positions, seq2seq_head, seq2seq_hidden
from fastalign.options import option

from .launch import PACKED_KEYS, REF_MODEL_KEY, launch_packed
from .pairs import PairDataConfig, PairTrainer


@dataclass
class ReferenceConfig(TrainingConfig):
    """The reference model's options (DPO's, and KTO's, which reuses ``DPOTrainer``'s reference)."""

    precompute_ref_log_probs: bool = option(False, "compute the reference log-probs in one pass before training, "
                                            "then free the reference")
    disable_dropout: bool = option(True, "turn dropout off in the trained model")
    model_adapter_name: str | None = option(None, "with PEFT: the adapter trained")
    ref_adapter_name: str | None = option(None, "with PEFT: the adapter active for the reference (null: adapters "
                                          "disabled)")


@dataclass
class DPOConfig(PairDataConfig, ReferenceConfig):
    learning_rate: float = 1e-6
    beta: float = option(0.1, "the strength of the KL constraint to the reference (the implicit reward's scale)",
                         gt=0)
    loss_type: str = option("sigmoid", "the preference loss", choices=LOSS_TYPES)
    label_smoothing: float = option(0.0, "the assumed fraction of flipped labels (cDPO, robust)", ge=0, lt=0.5)
    reference_free: bool = option(False, "no reference model: every reference log-prob is 0")
    average_log_prob: bool | None = option(None, "mean instead of summed completion log-probs (null: on for ipo "
                                           "only)")
    discopop_tau: float = option(0.05, "the discopop loss's temperature", gt=0)

    def __post_init__(self):
        super().__post_init__()
        if self.average_log_prob is None:
            self.average_log_prob = self.loss_type == "ipo"


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (module dropouts and attention dropout rates)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class DPOTrainer(PairTrainer):
    model_loader = staticmethod(load_model)
    peft_task_type = "CAUSAL_LM"
    run_keys = PACKED_KEYS + (REF_MODEL_KEY,)
    launch = classmethod(launch_packed)

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, peft_config=None, optimizers=(None, None)):
        args = args or DPOConfig()
        model, tokenizer, self.attention = prepare_model(model, tokenizer, peft_config, self.model_loader)
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if is_encoder_decoder(model):  # padded: one encoder pass per pair's prompt, both halves decoded
            self.planner, self.collate = plan_padded, seq2seq_collator(model)
        if ref_model is not None:
            ref_model, _ = load_model(ref_model)
        elif not args.reference_free and not self.is_peft and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model)  # the model as it is before training
        if args.disable_dropout:
            for m in (model, ref_model):
                if m is not None:
                    disable_dropout(m)
        train, evals = self._datasets(args, train_dataset, eval_dataset, tokenizer)
        super().__init__(model, args, train, evals, tokenizer, optimizers)
        self.ref_model = None
        if ref_model is not None and not args.reference_free:
            self.ref_model = distributed.wrap_for_inference(ref_model, self.engine)
        if args.precompute_ref_log_probs and not args.reference_free:
            self._precompute(self.train_batches, "train")
            self._precompute(self.eval_batches, "eval")
            self.ref_model = None  # every batch carries its reference log-probs now

    # ---- the reference ------------------------------------------------------------------------
    def _reference_context(self):
        """Where the trained model acts as the reference: adapters off, or the reference adapter."""
        if self.ref_model is not None or not self.is_peft:
            return contextlib.nullcontext()
        if self.args.ref_adapter_name:
            return _adapter(self.model, self.args.ref_adapter_name, self.args.model_adapter_name or "default")
        return self.model.disable_adapter()

    def reference_logps(self, batch: PackedBatch) -> torch.Tensor:
        """fp32 ``[S]``: the reference's log-prob of each sequence of ``batch`` (sum or mean)."""
        if "ref_logps" in batch.extras:
            return batch.extras["ref_logps"]
        model = self.ref_model if self.ref_model is not None else self.model
        with torch.no_grad(), self._reference_context(), eval_mode(model):
            return batch_sequence_logprobs(model, batch, average=self.args.average_log_prob)

    def _precompute(self, batches, name) -> None:
        """Every pair's reference log-probs, in one pass shared out over the processes like the
        evaluation's (each computes its share of the micro-batches, then one all-reduce gives
        everyone all of them); kept per store row, so every batch built later carries them."""
        if not batches:
            return
        store = batches.store
        logps = torch.zeros(len(store), 2, dtype=torch.float64)
        show = distributed.is_main() and not self.args.disable_tqdm
        share = self._my_share(list(range(len(batches))))
        for k, counts in tqdm(share, desc=f"reference log-probs ({name})", disable=not show):
            with torch.no_grad(), self.engine.autocast():
                out = self.engine.forward(self.reference_logps, batches[k].to(self.engine.device))
            if counts:  # a batch's sequences are its pairs' halves, in plan order
                logps[batches.plan[k]] = out.detach().double().cpu().view(-1, 2)
        if distributed.world_size() > 1:
            logps = logps.to(self.engine.device)
            torch.distributed.all_reduce(logps)
        store.sequence_extras["ref_logps"] = logps.cpu().numpy()

    # ---- the loss ------------------------------------------------------------------------------
    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        args = self.args
        ref_c = ref_r = None
        if not args.reference_free:
            ref = self.reference_logps(batch)
            ref_c, ref_r = ref[batch.chosen], ref[batch.rejected]
        if isinstance(batch, Seq2SeqBatch):  # the decoder's states at label positions only
            pos = loss_positions(batch)
            hidden, labels = seq2seq_hidden(self.model, batch, pos), batch.labels[pos]
            layout = {"seq_index": batch.seq_index[pos]}
            weight, bias, _ = seq2seq_head(self.model)
        else:
            hidden, labels, layout = packed_hidden(self.model, batch), batch.labels, {"cu_seqlens": batch.cu_seqlens}
            weight, bias = lm_head(self.model)
        out = fused_preference_loss(
            hidden, weight, labels, batch.chosen, batch.rejected, ref_c, ref_r,
            **layout, bias=bias, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, reference_free=args.reference_free,
            average_log_prob=args.average_log_prob, discopop_tau=args.discopop_tau,
        )
        c, r = out.chosen_rewards, out.rejected_rewards
        return out.loss * batch.chosen.numel(), {
            "rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/accuracies": (c > r).sum(),
            "rewards/margins": (c - r).sum(), "logps/chosen": out.chosen_logps.sum(),
            "logps/rejected": out.rejected_logps.sum(),
        }


@contextlib.contextmanager
def _adapter(model, name, back):
    """The PEFT model with adapter ``name`` active, then ``back`` again."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(back)
