"""The workload every system trains on, and its one-time preparation (run in fastalign's venv).

Everything a probe needs is written once to a prep folder, so every system starts from the same
bytes:

- ``tokenizer/``: a byte-level BPE of ``VOCAB`` ids trained on the HH-RLHF pairs (the recipe of
  ``benchmarks/test_bench_hh_rlhf.py``), saved with ``save_pretrained``;
- ``causal/``: a random model (the profile's, below) made with ``torch.manual_seed(SEED)``, saved
  with ``save_pretrained`` (DPO and SFT load it, TRL's DPO builds its reference from it too);
- ``reward/``: the same body with a one-label ``score`` head (seeded), for reward modeling;
- ``data.json``: the rows of every workload, in training order, as text (what fastalign is
  given) and as the token ids fastalign's tokenisation and truncation make of them (what TRL is
  given, so both train on identical tokens; a probe checks its own ids against these).

Profiles (``PROFILES``): ``cpu``, the issue's reference set-up (a 21M-parameter Llama, fp32, DPO,
reward modeling and SFT), and ``gpu``, a DPO step of a Qwen2-0.5B-shaped model (494M parameters,
its 151,936-entry vocabulary, built from a config with random weights) in bf16 autocast, on CUDA
when there is one. The prep folder records its profile; the probes read it from there.

This module imports neither fastalign nor TRL at the top: the TRL probe, in the peer venv, reads
its constants.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared"
# FASTALIGN_HH_DATA: the pairs' file elsewhere (a GPU machine that has no ../shared beside the repo).
DATA = Path(os.environ.get("FASTALIGN_HH_DATA") or SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz")

VOCAB = 8192
SEED = 0
# A Llama-style model of about 21M parameters, as in the reference measurement.
MODEL = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False, rms_norm_eps=1e-6)
# Qwen2-0.5B's shape. The tokenizer still has VOCAB ids: the head has the full vocabulary, so its
# cost is that of the real model, and every id the data holds is below VOCAB.
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, rms_norm_eps=1e-6)
ALGOS = ("dpo", "reward", "sft")
PROFILES = {
    "cpu": {"arch": "llama", "model": MODEL, "bf16": False, "algos": ALGOS, "label": "Llama"},
    "gpu": {"arch": "qwen2", "model": QWEN2_05B, "bf16": True, "algos": ("dpo",), "label": "Qwen2-0.5B-shaped"},
}
# Rows per optimizer step: pairs for DPO and reward modeling, sequences for SFT.
BATCH = {"dpo": 8, "reward": 8, "sft": 8}
STEPS = {"dpo": 10, "reward": 10, "sft": 10}
LEARNING_RATE = {"dpo": 5e-5, "reward": 1e-4, "sft": 5e-4}
BETA = 0.1
# TRL 0.7.10's DPO defaults (fastalign's): pairs are cut to 512 tokens, the prompt first (to its last 128).
MAX_LENGTH, MAX_PROMPT_LENGTH, PAIR_TRUNCATION = 512, 128, "keep_end"
SFT_TRUNCATION = "keep_start"


def missing() -> str | None:
    if not DATA.is_file():
        return f"{DATA} is absent: the comparison with TRL trains on the shared HH-RLHF pairs beside the repo"
    return None


def steps_for(algo: str, quick: bool) -> int:
    return 3 if quick else STEPS[algo]


def rows_needed(algo: str, steps: int) -> int:
    return BATCH[algo] * steps


def flat(lists) -> list[int]:
    return [x for ids in lists for x in ids]


def digest(ids: list[list[int]]) -> str:
    """A short fingerprint of token id lists (a probe compares its own with the prep's)."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


# ---- preparation (fastalign's venv) ----------------------------------------------------------------
def profile_of(prep: Path) -> dict:
    """The profile a prep folder was made for."""
    return PROFILES[json.loads((prep / "data.json").read_text())["profile"]]


def prepare(prep: Path, max_steps: int, profile: str = "cpu") -> Path:
    """Write the tokenizer, the two models and the data of ``max_steps`` steps to ``prep`` (cached:
    an existing prep of the same profile with as many rows is reused)."""
    marker = prep / "data.json"
    model_config = PROFILES[profile]["model"]
    if marker.is_file():
        data = json.loads(marker.read_text())
        if (all(len(data[a]["ids"]) >= rows_needed(a, max_steps) for a in ALGOS)
                and data.get("model") == model_config and data.get("profile") == profile):
            return prep

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from benchmarks import test_bench_hh_rlhf as hh
    from fastalign.data import load_rows, tokenize_pairs, tokenize_sft
    from fastalign.models.loading import as_reward_model

    prep.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in load_rows(str(DATA))]
    hh.train_bpe(rows, prep / "bpe.json", vocab_size=VOCAB)  # the HH benchmark's recipe, at this size
    tokenizer = hh.load_tokenizer(prep / "bpe.json")
    tokenizer.save_pretrained(prep / "tokenizer")

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[PROFILES[profile]["arch"]]
    torch.manual_seed(SEED)
    model = model_cls(config_cls(**model_config))
    model.save_pretrained(prep / "causal")
    if "reward" in PROFILES[profile]["algos"]:
        torch.manual_seed(SEED + 1)
        reward = as_reward_model(model)
        reward.config.pad_token_id = model_config["pad_token_id"]
        reward.save_pretrained(prep / "reward")

    # The pairs in file order (this split has no bad pair: none is dropped, checked).
    n_pairs = max(rows_needed(a, max_steps) for a in ("dpo", "reward"))
    pair_rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n_pairs]]
    pairs, report = tokenize_pairs(pair_rows, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                   truncation_mode=PAIR_TRUNCATION)
    assert all(p.chosen_prompt == p.rejected_prompt for p in pairs), "implicit prompts are shared by both halves"
    pair_ids = [pair_record(p) for p in pairs]

    n_sft = rows_needed("sft", max_steps)
    sft_rows = [{"text": r["chosen"]} for r in rows[:n_sft]]
    seqs, sft_report = tokenize_sft(sft_rows, tokenizer, max_length=MAX_LENGTH, truncation_mode=SFT_TRUNCATION)
    assert len(seqs) == n_sft, "no SFT row is dropped"

    data = {
        "profile": profile,
        "model": model_config,
        "dpo": {"rows": pair_rows, "ids": pair_ids, "truncated": report.truncated},
        "reward": {"rows": pair_rows, "ids": pair_ids, "truncated": report.truncated},
        "sft": {"rows": sft_rows, "ids": [{"input_ids": s.input_ids} for s in seqs], "truncated": sft_report.truncated},
    }
    marker.write_text(json.dumps(data))
    return prep


def pair_record(pair) -> dict:
    """A fastalign ``Pair`` as TRL's pre-tokenized preference columns (the prompt is shared)."""
    return {"prompt_ids": pair.chosen_prompt, "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}


def workload(prep: Path, algo: str, steps: int) -> dict:
    """The rows, the token ids and the fingerprint of ``steps`` steps of ``algo``."""
    data = json.loads((prep / "data.json").read_text())[algo]
    n = rows_needed(algo, steps)
    ids = data["ids"][:n]
    return {"rows": data["rows"][:n], "ids": ids, "digest": digest([flat(r.values()) for r in ids])}
