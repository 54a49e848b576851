"""Models and tokenizers as TRL's trainers take them: a name with ``model_init_kwargs``, an object
with no tokenizer (the tokenizer saved beside it is loaded), or ``model_init``."""

from __future__ import annotations

import warnings

from fastalign.errors import ConfigError
from fastalign.models import BUILTIN, load_tokenizer

# from_pretrained keywords that change nothing here, or that fastalign decides itself.
QUIET = {"device_map", "low_cpu_mem_usage", "use_cache", "revision", "cache_dir", "use_auth_token", "token",
         "use_safetensors", "local_files_only"}


def init_kwargs(kwargs: dict | None) -> dict:
    """``model_init_kwargs`` (``from_pretrained``'s keywords) as fastalign's ``load_model`` keywords."""
    out = {}
    for key, value in (kwargs or {}).items():
        if key in ("torch_dtype", "dtype"):
            out["dtype"] = str(value).removeprefix("torch.") if value is not None else None
        elif key in ("trust_remote_code", "attn_implementation"):
            out[key] = value
        elif key == "use_flash_attention_2":
            out["attn_implementation"] = "flash_attention_2" if value else None
        elif key in ("load_in_8bit", "load_in_4bit", "quantization_config") and value:
            raise ConfigError(f"model_init_kwargs: {key} (bitsandbytes quantization) is not supported by fastalign")
        elif key not in QUIET:
            warnings.warn(f"model_init_kwargs: {key!r} is ignored by fastalign", stacklevel=4)
    return {k: v for k, v in out.items() if v is not None}


def resolve(model, tokenizer, model_init=None, model_init_kwargs=None, loader=None):
    """``(model, tokenizer)``: the model loaded when a name comes with ``model_init_kwargs`` (or
    built by ``model_init``), the tokenizer given or the one saved with the model (by its name,
    or ``config._name_or_path``), with a pad token (the end-of-sequence token when it has none)."""
    if model is None and model_init is not None:
        model = model_init()
    if model is None:
        raise ConfigError("give a model: a name, a path or a model object")
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if tokenizer is None:
        if not name:
            raise ConfigError("pass the tokenizer: the model object does not say where it was loaded from")
        tokenizer = load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(model, str) and model_init_kwargs:
        kwargs = init_kwargs(model_init_kwargs)
        if model in BUILTIN:
            kwargs.pop("trust_remote_code", None)
        model, _ = loader(model, **kwargs) if loader is not None else (model, None)
    return model, tokenizer
