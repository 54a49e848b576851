"""Loading models by name, path or object; the attention backend; LoRA and gradient checkpointing."""

import pytest
import torch

from fastalign.algorithms import SFTConfig, SFTTrainer
from fastalign.models import attention_backend, load_model, load_tokenizer
from fastalign.models.tiny import char_tokenizer, tiny_model

ROWS = [{"prompt": f"{a}{b}=", "completion": f"{b}{a}"} for a in range(6) for b in range(6)]


def test_cpu_uses_per_sequence_attention_and_says_why():
    impl, why = attention_backend("cpu")
    assert impl == "fastalign_varlen" and "per packed sequence" in why


def test_builtin_names_and_saved_paths(tmp_path):
    model, report = load_model("fastalign/tiny-qwen2", device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and report.startswith("fastalign_varlen")
    assert load_tokenizer("fastalign/tiny-qwen2").vocab_size == char_tokenizer().vocab_size
    model.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert again.dtype == torch.bfloat16 and again.config._attn_implementation == "fastalign_varlen"
    with pytest.raises(ValueError, match="unknown tiny arch"):
        load_model(tiny_model("gpt2"))


def test_lora_trains_only_adapters_and_resumes(tmp_path):
    from peft import LoraConfig

    base = tiny_model("llama", hidden_size=32, layers=1, heads=2)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, save_steps=2, learning_rate=1e-2, disable_tqdm=True,
                     max_tokens_per_batch=64)
    trainer = SFTTrainer(base, args=args, train_dataset=ROWS, tokenizer=char_tokenizer(), peft_config=lora)
    trainer.train()
    for name, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace("base_layer.", "")]), name
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    # Resuming a LoRA run loads the adapters back.
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    again = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2), args=args, train_dataset=ROWS,
                       tokenizer=char_tokenizer(), peft_config=lora)
    assert again.train()["steps"] == 1


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    runs = []
    for flag in (False, True):
        args = SFTConfig(output_dir=str(tmp_path / str(flag)), max_steps=1, gradient_checkpointing=flag, disable_tqdm=True)
        t = SFTTrainer(tiny_model("llama", hidden_size=32, layers=2, heads=2), args=args, train_dataset=ROWS,
                       tokenizer=char_tokenizer())
        on = t.model.is_activation_checkpointing if hasattr(t.model, "is_activation_checkpointing") \
            else t.model.is_gradient_checkpointing
        assert on is flag
        t.train()
        runs.append(t.model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_lora_target_modules_the_model_lacks_are_named_with_its_linear_layers():
    # peft's NoMatchingPeftModuleError reached the command as a failure at run time (status 1).
    from peft import LoraConfig

    from fastalign.errors import ConfigError
    from fastalign.models.loading import prepare_model

    with pytest.raises(ConfigError, match=r"^LoRA target modules \['nonexistent_proj'\] \(lora_target_modules\): no "
                                          r"module of LlamaForCausalLM .* its linear layers are down_proj, .*q_proj"):
        prepare_model("fastalign/tiny-llama", peft_config=LoraConfig(target_modules=["nonexistent_proj"]))


class _Runs:
    """Unpickled, it writes a file: proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _saved(folder):
    tiny_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_model_folder_that_cannot_be_loaded_is_named(tmp_path):
    # Each reached the command as a library's error without the folder or file (status 1).
    from fastalign.errors import ConfigError

    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"notes: not a model folder \(it holds no config.json"):
        load_model(str(tmp_path / "notes"))
    bad = _saved(tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"^{bad}: cannot be loaded \(OSError: .*config.json' is not a valid JSON"):
        load_model(str(bad))
    cut = _saved(tmp_path / "cut")
    _cut(cut / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"^{cut / 'model.safetensors'}: cannot be read \(SafetensorError"):
        load_model(str(cut))


def test_bin_weights_that_would_run_code_are_refused(tmp_path):
    from fastalign.errors import ConfigError

    folder = _saved(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    torch.save({"weight": _Runs(tmp_path / "ran")}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="its .bin weights hold Python objects besides tensors"):
        load_model(str(folder))
    assert not (tmp_path / "ran").exists()


def test_checkpoint_weights_cut_short_are_named(tmp_path):
    from fastalign.errors import CheckpointError
    from fastalign.models import CausalLMWithValueHead
    from fastalign.models.loading import load_model_weights

    model = CausalLMWithValueHead(tiny_model())
    model.save_pretrained(tmp_path / "ckpt")
    _cut(tmp_path / "ckpt" / "value_head.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'ckpt' / 'value_head.safetensors'}: cannot be read"):
        model.load_saved_weights(tmp_path / "ckpt")
    _cut(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'ckpt' / 'model.safetensors'}: cannot be read"):
        load_model_weights(tiny_model(), tmp_path / "ckpt", exclude=("value_head.safetensors",))
