"""After TRL 0.7.10's docs/source/ppo_trainer.mdx (PPOConfig with model_name, the value-head
model, a pre-tokenized query data set, the loop with generate, a sentiment pipeline, step,
log_stats, save_model), imports ported to fastalign.trl.
Replaced: the Hub models "gpt2" and "lvwerra/distilbert-imdb" -> MODEL and SENTIMENT (argv[1],
argv[2]); HuggingFaceH4/cherry_picked_prompts -> a small in-memory data set with a "query" column;
the pipeline's answer is read as transformers 5 gives it (one {label, score} dict per text, the
docs index output[1]); one PPO epoch and 4-sample batches.
Usage: ppo_docs.py MODEL SENTIMENT OUTPUT_DIR."""

import sys

import torch
from datasets import Dataset
from tqdm import tqdm
from transformers import AutoTokenizer, pipeline

from fastalign.trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

MODEL, SENTIMENT, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
config = PPOConfig(
    model_name=MODEL,
    learning_rate=1.41e-5,
    batch_size=4,
    mini_batch_size=2,
    ppo_epochs=1,
    output_dir=OUT,
)
model = AutoModelForCausalLMWithValueHead.from_pretrained(config.model_name)
tokenizer = AutoTokenizer.from_pretrained(config.model_name)
tokenizer.pad_token = tokenizer.eos_token
reward_model = pipeline("text-classification", model=SENTIMENT)

dataset = Dataset.from_dict({"query": ["Explain the moon landing", "Why are birds real?", "Tell me a joke",
                                       "What is a cannonball?", "How do I bake bread?", "Name a colour",
                                       "What is two plus two?", "Say hello"]})


def tokenize(sample):
    sample["input_ids"] = tokenizer.encode(sample["query"])
    return sample


dataset = dataset.map(tokenize, batched=False)
ppo_trainer = PPOTrainer(
    model=model,
    config=config,
    train_dataset=dataset,
    tokenizer=tokenizer,
)
generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                     "pad_token_id": tokenizer.eos_token_id, "max_new_tokens": 16}
for epoch in tqdm(range(ppo_trainer.config.ppo_epochs), "epoch: "):
    for batch in tqdm(ppo_trainer.dataloader):
        query_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(query_tensors, **generation_kwargs)
        batch["response"] = [tokenizer.decode(r.squeeze()) for r in response_tensors]
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        pipe_outputs = reward_model(texts)
        rewards = [torch.tensor(output["score"]) for output in pipe_outputs]
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)

ppo_trainer.save_model(f"{OUT}/my_ppo_model")
