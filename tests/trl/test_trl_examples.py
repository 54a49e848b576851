"""TRL 0.7.10's example scripts, run with ``trl`` changed to ``fastalign.trl`` in their imports.

Each script is read from the TRL mirror (``v0.7.10:examples/scripts/NAME``) when the test runs:
TRL's code is not copied into this repository. Besides the import lines, the only edits are the
ones listed per script in ``EDITS``, each checked to apply: Hub names replaced by the local
stand-ins of ``conftest.py`` (most go in as command-line arguments instead, as a user would pass
them), and where transformers 5 changed an API the 0.7.10 scripts call, the new call. Step counts
and batch sizes are command-line arguments (2 steps, tiny batches).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

MIRROR = Path("/work/.mirror/huggingface+trl/repo")
TAG = "v0.7.10"

# (what the script says, what runs here, why)
EDITS = {
    "sft.py": [
        ("use_auth_token=script_args.use_auth_token", "token=script_args.use_auth_token",
         "transformers 5 renamed use_auth_token to token"),
    ],
    "dpo.py": [
        ('load_dataset("Anthropic/hh-rlhf"', 'load_dataset(HH_PATH', "Hub data set -> local HH-shaped rows"),
    ],
    "ppo.py": [
        ('"return_all_scores": True', '"top_k": None', "transformers 5 removed return_all_scores (top_k=None)"),
    ],
    "ddpo.py": [
        ('CLIPModel.from_pretrained("openai/clip-vit-large-patch14")', "CLIPModel.from_pretrained(CLIP_PATH)",
         "Hub model -> local tiny CLIP"),
        ('CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14")', "CLIPProcessor.from_pretrained(CLIP_PATH)",
         "Hub model -> local tiny CLIP"),
        ("self.clip.get_image_features(**inputs)", "self.clip.get_image_features(**inputs).pooler_output",
         "transformers 5: get_image_features returns an output object"),
        ("scorer = scorer.cuda()", "scorer = scorer.to('cuda' if torch.cuda.is_available() else 'cpu')",
         "no GPU here"),
    ],
}


def trl_script(name: str, tmp_path: Path, constants: dict | None = None) -> Path:
    """``examples/scripts/NAME`` of TRL 0.7.10 with its imports ported and ``EDITS`` applied;
    ``constants`` are set at its top (the local paths the edits name)."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip(f"TRL's mirror is not at {MIRROR}")
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{TAG}:examples/scripts/{name}"], check=True,
                          capture_output=True, text=True).stdout
    ported, count = re.subn(r"^(from|import) trl\b", r"\1 fastalign.trl", text, flags=re.M)
    assert count >= 1, f"{name}: no trl import found"
    for old, new, _why in EDITS.get(name, []):
        assert old in ported, f"{name}: {old!r} is not in the script any more"
        ported = ported.replace(old, new)
    header = "".join(f"{k} = {str(v)!r}\n" for k, v in (constants or {}).items())
    future = "from __future__ import annotations\n"
    path = tmp_path / "scripts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ported.replace(future, "") if future in ported else ported)
    path.write_text(header + path.read_text())
    return path


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def evaluation(folder: Path) -> dict:
    """The last evaluation record of ``folder/metrics.jsonl``."""
    return [r for r in records(folder) if "eval_loss" in r][-1]


def test_sft_example(assets, tmp_path, run_script):
    path = trl_script("sft.py", tmp_path)
    out = tmp_path / "sft_out"
    g = run_script(path, "--model_name", assets / "tiny", "--dataset_name", assets / "guanaco", "--batch_size", 2,
                   "--seq_length", 64, "--max_steps", 2, "--output_dir", out)
    store = g["trainer"].train_batches.store
    assert g["trainer"].args.max_tokens_per_batch == 2 * int(store.lengths.max())  # batch_size 2: rows, packed
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2, 2]  # two steps, then the run's summary
    assert {"loss", "learning_rate", "epoch"} <= set(logged[0])
    assert {"train_runtime", "train_samples_per_second", "train_loss"} <= set(logged[-1])
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_reward_modeling_example(assets, tmp_path, run_script):
    path = trl_script("reward_modeling.py", tmp_path)
    out = tmp_path / "rm_out"
    run_script(path, "--model_name", assets / "tiny", "--dataset_name", assets / "hh", "--eval_split", "test",
               "--reward_config.output_dir", out, "--reward_config.max_steps", 2,
               "--reward_config.per_device_train_batch_size", 2, "--reward_config.gradient_accumulation_steps", 1,
               "--reward_config.logging_steps", 1)  # the script's report_to="tensorboard" stays
    logged = records(out)
    assert {"loss", "learning_rate", "epoch"} <= set(logged[0])
    assert {"eval_accuracy", "eval_loss", "eval_runtime"} <= set(evaluation(out))
    assert list((out / "tensorboard").glob("events.*"))


