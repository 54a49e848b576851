"""``trl.core``: TRL 0.7.10's helpers (``set_seed``, ``LengthSampler``, ``respond_to_batch``,
``logprobs_from_logits``, the masked statistics, the stats dict helpers) on fastalign's kernels."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
import transformers

from fastalign.algorithms.ppo import LengthSampler
from fastalign.kernels import entropy_from_logits, selective_logprobs
from fastalign.kernels.rl import masked_mean as _masked_mean
from fastalign.kernels.rl import masked_var, masked_whiten

WANDB_PADDING = -1

__all__ = ["LengthSampler", "WANDB_PADDING", "add_suffix", "average_torch_dicts", "clip_by_value", "convert_to_scalar",
           "entropy_from_logits", "flatten_dict", "logprobs_from_logits", "masked_mean", "masked_var", "masked_whiten",
           "pad_to_size", "respond_to_batch", "set_seed", "stack_dicts", "stats_to_np", "whiten"]


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    transformers.set_seed(seed)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits`` (``[..., V]`` and ``[...]``), through the chunked
    kernel (no full log-softmax kept); ``gather=False`` returns the whole log-softmax."""
    if not gather:
        return torch.log_softmax(logits, dim=-1)
    return selective_logprobs(logits, labels).to(logits.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    if axis is None:
        return _masked_mean(values, mask)
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def whiten(values: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = torch.mean(values), torch.var(values)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def clip_by_value(x: torch.Tensor, tensor_min, tensor_max) -> torch.Tensor:
    return torch.max(torch.min(x, torch.as_tensor(tensor_max)), torch.as_tensor(tensor_min))


def flatten_dict(nested: Mapping, sep: str = "/") -> dict:
    out = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}{sep}")
            else:
                out[f"{prefix}{key}"] = value

    walk(nested, "")
    return out


def convert_to_scalar(stats: dict) -> dict:
    """One-element tensors and arrays as Python numbers (for loggers)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and (len(value.shape) == 0 or value.shape == (1,)):
            value = value.item()
        out[key] = value
    return out


def stack_dicts(stats_dicts: list[dict]) -> dict:
    """Dicts of tensors stacked key by key (padded to the longest, as TRL pads with WANDB_PADDING)."""
    out = {}
    for key in stats_dicts[0]:
        values = [torch.as_tensor(d[key]).flatten() for d in stats_dicts]
        out[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=WANDB_PADDING)
    return out


def add_suffix(input_dict: dict, suffix: str) -> dict:
    return {key + suffix: value for key, value in input_dict.items()}


def pad_to_size(tensor: torch.Tensor, size: int, dim: int = 1, padding: int = 50256) -> torch.Tensor:
    t_size = tensor.size()[dim]
    if t_size == size:
        return tensor
    return torch.nn.functional.pad(tensor, (0, size - t_size), "constant", padding)


def average_torch_dicts(list_of_dicts: list[dict]) -> dict:
    return {key: torch.mean(torch.stack([d[key] for d in list_of_dicts]), axis=0) for key in list_of_dicts[0]}


def stats_to_np(stats_dict: dict) -> dict:
    """Tensors as numpy arrays (float32), 0-d ones as Python floats."""
    out = {}
    for key, value in stats_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.dtype == torch.bfloat16 else value
            value = value.numpy()
        if np.isscalar(value) or (isinstance(value, np.ndarray) and value.ndim == 0):
            value = float(value)
        out[key] = value
    return out


@torch.no_grad()
def respond_to_batch(model, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sample ``txt_len`` tokens after each query of ``queries`` (``[B, L]``) with top-k/top-p
    filtering, one token at a time; returns the new tokens ``[B, txt_len]``. ``model`` returns the
    logits first (a value-head model, or any causal LM)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    input_ids = queries.to(device)
    warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    for _ in range(txt_len):
        out = model(input_ids)
        logits = (out[0] if isinstance(out, tuple) else out.logits)[:, -1, :]
        for warp in warpers:
            logits = warp(input_ids, logits)
        next_token = torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1)
        input_ids = torch.cat([input_ids, next_token], dim=-1)
    return input_ids[:, -txt_len:]
