"""Encoder-decoder models (T5, BART): padded batches built from the same token-store rows, the
decoder's log-probs through the fused lm_head, and a value head on the decoder for PPO.

Packing cannot isolate the sequences of an encoder-decoder model: the decoder's cross-attention
reads the whole encoder output of its own row, and transformers' T5 and BART take no packed
layout (sequence boundaries) for it. So these models run padded, one row per sequence:

    input_ids [E, Le], attention_mask [E, Le]   the encoder's rows (right-padded)
    encoder_index [B]                           which encoder row each decoder row reads: the two
                                                halves of a pair with the same prompt share one
    decoder_input_ids [B, Ld], decoder_attention_mask [B, Ld]
                                                the decoder start token, then the target shifted right
    labels [B * Ld]                             the target at each decoder position, row after row
                                                (flat, like ``PackedBatch.labels``), -100 where none

A row of a token store (``Sequence``: ids and a loss mask) splits at the end of its leading no-loss
tokens: those (the prompt) go to the encoder, the rest is the decoder's target, with a label where
the mask says so. A row with no such prefix (plain text) goes whole to both, as transformers and
TRL 0.7.10 train a seq2seq model on text (``labels = input_ids``). Either way a row's first token is
never a label, as in the packed layout, so a row counts the same loss tokens in both.

The lm_head runs only at label positions (``linear_logprobs``), on the decoder's final hidden
states as the model's own head reads them (T5 scales them by ``d_model ** -0.5``; BART adds its
``final_logits_bias``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from fastalign.data import IGNORE_INDEX, Sequence
from fastalign.data.packing import PackedBatch
from fastalign.kernels import linear_logprobs

from .packed import gathered, lm_head, sequence_logprobs
from .value_head import CausalLMWithValueHead, PolicyOutputs


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (a transformers model, PEFT-wrapped or under a value head) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@dataclass
class Seq2SeqBatch:
    """A padded encoder-decoder batch of ``B`` sequences (see the module docstring)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    encoder_index: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_attention_mask: torch.Tensor
    labels: torch.Tensor
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return self.decoder_input_ids.shape[0]

    @property
    def seq_index(self) -> torch.Tensor:
        """The sequence (decoder row) of each flat decoder position ``[B * Ld]``."""
        rows, width = self.decoder_input_ids.shape
        return torch.arange(rows, device=self.labels.device).repeat_interleave(width)

    @property
    def num_tokens(self) -> int:
        """Tokens computed, padding included: every encoder and decoder position."""
        return self.input_ids.numel() + self.decoder_input_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum()) + int(self.decoder_attention_mask.sum())

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> Seq2SeqBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Seq2SeqBatch(move(self.input_ids), move(self.attention_mask), move(self.encoder_index),
                            move(self.decoder_input_ids), move(self.decoder_attention_mask), move(self.labels),
                            move(self.chosen), move(self.rejected), {k: move(v) for k, v in self.extras.items()})


