"""Loading models and tokenizers, and picking the attention backend for the packed forward.

Models are named as on the Hugging Face hub (or a local path), or given as objects. Two built-in
names need no download: ``fastalign/tiny-llama`` and ``fastalign/tiny-qwen2`` (random weights, the
character tokenizer), the embedded default. A name that cannot be loaded fails at once, in one
line: another ``fastalign/`` name is a ``ConfigError`` suggesting the closest built-in, a local
path that does not exist a ``FileNotFoundError``, and a Hub name while the Hub cannot be reached a
``ConfigError`` unless the local cache holds it (``fastalign.data.hub``).

Attention, best first: ``flash_attention_2`` when flash-attn is installed and the model is on
CUDA; else ``fastalign_varlen`` (``models/varlen.py``: torch's ``varlen_attn`` on CUDA, one sdpa
call per packed sequence elsewhere); plain ``sdpa`` only if transformers cannot register it. All
keep packed sequences apart given restarting ``position_ids``, no attention mask and no cache (the
packed forward does that); sdpa over a whole packed row does it with an ``[N, N]`` mask, at the
cost of the row length squared. An encoder-decoder model (T5, BART) keeps its own attention: it
runs padded with attention masks (``models/seq2seq.py``).
"""

from __future__ import annotations

import difflib
import importlib.util
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from fastalign.data.hub import from_hub, looks_local, not_found
from fastalign.errors import CheckpointError, ConfigError, UsageError

from .seq2seq import is_encoder_decoder
from .tiny import char_tokenizer, tiny_model

BUILTIN = {"fastalign/tiny-llama": "llama", "fastalign/tiny-qwen2": "qwen2"}
PADDED = "encoder-decoder: padded batches with attention masks, packing cannot isolate its sequences"


def attention_backend(device) -> tuple[str, str]:
    """``(attn_implementation, why)`` for a model that will run on ``device``."""
    from .varlen import cuda_varlen_available, register_varlen_attention

    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "flash-attn is installed and the model runs on CUDA"
    if register_varlen_attention():
        if device.type == "cuda" and cuda_varlen_available():
            return "fastalign_varlen", "CUDA without flash-attn: torch varlen_attn"
        return "fastalign_varlen", f"{device.type}: one causal sdpa call per packed sequence, no [N, N] mask"
    return "sdpa", f"{device.type}: sdpa with restarting position_ids and no attention mask"


def _broken_safetensors(folder: Path) -> Path | None:
    """The first safetensors file of ``folder`` whose header cannot be read, else None."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:
            return file
    return None


def _located(name: str, load):
    """``load(name)`` for a model or tokenizer name that is not a built-in: a local path, or else a
    Hub name (see the module docstring)."""
    if name.startswith("fastalign/"):
        close = difflib.get_close_matches(name, BUILTIN, n=1, cutoff=0.5)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{name!r} is not a built-in model; {guess}(built-in: {', '.join(BUILTIN)})")
    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json", "tokenizer.json")):
        raise ConfigError(f"{name}: not a model folder (it holds no config.json; a model saved with save_pretrained, "
                          f"or a built-in: {', '.join(BUILTIN)})")
    if path.exists():
        try:
            return load(str(path))
        except UsageError:
            raise
        except pickle.UnpicklingError:  # transformers reads .bin weights with weights_only=True
            raise ConfigError(f"{name}: its .bin weights hold Python objects besides tensors, which could run code; "
                              "fastalign does not load them (save the model as safetensors)") from None
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # not a model, config.json not JSON, ...
            broken = _broken_safetensors(path)
            what = f"{broken}: cannot be read" if broken else f"{name}: cannot be loaded"
            raise ConfigError(f"{what} ({type(err).__name__}: {_first_line(err)})") from None
    if looks_local(name):
        raise not_found(name, "model folder")
    return from_hub(lambda: load(name), "model", name, f"; built-in models: {', '.join(BUILTIN)}")


def load_tokenizer(name: str):
    if name in BUILTIN:
        return char_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _located(name, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model, *, dtype=None, trust_remote_code: bool = False, device=None, attn_implementation=None,
               num_labels: int | None = None, **tiny_kwargs):
    """A causal LM (or, with ``num_labels``, a sequence classifier) from a name, path or object; a
    name whose config is an encoder-decoder's loads as ``AutoModelForSeq2SeqLM``, and an
    encoder-decoder model keeps its own attention (it runs padded, ``models/seq2seq.py``).

    Returns ``(model, attention_report)``; the attention backend is picked for ``device``
    (default: CUDA when available) unless ``attn_implementation`` names one.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    impl, why = (attn_implementation, "asked for") if attn_implementation else attention_backend(device)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if not isinstance(model, str):
        if is_encoder_decoder(model):  # run padded, with its own attention (fastalign_varlen is causal)
            if attn_implementation:
                model.set_attn_implementation(attn_implementation)
            return model, f"{model.config._attn_implementation} ({PADDED})"
        if attn_implementation or impl != "sdpa":
            model.set_attn_implementation(impl)
        return model, f"{model.config._attn_implementation} ({why})"
    if model in BUILTIN:
        if num_labels is not None:
            raise ValueError(f"{model} is a causal LM; a scalar head is added by the reward trainer")
        built = tiny_model(BUILTIN[model], **tiny_kwargs)
        if dtype is not None:
            built = built.to(dtype)
        return load_model(built, device=device, attn_implementation=attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=impl)
    if num_labels is None:
        def load(name):
            if AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).is_encoder_decoder:
                return AutoModelForSeq2SeqLM.from_pretrained(name, **{**kwargs, "attn_implementation": attn_implementation})
            return AutoModelForCausalLM.from_pretrained(name, **kwargs)

        loaded = _located(model, load)
    else:
        loaded = _located(model, lambda name: AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, **kwargs))
    if is_encoder_decoder(loaded):
        return loaded, f"{loaded.config._attn_implementation} ({PADDED})"
    return loaded, f"{impl} ({why})"


