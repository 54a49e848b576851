"""A causal LM with a value head, for PPO: a scalar on the last hidden state of every token.

The head is dropout then a ``Linear(hidden, 1)`` (``summary_dropout_prob`` 0.1 by default),
initialised as the architecture initialises its layers unless ``v_head_init_strategy="normal"``
(normal with ``v_head_initializer_range``, zero bias). Saved in Hugging Face format: the language
model with its own ``save_pretrained`` (loadable alone by ``AutoModelForCausalLM``), the head in
``value_head.safetensors`` beside it (keys ``v_head.summary.weight`` / ``.bias``).

The wrapper exposes what the packed forward reads (``config``, ``base_model``, the output
embeddings), so ``packed_hidden`` and ``packed_logprobs`` take it as they take the bare model, and
``packed_logprobs_and_values`` (the policy forward of PPO) gets log-probs and values from one body
call.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastalign.data import IGNORE_INDEX, PackedBatch

from .packed import body, head_logprobs, packed_hidden

HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1)


class CausalLMWithValueHead(nn.Module):
    """``pretrained_model`` (any causal LM) plus ``v_head``."""

    def __init__(self, pretrained_model, summary_dropout_prob: float = 0.1, v_head_init_strategy: str | None = None,
                 v_head_initializer_range: float = 0.2):
        super().__init__()
        self.pretrained_model = pretrained_model
        hidden = pretrained_model.get_output_embeddings().weight.shape[1]
        self.v_head = ValueHead(hidden, summary_dropout_prob)
        if v_head_init_strategy == "normal":
            nn.init.normal_(self.v_head.summary.weight, std=v_head_initializer_range)
            nn.init.zeros_(self.v_head.summary.bias)
        elif v_head_init_strategy is not None:
            raise ValueError(f"v_head_init_strategy must be None or 'normal', got {v_head_init_strategy!r}")
        self.v_head.to(next(pretrained_model.parameters()).device)

    # ---- what the packed forward and generation read -------------------------------------------
    @property
    def config(self):
        return self.pretrained_model.config

    @property
    def base_model(self):
        """The transformer body (under PEFT, the adapted body of the wrapped model)."""
        return body(self.pretrained_model)

    def is_peft(self) -> bool:
        return hasattr(self.pretrained_model, "disable_adapter") and hasattr(self.pretrained_model, "peft_config")

    def get_output_embeddings(self):
        return self.pretrained_model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.pretrained_model.get_input_embeddings()

    def set_attn_implementation(self, impl):
        self.pretrained_model.set_attn_implementation(impl)

    def generate(self, *args, **kwargs):
        return self.pretrained_model.generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """``(logits, None, values)`` of a padded batch, as TRL's value-head model returns them."""
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                    **kwargs)
        return out.logits, None, self.v_head(out.hidden_states[-1])

    # ---- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, path, state_dict=None, **kwargs):
        from safetensors.torch import save_file

        path = Path(path)
        if state_dict is not None:  # a full state dict (gathered under ZeRO-3): split it in two
            lm = {k.removeprefix("pretrained_model."): v for k, v in state_dict.items() if not k.startswith("v_head.")}
            head = {k: v for k, v in state_dict.items() if k.startswith("v_head.")}
        else:
            lm, head = None, {f"v_head.{k}": v for k, v in self.v_head.state_dict().items()}
        self.pretrained_model.save_pretrained(path, state_dict=lm, **kwargs)
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / HEAD_FILE))

    def load_saved_weights(self, path) -> None:
        """Load what ``save_pretrained`` wrote in ``path`` (a checkpoint) into this model."""
        from .loading import load_model_weights, read_safetensors

        load_model_weights(self.pretrained_model, path, exclude=(HEAD_FILE,))
        state = read_safetensors(Path(path) / HEAD_FILE)
        self.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})

    @classmethod
    def from_pretrained(cls, model, **kwargs):
        """From a name, path or causal LM object; a saved value head beside it is loaded."""
        from .loading import load_model, read_safetensors

        head_kwargs = {k: kwargs.pop(k) for k in ("summary_dropout_prob", "v_head_init_strategy",
                                                  "v_head_initializer_range") if k in kwargs}
        lm, _ = load_model(model, **kwargs)
        wrapped = cls(lm, **head_kwargs)
        if isinstance(model, str) and (Path(model) / HEAD_FILE).is_file():
            state = read_safetensors(Path(model) / HEAD_FILE)
            wrapped.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})
        return wrapped


class PolicyOutputs(NamedTuple):
    """What the policy forward gives at a packed batch's ``M`` loss positions, in order."""

    logprobs: torch.Tensor  # fp32 [M]: the log-prob of each position's label
    values: torch.Tensor  # fp32 [M]: the value head
    hidden: torch.Tensor  # [M, H]: the final hidden states the heads read
    entropy: torch.Tensor | None = None  # fp32 [M], with return_entropy


def packed_logprobs_and_values(model, batch: PackedBatch, temperature: float = 1.0,
                               return_entropy: bool = False, positions: torch.Tensor | None = None) -> PolicyOutputs:
    """The policy forward of a value-head model: one body call over the packed row, then the
    heads at its loss positions only (a PPO batch's response tokens): the fused lm_head (no
    ``[N, V]`` logits; log-probs at ``temperature``, and each position's entropy with
    ``return_entropy``) and the value head. ``positions`` (the loss positions, when the caller
    already has them) saves finding them again."""
    pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0] if positions is None else positions
    hidden = packed_hidden(model, batch)[pos]
    heads = head_logprobs(model, hidden, batch.labels[pos], temperature, return_entropy)
    logp, entropy = heads if return_entropy else (heads, None)
    return PolicyOutputs(logp, model.v_head(hidden).float(), hidden, entropy)
