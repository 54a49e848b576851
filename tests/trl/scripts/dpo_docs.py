"""After TRL 0.7.10's docs/source/dpo_trainer.mdx ("Expected dataset format", "Using the
DPOTrainer"), imports ported to fastalign.trl.
Replaced: the Hub models -> MODEL (argv[1]); the training arguments kept to 2 steps.
Usage: dpo_docs.py MODEL OUTPUT_DIR."""

import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from fastalign.trl import DPOTrainer

MODEL, OUT = sys.argv[1], sys.argv[2]
dpo_dataset_dict = {
    "prompt": ["hello", "how are you", "What is your name?", "What is your name?",
               "Which is the best programming language?", "Which is the best programming language?",
               "Which is the best programming language?"],
    "chosen": ["hi nice to meet you", "I am fine", "My name is Mary", "My name is Mary", "Python", "Python", "Java"],
    "rejected": ["leave me alone", "I am not fine", "Whats it to you?", "I dont have a name", "Javascript", "C++",
                 "C++"],
}
train_dataset = Dataset.from_dict(dpo_dataset_dict)
model = AutoModelForCausalLM.from_pretrained(MODEL)
model_ref = AutoModelForCausalLM.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
training_args = TrainingArguments(output_dir=OUT, max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                                  report_to="none")
dpo_trainer = DPOTrainer(
    model,
    model_ref,
    args=training_args,
    beta=0.1,
    train_dataset=train_dataset,
    tokenizer=tokenizer,
)
result = dpo_trainer.train()
