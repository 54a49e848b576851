"""After TRL 0.7.10's docs/source/sft_trainer.mdx snippets, imports ported to fastalign.trl:
the quickstart (a model name, no args: transformers' defaults), a model object, "Train on
completions only" (a batched formatting_func with DataCollatorForCompletionOnlyLM), the
instruction/response-template collator, packing with a per-row formatting_func,
model_init_kwargs, and NEFTune.
Replaced: Hub models -> MODEL (argv[1]); Hub data sets (imdb, CodeAlpaca-20k, guanaco) -> small
in-memory data sets of the same columns; step counts kept small with TrainingArguments.
Usage: sft_docs.py MODEL OUTPUT_DIR."""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from fastalign.trl import DataCollatorForCompletionOnlyLM, SFTTrainer

MODEL, OUT = sys.argv[1], sys.argv[2]
dataset = Dataset.from_dict({"text": [f"review {i}: a {'good' if i % 2 else 'bad'} film" for i in range(8)]})
alpaca = Dataset.from_dict({"instruction": [f"add {i} and {i}" for i in range(8)],
                            "output": [str(2 * i) for i in range(8)]})
guanaco = Dataset.from_dict({"text": [f"### Human: hi {i}### Assistant: hello {i}### Human: bye### Assistant: ciao"
                                      for i in range(8)]})
results = {}

# Quickstart: a model name, no TrainingArguments (3 epochs of 8-row batches: 3 steps here).
trainer = SFTTrainer(MODEL, train_dataset=dataset, dataset_text_field="text", max_seq_length=512)
results["quickstart"] = trainer.train()

# A model built outside the trainer (its tokenizer found from the model's own folder).
model = AutoModelForCausalLM.from_pretrained(MODEL)
args = TrainingArguments(output_dir=f"{OUT}/object", max_steps=2, per_device_train_batch_size=4)
trainer = SFTTrainer(model, args=args, train_dataset=dataset, dataset_text_field="text", max_seq_length=512)
results["object"] = trainer.train()

# Train on completions only.
model = AutoModelForCausalLM.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def formatting_prompts_func(example):
    output_texts = []
    for i in range(len(example["instruction"])):
        text = f"### Question: {example['instruction'][i]}\n ### Answer: {example['output'][i]}"
        output_texts.append(text)
    return output_texts


response_template = " ### Answer:"
collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=tokenizer)
args = TrainingArguments(output_dir=f"{OUT}/completion", max_steps=2, per_device_train_batch_size=4)
trainer = SFTTrainer(model, args=args, train_dataset=alpaca, formatting_func=formatting_prompts_func,
                     data_collator=collator)
results["completion"] = trainer.train()

# Assistant-style conversations: instruction and response templates.
instruction_template = "### Human:"
response_template = "### Assistant:"
collator = DataCollatorForCompletionOnlyLM(instruction_template=instruction_template,
                                           response_template=response_template, tokenizer=tokenizer, mlm=False)
args = TrainingArguments(output_dir=f"{OUT}/chat", max_steps=2, per_device_train_batch_size=4)
trainer = SFTTrainer(model, args=args, train_dataset=guanaco, dataset_text_field="text", data_collator=collator)
results["chat"] = trainer.train()


# Packing with a per-row formatting function, model_init_kwargs, NEFTune.
def formatting_func(example):
    return f"### Question: {example['instruction']}\n ### Answer: {example['output']}"


args = TrainingArguments(output_dir=f"{OUT}/packed", max_steps=2)
trainer = SFTTrainer(MODEL, args=args, train_dataset=alpaca, packing=True, formatting_func=formatting_func,
                     model_init_kwargs={"torch_dtype": torch.float32}, neftune_noise_alpha=5)
results["packed"] = trainer.train()
