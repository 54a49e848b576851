"""``trl.DPOTrainer`` (0.7.10's signature) on fastalign's ``DPOTrainer``.

Logged under TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected``
(``eval_``-prefixed in evaluation). The logits are never materialised: ``logits/chosen`` is the
mean over the vocabulary and over each chosen sequence's tokens, ``h . mean(W) + mean(b)`` from the
final hidden states, averaged over pairs (TRL's mean also counts its padding positions).

An encoder-decoder model (``is_encoder_decoder``: read off the model's config, as TRL does when it
has the model) runs padded: the prompt through the encoder once for both halves of a pair, the
completions as the decoder's targets; ``logits/chosen`` averages over the real decoder positions.
``max_target_length`` (TRL's bound on an encoder-decoder model's completions) makes ``max_length``
at most ``max_prompt_length + max_target_length``, so a too-long pair's completions are cut to it.

Where TRL 0.7.10 has known bugs fastalign keeps its own, correct behaviour: ``ipo`` averages
log-probs over the completion tokens with a guard (a sequence with none averages to 0, where TRL's
mean turns NaN), ``reference_free=True`` (a keyword here) runs without any reference model (TRL
still needs one and crashes without), and ``max_length`` cuts each pair, never a whole batch.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fastalign.algorithms import dpo as native
from fastalign.errors import ConfigError
from fastalign.functional import dpo_loss as functional_dpo_loss
from fastalign.models import (
    Seq2SeqBatch,
    batch_sequence_logprobs,
    body,
    eval_mode,
    lm_head,
    load_model,
)
from fastalign.models.seq2seq import is_encoder_decoder as encoder_decoder
from fastalign.models.seq2seq import seq2seq_head

from .base import TRLTrainer
from .loading import init_kwargs, resolve
from .utils import DPODataCollatorWithPadding


class DPOTrainer(TRLTrainer, native.DPOTrainer):
    trl_name = "DPOTrainer"

    def __init__(self, model=None, ref_model=None, beta=0.1, label_smoothing=0, loss_type="sigmoid", args=None,
                 data_collator=None, label_pad_token_id=-100, padding_value=None, truncation_mode="keep_end",
                 train_dataset=None, eval_dataset=None, tokenizer=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, max_length=None, max_prompt_length=None,
                 max_target_length=None, peft_config=None, is_encoder_decoder=None, disable_dropout=True,
                 generate_during_eval=False, compute_metrics=None, precompute_ref_log_probs=False,
                 model_init_kwargs=None, ref_model_init_kwargs=None, model_adapter_name=None, ref_adapter_name=None,
                 *, reference_free=False, max_tokens_per_batch=None):
        if data_collator is not None and not isinstance(data_collator, DPODataCollatorWithPadding):
            raise ConfigError(f"data_collator={type(data_collator).__name__}: fastalign packs the pairs itself; give "
                              "rows with prompt, chosen and rejected")
        model, tokenizer = resolve(model, tokenizer, model_init, model_init_kwargs, self.model_loader)
        if isinstance(ref_model, str) and ref_model_init_kwargs:
            ref_model = load_model(ref_model, **init_kwargs(ref_model_init_kwargs))[0]
        config, _ = self._map_args(
            args, native.DPOConfig, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
            truncation_mode=truncation_mode, max_length=_max_length(model, max_length, max_prompt_length, max_target_length),
            max_prompt_length=128 if max_prompt_length is None else max_prompt_length, disable_dropout=disable_dropout,
            precompute_ref_log_probs=precompute_ref_log_probs, model_adapter_name=model_adapter_name,
            ref_adapter_name=ref_adapter_name, reference_free=reference_free, max_tokens_per_batch=max_tokens_per_batch)
        config.__post_init__()  # the loss options set after construction are checked too
        config.average_log_prob = config.loss_type == "ipo"
        self.beta, self.loss_type, self.label_smoothing = config.beta, config.loss_type, config.label_smoothing
        self.generate_during_eval = generate_during_eval
        rows = eval_dataset if generate_during_eval and eval_dataset is not None else []
        self._game_rows = [rows[i] for i in range(min(4, len(rows)))]
        model, peft_config, optimizers = self._optimizers(model, tokenizer, peft_config, optimizers)
        super().__init__(model, ref_model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         tokenizer=tokenizer, peft_config=peft_config, optimizers=optimizers)
        self.is_encoder_decoder = encoder_decoder(self.model)  # TRL's argument: read off the model
        self._hidden = None
        watched = self.model.get_decoder() if self.is_encoder_decoder else body(self.model)
        watched.register_forward_hook(self._keep_hidden)
        self._after_init(callbacks, compute_metrics)

    # ---- TRL's extra metrics and its loss method -------------------------------------------------
    def _keep_hidden(self, module, inputs, output):
        hidden = output.last_hidden_state
        self._hidden = (hidden.reshape(-1, hidden.shape[-1]) if self.is_encoder_decoder else hidden[0]).detach()

    def compute_loss(self, batch):
        loss, sums = super().compute_loss(batch)
        hidden, self._hidden = self._hidden, None
        if hidden is not None:
            if isinstance(batch, Seq2SeqBatch):  # the decoder's positions, padding left out
                weight, bias, scale = seq2seq_head(self.model)
                hidden, seq = hidden * scale, batch.seq_index.to(hidden.device)
                real = batch.decoder_attention_mask.reshape(-1).to(hidden.device).bool()
                hidden, seq, lengths = hidden[real], seq[real], batch.decoder_attention_mask.sum(1)
            else:
                weight, bias = lm_head(self.model)
                seq, lengths = batch.seq_index.to(hidden.device), batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
            mean_logit = hidden.float() @ weight.detach().float().mean(0)
            if bias is not None:
                mean_logit = mean_logit + bias.detach().float().mean()
            per_seq = torch.zeros(lengths.numel(), device=hidden.device).index_add_(0, seq, mean_logit)
            per_seq = per_seq / lengths.to(hidden.device)
            sums["logits/chosen"] = per_seq[batch.chosen].sum()
            sums["logits/rejected"] = per_seq[batch.rejected].sum()
        return loss, sums

    def dpo_loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 reference_free: bool = False):
        """TRL 0.7.10's method: ``(losses, chosen_rewards, rejected_rewards)`` with this trainer's
        ``beta``, ``loss_type`` and ``label_smoothing``."""
        return functional_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, beta=self.beta, loss_type=self.loss_type,
                                   label_smoothing=self.label_smoothing, reference_free=reference_free)

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_store(self, dataset):
        return self._pairs("eval", dataset, self.tokenizer, self.args)

    @torch.no_grad()
    def _predictions(self, batches) -> np.ndarray:
        """Each pair's implicit rewards ``[chosen, rejected]`` (``beta x log(pi / pi_ref)``)."""
        out = np.zeros((len(batches.store), 2))
        with eval_mode(self.model):
            for k in range(len(batches)):
                batch = batches[k].to(self.engine.device)
                with self.engine.autocast():
                    policy = batch_sequence_logprobs(self.model, batch, average=self.args.average_log_prob)
                    ref = self.reference_logps(batch) if not self.args.reference_free else torch.zeros_like(policy)
                rewards = self.args.beta * (policy - ref).float()
                out[batches.plan[k]] = torch.stack([rewards[batch.chosen], rewards[batch.rejected]], 1).cpu().numpy()
        return out[batches.store.kept]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        out = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.generate_during_eval and self._game_rows:
            self._game_log()
        return out

    @torch.no_grad()
    def _game_log(self, max_new_tokens: int = 64) -> None:
        """A few evaluation prompts with the policy's and the reference's completions, appended to
        ``OUTPUT_DIR/game_log.jsonl`` (TRL logs the same table to wandb)."""
        tok, device = self.tokenizer, self.engine.device
        lines = []
        for row in self._game_rows:
            prompt = row.get("prompt") or os.path.commonprefix([row["chosen"], row["rejected"]])
            ids = tok(prompt, return_tensors="pt").input_ids[:, -self.args.max_prompt_length:].to(device)
            texts = {}
            for name, ref in (("policy", False), ("ref_model", True)):
                model = self.ref_model if ref and self.ref_model is not None else self.model
                context = self._reference_context() if ref and self.ref_model is None else _null()
                with context, eval_mode(model):
                    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
                texts[name] = tok.decode(new[0, 1 if self.is_encoder_decoder else ids.shape[1]:], skip_special_tokens=True)
            lines.append(json.dumps({"step": self.global_step, "prompt": prompt, **texts}))
        os.makedirs(self.args.output_dir, exist_ok=True)  # an evaluation before train() comes first
        with open(os.path.join(self.args.output_dir, "game_log.jsonl"), "a") as f:
            f.write("\n".join(lines) + "\n")


def _max_length(model, max_length, max_prompt_length, max_target_length) -> int:
    """TRL's ``max_length`` (512 by default); for an encoder-decoder model given ``max_target_length``
    (TRL's bound on its completions), ``max_prompt_length + max_target_length`` when that is
    smaller, so a too-long pair's completions are cut to ``max_target_length``."""
    length = 512 if max_length is None else max_length
    if max_target_length is not None and encoder_decoder(model):
        length = min(length, (128 if max_prompt_length is None else max_prompt_length) + max_target_length)
    return length


def _null():
    import contextlib

    return contextlib.nullcontext()