def test_dpo_example(assets, tmp_path, run_script):
    path = trl_script("dpo.py", tmp_path, {"HH_PATH": assets / "hh"})
    out = tmp_path / "dpo_out"
    g = run_script(path, "--model_name_or_path", assets / "tiny", "--max_steps", 2, "--per_device_train_batch_size", 2,
                   "--output_dir", out, "--max_length", 128, "--max_prompt_length", 64, "--report_to", "none")
    trainer = g["dpo_trainer"]
    assert isinstance(trainer.engine.optimizer, torch.optim.RMSprop)  # the script's optim="rmsprop"
    assert trainer.is_peft and trainer.ref_model is None  # LoRA: the reference is the model, adapters off
    assert trainer.args.warmup_steps == 150 and trainer.args.learning_rate == 1e-3
    logged = records(out)
    names = {"loss", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    assert names <= set(logged[0])
    assert {f"eval_{n}" for n in ("loss", "rewards/accuracies", "logits/chosen")} <= set(evaluation(out))
    assert (out / "adapter_model.safetensors").exists()  # use_peft is the script's default


def test_ppo_example(assets, tmp_path, run_script):
    path = trl_script("ppo.py", tmp_path)
    out = tmp_path / "ppo_out"
    run_script(path, "--ppo_config.model_name", assets / "tiny", "--ppo_config.query_dataset", assets / "imdb",
               "--ppo_config.reward_model", f"sentiment-analysis:{assets / 'sentiment'}",
               "--ppo_config.batch_size", 4, "--ppo_config.mini_batch_size", 2, "--ppo_config.ppo_epochs", 1,
               "--ppo_config.output_dir", out)
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]  # 8 reviews, batches of 4
    assert {"objective/kl", "objective/entropy", "ppo/policy/entropy", "ppo/loss/total", "env/reward_mean",
            "env/reward_std", "ppo/learning_rate", "time/ppo/total"} <= set(logged[0])
    game = [json.loads(line) for line in (out / "game_log.jsonl").read_text().splitlines()]
    assert len(game) == 8 and {"query", "response", "ref_response", "ref_rewards", "reward"} <= set(game[0])


def test_ddpo_example(assets, tmp_path, run_script):
    pytest.importorskip("diffusers")
    from fastalign.errors import ConfigError

    path = trl_script("ddpo.py", tmp_path, {"CLIP_PATH": assets / "clip"})
    (tmp_path / "aesthetic").symlink_to(assets / "aesthetic")  # hf_hub_download offline: the script reads ./ID/FILE
    argv = ["--hf_user_access_token", "unused", "--pretrained_model", "fastalign/tiny-sd",
            "--hf_hub_aesthetic_model_id", "aesthetic", "--ddpo_config.num_epochs", 1,
            "--ddpo_config.sample_num_steps", 2, "--ddpo_config.sample_batch_size", 2,
            "--ddpo_config.train_batch_size", 1, "--ddpo_config.sample_num_batches_per_epoch", 1,
            "--ddpo_config.mixed_precision", "no"]
    # The script ends with trainer.push_to_hub: with no Hub it fails in one clear line, after training.
    with pytest.raises(ConfigError, match="push_to_hub: the Hugging Face Hub cannot be reached"):
        run_script(path, *argv)
    save = tmp_path / "save"  # the script's project_kwargs project_dir
    assert (save / "pytorch_lora_weights.safetensors").exists()
    logged = records(save)
    assert {"reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "epoch", "inner_epoch"} <= set(logged[0])
    images = list((save / "images").rglob("*.png"))
    assert len(images) == 2  # image_samples_hook's log_images: the epoch's last batch
