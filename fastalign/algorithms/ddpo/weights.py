"""What a DDPO checkpoint holds of the pipeline: the UNet's weights, or only its LoRA adapters."""

from __future__ import annotations

from pathlib import Path


class TrainedWeights:
    """What a checkpoint holds of the pipeline: the UNet, or only its LoRA adapters."""

    def __init__(self, unet, lora: bool):
        self.unet, self.lora = unet, lora

    def save_pretrained(self, folder, safe_serialization=True, state_dict=None):
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self._state().items()}
        save_file(state, str(Path(folder) / "unet.safetensors"))

    def load_saved_weights(self, folder):
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "unet.safetensors"))
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.unet, state)
        else:
            self.unet.load_state_dict(state)

    def _state(self) -> dict:
        if self.lora:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.unet)
        return self.unet.state_dict()
