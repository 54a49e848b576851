"""Settings that cannot train are refused, and no non-finite weight reaches a checkpoint or the
final model."""

import pytest
import torch

from fastalign.algorithms import SFTConfig, SFTTrainer
from fastalign.engine import Engine, TrainingConfig
from fastalign.errors import ConfigError
from fastalign.models.tiny import char_tokenizer, tiny_model

ROWS = [{"prompt": f"{a} {b}=", "completion": str(a * b)} for a in range(7) for b in range(6)]


def small(dtype=torch.float32):
    return tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1).to(dtype)


def test_float16_weights_are_refused_with_what_to_do(tmp_path):
    # AdamW's eps (1e-8) is 0 in float16: the first step used to turn every weight NaN.
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0
    with pytest.raises(ConfigError, match=r"float16 .*bf16 true"):
        Engine(small(torch.float16), TrainingConfig(output_dir=str(tmp_path)))
    Engine(small(torch.bfloat16), TrainingConfig(output_dir=str(tmp_path)))  # bfloat16 trains


def test_float16_base_with_float32_adapters_trains(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small(torch.float16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    Engine(model, TrainingConfig(output_dir=str(tmp_path)))


def test_a_step_that_makes_weights_non_finite_stops_before_any_save(tmp_path):
    model = small()
    optimizer = torch.optim.SGD(model.parameters(), lr=float("inf"))  # finite gradients, infinite update
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, save_steps=1, max_tokens_per_batch=64,
                     disable_tqdm=True)
    trainer = SFTTrainer(model, args=args, train_dataset=ROWS, tokenizer=char_tokenizer(), optimizers=(optimizer, None))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train()
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / "model.safetensors").exists()
