"""After TRL 0.7.10's quickstart (README.md "Quickstart", docs/source/quickstart.mdx "Minimal example"
and "How to use a trained model"), imports ported to fastalign.trl.
Replaced: the Hub model "gpt2" -> MODEL (argv[1], a local tiny model and its tokenizer); the
Hub push -> the local save. Usage: ppo_quickstart.py MODEL OUTPUT_DIR."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastalign.trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
from fastalign.trl.core import respond_to_batch

MODEL, OUT = sys.argv[1], sys.argv[2]

# README: get models, a reference made by create_reference_model, respond_to_batch, one step.
model = AutoModelForCausalLMWithValueHead.from_pretrained(MODEL)
model_ref = create_reference_model(model)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
ppo_config = PPOConfig(batch_size=1, output_dir=OUT)
query_txt = "This morning I went to the "
query_tensor = tokenizer.encode(query_txt, return_tensors="pt")
response_tensor = respond_to_batch(model, query_tensor)
ppo_trainer = PPOTrainer(ppo_config, model, model_ref, tokenizer)
reward = [torch.tensor(1.0)]
train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)

# docs/quickstart.mdx: a second value-head model as the reference, generate, step.
model = AutoModelForCausalLMWithValueHead.from_pretrained(MODEL)
model_ref = AutoModelForCausalLMWithValueHead.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
tokenizer.pad_token = tokenizer.eos_token
ppo_config = {"batch_size": 1}
config = PPOConfig(**ppo_config, output_dir=OUT)
ppo_trainer = PPOTrainer(config, model, model_ref, tokenizer)
query_tensor = tokenizer.encode(query_txt, return_tensors="pt").to(model.pretrained_model.device)
generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                     "pad_token_id": tokenizer.eos_token_id, "max_new_tokens": 20}
response_tensor = ppo_trainer.generate([item for item in query_tensor], return_prompt=False, **generation_kwargs)
response_txt = tokenizer.decode(response_tensor[0])
reward = [torch.tensor(1.0, device=model.pretrained_model.device)]
train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)

# How to use a trained model: save it, load it back with and without the value head.
model.save_pretrained(OUT)
AutoModelForCausalLM.from_pretrained(OUT)
model = AutoModelForCausalLMWithValueHead.from_pretrained(OUT)
