"""Built-in tiny models and a character-level tokenizer: the embedded default, nothing downloaded.

The tokenizer maps each printable ASCII character (and newline) to one id, after four specials
(``<pad> <bos> <eos> <unk>``); its chat template renders ``<role>content`` lines. Models are
Llama- or Qwen2-style configs with random weights, small enough for a 2-core CPU.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in character-level tokenizer (100 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(arch: str = "llama", vocab_size: int = len(SPECIALS) + len(ALPHABET), hidden_size: int = 64,
               layers: int = 2, heads: int = 4, max_positions: int = 256, seed: int = 0):
    """A randomly initialised causal LM (``arch`` = "llama" or "qwen2") using sdpa attention."""
    import torch

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    configs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in configs:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {sorted(configs)}")
    config_cls, model_cls = configs[arch]
    config = config_cls(**common)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config)


def tiny_diffusion_pipeline(image_size: int = 64, seed: int = 0, prompt_length: int = 24):
    """A randomly initialised Stable Diffusion pipeline small enough for a CPU (diffusers needed).

    The same parts as Stable Diffusion, scaled down: a CLIP text encoder (hidden 32, 2 layers) over
    the built-in character tokenizer (prompts cut at ``prompt_length`` characters), a VAE with a
    downsampling factor of 4 (``image_size`` 64 gives 16 x 16 latents of 4 channels), a UNet with
    two resolution levels and cross-attention (about 1M parameters), and Stable Diffusion's DDIM
    scheduler settings (scaled-linear betas, ``steps_offset`` 1). Nothing is downloaded.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    except ImportError as err:
        raise ImportError("the tiny diffusion pipeline needs diffusers: pip install 'fastalign[diffusion]'") from err
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (a factor-4 VAE, then a 2-level UNet), got {image_size}")
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = prompt_length
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(SPECIALS) + len(ALPHABET), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=prompt_length, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