def as_reward_model(causal_lm):
    """A one-label sequence classifier with ``causal_lm``'s body and config and a fresh scalar head
    (initialised as the architecture initialises it)."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config._attn_implementation = causal_lm.config._attn_implementation
    reward = AutoModelForSequenceClassification.from_config(config)
    reward.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return reward.to(next(causal_lm.parameters()).dtype)


def load_reward_model(model, *, dtype=None, trust_remote_code: bool = False, device=None, attn_implementation=None):
    """A reward model: a sequence classifier with one label, from a name, path or object. A causal
    LM (a built-in, or an object) keeps its body and gets a fresh scalar head; a hub name is loaded
    with ``AutoModelForSequenceClassification`` (which adds the head when the checkpoint has none).
    Returns ``(model, attention_report)``."""
    if isinstance(model, str) and model not in BUILTIN:
        model, report = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                                   attn_implementation=attn_implementation, num_labels=1)
        return _decoder_only(model), report
    model, report = load_model(_decoder_only(model), dtype=dtype, device=device, attn_implementation=attn_implementation)
    if model.get_output_embeddings() is not None:  # a causal LM: swap its head for a scalar one
        model = as_reward_model(model)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ConfigError(f"a reward model has one label (a scalar score); {type(model).__name__} has "
                          f"{model.config.num_labels}")
    return model, report


def check_shared_tokens(policy, tokenizer, other, name: str, key: str) -> None:
    """Refuse ``other`` (the model ``name`` given by run key ``key``: a reference or reward model),
    which reads the policy's token ids, unless it reads them as the policy does: its tokenizer
    saved beside it, if any, is ``tokenizer``; else its vocabulary has the policy's size."""
    theirs = None
    if name in BUILTIN or (Path(name).expanduser() / "tokenizer_config.json").is_file():
        theirs = load_tokenizer(name)
    if theirs is not None and tokenizer is not None:
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"{key}={name}: its tokenizer is not the policy's ({len(theirs)} tokens, the policy's "
                              f"{len(tokenizer)}); it reads the policy's token ids, so both must share one tokenizer")
        return
    sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (policy, other)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ConfigError(f"{key}={name}: its vocabulary has {sizes[1]} tokens, the policy's {sizes[0]}; it reads the "
                          "policy's token ids, so both must share one tokenizer")


def _decoder_only(model):
    """``model``, unless it is an encoder-decoder model: reward models read a score at each packed
    sequence's last token (TRL 0.7.10's RewardTrainer has no encoder-decoder path either)."""
    if not isinstance(model, str) and is_encoder_decoder(model):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model: reward modeling (and PPO's reward "
                          "model) takes decoder-only models")
    return model


def prepare_model(model, tokenizer=None, peft_config=None, loader=load_model):
    """What every trainer does first: ``(model, tokenizer, attention_report)`` with the model
    loaded by ``loader`` (a name, path or object), LoRA applied when ``peft_config`` is given, and
    the tokenizer given or, for a named model, the one named like it."""
    if tokenizer is None and isinstance(model, str):
        tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer (a model object does not carry one)")
    model, report = loader(model)
    if peft_config is not None:
        from peft import get_peft_model
        from peft.utils.error import NoMatchingPeftModuleError

        try:
            model = get_peft_model(model, peft_config)
        except NoMatchingPeftModuleError:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            targets = peft_config.target_modules
            targets = targets if isinstance(targets, str) else sorted(targets)
            raise ConfigError(f"LoRA target modules {targets} (lora_target_modules): no "
                              f"module of {type(model).__name__} has such a name; its linear layers are "
                              f"{', '.join(linear)}") from None
    return model, tokenizer, report


def read_safetensors(path) -> dict:
    """The tensors of a safetensors file; one that cannot be read (cut short, or not safetensors) is
    a ``CheckpointError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def load_model_weights(model, checkpoint, exclude=()) -> None:
    """Load the weights ``save_pretrained`` wrote in ``checkpoint`` into ``model`` (PEFT or not);
    a model with its own ``load_saved_weights`` (the value-head model) loads itself. A weights file
    that cannot be read is a ``CheckpointError`` naming it."""
    load_file = read_safetensors
    checkpoint = Path(checkpoint)
    if hasattr(model, "load_saved_weights"):
        model.load_saved_weights(checkpoint)
        return
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    files = sorted(f for f in checkpoint.glob("*.safetensors") if f.name not in exclude)
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]})")
