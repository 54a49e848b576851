"""PPO's frozen reference model: a copy of the policy, optionally sharing its bottom layers."""

from __future__ import annotations

import copy
import re

import torch

from fastalign.errors import ConfigError

# Decoder-layer names, to find where the layers shared with the reference stop.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def create_reference_model(model: torch.nn.Module, num_shared_layers: int | None = None,
                           share: bool = True) -> torch.nn.Module:
    """A frozen reference for ``model`` (a causal LM): a copy, or with ``num_shared_layers`` one
    whose parameters below that layer (embeddings and the first ``num_shared_layers`` layers) are
    the policy's own, frozen in the policy too, so only the layers above are copied (``share=False``
    copies them anyway, frozen in both, for ZeRO-3, which cannot shard one tensor for two models)."""
    if num_shared_layers is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError("num_shared_layers is for decoder-only models; an encoder-decoder model's reference is a copy")
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    if num_shared_layers is None:
        return ref
    names = [n for n, _ in model.named_parameters()]
    layers = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    if not layers:
        raise ConfigError(f"num_shared_layers: no decoder layers found in {type(model).__name__}'s parameter names")
    if not 0 <= num_shared_layers <= max(layers):
        raise ConfigError(f"num_shared_layers must be in [0, {max(layers)}] ({max(layers) + 1} layers), got {num_shared_layers}")
    for name, param in model.named_parameters():
        m = _LAYER.search(name)
        if m is not None and int(m.group(1)) >= num_shared_layers:
            break  # parameters come in module order: everything from here on is the policy's own
        param.requires_grad_(False)
        if share:
            owner, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(owner) if owner else ref, leaf, param)
    return ref
