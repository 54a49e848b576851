"""After TRL 0.7.10's docs/source/iterative_sft_trainer.mdx, imports ported to fastalign.trl:
``IterativeSFTTrainer(model, tokenizer)`` as the docs call it, then ``step`` with tensors and with
texts. Replaced: the Hub model -> MODEL (argv[1]); the rows are made here.
Usage: iterative_sft_docs.py MODEL OUTPUT_DIR."""

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastalign.trl import IterativeSFTTrainer

MODEL, OUT = sys.argv[1], sys.argv[2]
os.chdir(OUT)  # transformers' default output folder is relative

model = AutoModelForCausalLM.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

trainer = IterativeSFTTrainer(
    model,
    tokenizer
)

texts = ["1 + 1 = 2", "2 + 2 = 4", "3 + 3 = 6", "4 + 4 = 8"]
batch = tokenizer(texts, padding=True, return_tensors="pt")
input_ids = [row for row in batch["input_ids"]]
attention_mask = [row for row in batch["attention_mask"]]

inputs = {
    "input_ids": input_ids,
    "attention_mask": attention_mask
}

trainer.step(**inputs)

inputs = {
    "texts": texts
}

trainer.step(**inputs)
stats = trainer.state.log_history
assert torch.isfinite(torch.tensor([s["loss"] for s in stats])).all()