def split_row(seq: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(encoder ids, decoder target ids, labels)`` of one token-store row (module docstring)."""
    ids = np.asarray(seq.input_ids, dtype=np.int64)
    mask = np.ones(len(ids), bool) if seq.loss_mask is None else np.asarray(seq.loss_mask, dtype=bool)
    scored = mask.copy()
    scored[0] = False  # a row's first token is never a label
    if not scored.any():
        raise ValueError("an encoder-decoder row needs a loss token after its first")
    # The leading no-loss tokens are the prompt; a row that starts with a loss token has none.
    prefix = 0 if mask[0] else int(np.argmax(mask))
    encoder, target = (ids[:prefix], ids[prefix:]) if prefix else (ids, ids)
    labels = np.where(scored[prefix:], target, IGNORE_INDEX)
    return encoder, target, labels


def seq2seq_collate(units: list[list[Sequence]], extras: dict[str, list[float]] | None = None, *,
                    pad_token_id: int = 0, decoder_start_token_id: int = 0) -> Seq2SeqBatch:
    """One padded ``Seq2SeqBatch`` from units (single sequences, or (chosen, rejected) pairs, as
    ``fastalign.data.pack`` takes them); the halves of a unit with the same encoder input share
    one encoder row. ``extras``: one value per sequence, in unit order."""
    if any(len(u) != len(units[0]) or len(u) not in (1, 2) for u in units):
        raise ValueError("units must all be single sequences or all be (chosen, rejected) pairs")
    encoders, targets, labels, encoder_index = [], [], [], []
    for unit in units:
        for seq in unit:
            enc, target, lab = split_row(seq)
            if not (len(encoder_index) % len(unit) and np.array_equal(encoders[-1], enc)):
                encoders.append(enc)
            encoder_index.append(len(encoders) - 1)
            targets.append(target)
            labels.append(lab)
    le, ld = max(len(e) for e in encoders), max(len(t) for t in targets)
    input_ids = np.full((len(encoders), le), pad_token_id, dtype=np.int64)
    attention = np.zeros_like(input_ids)
    for k, enc in enumerate(encoders):
        input_ids[k, :len(enc)], attention[k, :len(enc)] = enc, 1
    decoder_ids = np.full((len(targets), ld), pad_token_id, dtype=np.int64)
    decoder_mask = np.zeros_like(decoder_ids)
    label_grid = np.full((len(targets), ld), IGNORE_INDEX, dtype=np.int64)
    for k, (target, lab) in enumerate(zip(targets, labels)):
        decoder_ids[k, 0] = decoder_start_token_id
        decoder_ids[k, 1:len(target)] = target[:-1]
        decoder_mask[k, :len(target)] = 1
        label_grid[k, :len(target)] = lab
    batch = Seq2SeqBatch(
        torch.from_numpy(input_ids), torch.from_numpy(attention), torch.tensor(encoder_index),
        torch.from_numpy(decoder_ids), torch.from_numpy(decoder_mask), torch.from_numpy(label_grid.reshape(-1)),
        extras={k: torch.tensor(v, dtype=torch.float32) for k, v in (extras or {}).items()},
    )
    if len(units[0]) == 2:
        batch.chosen = torch.arange(0, len(targets), 2)
        batch.rejected = batch.chosen + 1
    return batch


def seq2seq_collator(model):
    """``seq2seq_collate`` with ``model``'s pad and decoder start tokens: what a trainer's token
    store builds its micro-batches with for an encoder-decoder model."""
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    start = getattr(config, "decoder_start_token_id", None)
    return functools.partial(seq2seq_collate, pad_token_id=pad, decoder_start_token_id=pad if start is None else start)


def _inner(model):
    """The transformers model under a value head and a PEFT wrapper."""
    model = getattr(model, "pretrained_model", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def seq2seq_head(model) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight [V, H], bias [V] or None, scale)``: the logits are ``(scale * h) @ weight.T + bias``
    for the decoder's final hidden states ``h`` (T5 scales them when its config says so, BART adds
    ``final_logits_bias``)."""
    weight, bias = lm_head(model)
    inner = _inner(model)
    extra = getattr(inner, "final_logits_bias", None)
    if extra is not None:
        bias = extra.reshape(-1) if bias is None else bias + extra.reshape(-1)
    scale, dim = 1.0, getattr(inner, "model_dim", None)
    if dim is not None:
        scaled = getattr(inner.config, "scale_decoder_outputs", None)
        scale = dim ** -0.5 if (inner.config.tie_word_embeddings if scaled is None else scaled) else 1.0
    return weight, bias, scale


def decoder_states(model, batch: Seq2SeqBatch) -> torch.Tensor:
    """The decoder's final hidden states at every decoder position, flat ``[B * Ld, H]``: one
    encoder pass over the batch's encoder rows, each read by the decoder rows that share it."""
    encoded = model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.attention_mask
    if encoded.shape[0] != batch.num_sequences:
        encoded, mask = encoded[batch.encoder_index], mask[batch.encoder_index]
    out = model.get_decoder()(input_ids=batch.decoder_input_ids, attention_mask=batch.decoder_attention_mask,
                              encoder_hidden_states=encoded, encoder_attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def loss_positions(batch) -> torch.Tensor:
    """Flat positions that carry a label."""
    return (batch.labels != IGNORE_INDEX).nonzero()[:, 0]


def seq2seq_hidden(model, batch: Seq2SeqBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The lm_head's input ``[M, H]`` at ``positions`` (default: the label positions): the decoder's
    final hidden states, scaled as the model's head scales them."""
    pos = loss_positions(batch) if positions is None else positions
    _, _, scale = seq2seq_head(model)
    hidden = decoder_states(model, batch)[pos]
    return hidden * scale if scale != 1.0 else hidden


def seq2seq_head_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                          return_entropy: bool = False):
    """fp32 log-prob of each label from the lm_head's inputs (``seq2seq_hidden``), fused; with
    ``return_entropy`` also each row's entropy."""
    weight, bias, _ = seq2seq_head(model)
    with gathered(weight, bias):
        return linear_logprobs(hidden, weight, labels, bias, temperature=temperature, return_entropy=return_entropy)


def seq2seq_logprobs(model, batch: Seq2SeqBatch, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log-prob of each decoder position's label, ``[B, Ld]``, 0 where there is none."""
    pos = loss_positions(batch)
    logp = seq2seq_head_logprobs(model, seq2seq_hidden(model, batch, pos), batch.labels[pos], temperature)
    flat = torch.zeros(batch.labels.numel(), dtype=torch.float32, device=logp.device).index_put((pos,), logp)
    return flat.view(batch.num_sequences, -1)


def seq2seq_sequence_logprobs(model, batch: Seq2SeqBatch, average: bool = False) -> torch.Tensor:
    """fp32 ``[B]``: each sequence's summed (or, ``average``, mean) log-prob of its labels."""
    logp = seq2seq_logprobs(model, batch)
    if not average:
        return logp.sum(-1)
    counts = (batch.labels != IGNORE_INDEX).view(batch.num_sequences, -1).sum(-1)
    return logp.sum(-1) / counts.clamp(min=1)


def batch_sequence_logprobs(model, batch: PackedBatch | Seq2SeqBatch, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probs ``[S]`` of either layout: packed (causal LM) or padded (encoder-decoder)."""
    if isinstance(batch, Seq2SeqBatch):
        return seq2seq_sequence_logprobs(model, batch, average)
    return sequence_logprobs(model, batch, average)


class Seq2SeqLMWithValueHead(CausalLMWithValueHead):
    """An encoder-decoder LM (``pretrained_model``) plus ``v_head`` on the decoder's final hidden
    states, for PPO: queries go to the encoder, responses are the decoder's tokens. Saved as the
    value-head causal LM is: the model in Hugging Face format plus ``value_head.safetensors``."""

    causal_class = "CausalLMWithValueHead"  # what an error suggests for a decoder-only model

    def __init__(self, pretrained_model, **kwargs):
        if not is_encoder_decoder(pretrained_model):
            raise ValueError(f"{type(pretrained_model).__name__} is not an encoder-decoder model: use {self.causal_class}")
        super().__init__(pretrained_model, **kwargs)

    @property
    def base_model(self):
        return _inner(self.pretrained_model)

    def get_encoder(self):
        return self.pretrained_model.get_encoder()

    def get_decoder(self):
        return self.pretrained_model.get_decoder()

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                **kwargs):
        """``(logits, None, values)`` of a padded batch (values on the decoder), as TRL's model returns them."""
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                    decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                    output_hidden_states=True, use_cache=False, **kwargs)
        return out.logits, None, self.v_head(out.decoder_hidden_states[-1])


def seq2seq_logprobs_and_values(model, batch: Seq2SeqBatch, temperature: float = 1.0, return_entropy: bool = False,
                                positions: torch.Tensor | None = None) -> PolicyOutputs:
    """PPO's policy forward of a ``Seq2SeqLMWithValueHead``: one encoder and one decoder pass, then
    the heads at the label positions only (a rollout's response tokens): the fused lm_head and the
    value head (which reads the decoder's states unscaled). ``hidden`` is the lm_head's input."""
    pos = loss_positions(batch) if positions is None else positions
    states = decoder_states(model, batch)[pos]
    _, _, scale = seq2seq_head(model)
    hidden = states * scale if scale != 1.0 else states
    heads = seq2seq_head_logprobs(model, hidden, batch.labels[pos], temperature, return_entropy)
    logp, entropy = heads if return_entropy else (heads, None)
    return PolicyOutputs(logp, model.v_head(states).float(), hidden, entropy)
