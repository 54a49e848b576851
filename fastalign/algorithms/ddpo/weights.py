"""What a DDPO checkpoint holds of the pipeline: the UNet's weights, or only its LoRA adapters, in
``unet.safetensors``."""

from __future__ import annotations

from pathlib import Path

import torch

from fastalign.engine.checkpoint import Weights

FILE = "unet.safetensors"


def unet_weights(unet: torch.nn.Module, lora: bool) -> Weights:
    """How checkpoints write and read the trained UNet (its adapters alone with ``lora``)."""
    from safetensors.torch import load_file, save_file

    def trained_state() -> dict:
        if lora:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(unet)
        return unet.state_dict()

    def save(folder: Path, state_dict: dict | None) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in trained_state().items()}
        save_file(state, str(Path(folder) / FILE))

    def load(folder: Path) -> None:
        state = load_file(str(Path(folder) / FILE))
        if lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(unet, state)
        else:
            unet.load_state_dict(state)

    return Weights(save, load)
