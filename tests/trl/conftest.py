"""Local stand-ins for what TRL 0.7.10's examples and docs load from the Hub: a tiny causal LM
saved with its tokenizer, IMDB-, Anthropic-HH- and Guanaco-shaped data sets, a 2-label sentiment
classifier, a tiny CLIP (projection 768, as the aesthetic scorer expects) and the scorer's MLP
weights. Built once per session; nothing is downloaded."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

TEXTS = ["the movie was wonderful and the actors were great", "a dull film with a silly plot and bad acting",
         "I loved the music and the story of this film", "the worst two hours I have spent in a cinema"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hh_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = f"\n\nHuman: Say something nice about number {i}.\n\nAssistant:"
        rows.append({"chosen": prompt + f" {i} is a fine number.", "rejected": prompt + " No."})
    return rows


def aesthetic_mlp() -> torch.nn.Module:
    """The MLP of TRL's ddpo.py aesthetic scorer (same layers, random weights)."""
    nn = torch.nn
    mlp = nn.Module()
    mlp.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                               nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return mlp


def build_assets(root: Path) -> None:
    from transformers import (
        AutoModelForSequenceClassification,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from fastalign.models.tiny import char_tokenizer, tiny_model

    tokenizer = char_tokenizer()
    model = tiny_model()
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = 2
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "sentiment")
    tokenizer.save_pretrained(root / "sentiment")
    write_jsonl(root / "imdb" / "train.jsonl",
                [{"text": (TEXTS[i % 4] + ". ") * 6, "label": i % 2} for i in range(8)])
    write_jsonl(root / "hh" / "train.jsonl", hh_rows(8))
    write_jsonl(root / "hh" / "test.jsonl", hh_rows(4, 100))
    write_jsonl(root / "guanaco" / "train.jsonl",
                [{"text": f"### Human: What is {i} plus {i}?### Assistant: It is {2 * i}."} for i in range(8)])
    clip = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=768)
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    (root / "aesthetic").mkdir()
    torch.save(aesthetic_mlp().state_dict(), root / "aesthetic" / "aesthetic-model.pth")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trl_assets")
    build_assets(root)
    return root


@pytest.fixture
def offline(monkeypatch):
    """The Hub is never asked (it cannot be reached here anyway): huggingface_hub's offline mode."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def run_script(monkeypatch, tmp_path, offline):
    """``run_script(path, *argv)``: run a Python script as ``__main__`` in this process (in
    ``tmp_path``, with ``argv``); returns its globals."""

    def run(path, *argv) -> dict:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [os.path.basename(str(path)), *map(str, argv)])
        return runpy.run_path(str(path), run_name="__main__")

    return run
