"""After TRL 0.7.10's docs/source/reward_trainer.mdx ("Leveraging PEFT to train a reward model",
"Adding a margin to the loss"), imports ported to fastalign.trl.
Replaced: the Hub model "gpt2" -> MODEL (argv[1]); the pre-tokenized pairs are made here.
Usage: reward_docs.py MODEL OUTPUT_DIR."""

import sys

from datasets import Dataset
from peft import LoraConfig, TaskType
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fastalign.trl import RewardConfig, RewardTrainer

MODEL, OUT = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
peft_config = LoraConfig(
    task_type=TaskType.SEQ_CLS,
    inference_mode=False,
    r=8,
    lora_alpha=32,
    lora_dropout=0.1,
)
rows = []
for i in range(8):
    chosen, rejected = tokenizer(f"Q{i}: is it good? A: yes, very"), tokenizer(f"Q{i}: is it good? A: no")
    rows.append({"input_ids_chosen": chosen["input_ids"], "attention_mask_chosen": chosen["attention_mask"],
                 "input_ids_rejected": rejected["input_ids"], "attention_mask_rejected": rejected["attention_mask"],
                 "score_chosen": 2.0, "score_rejected": 1.0})
dataset = Dataset.from_list(rows)


def add_margin(row):
    # Assume you have a score_chosen and score_rejected columns that you want to use to compute the margin
    return {'margin': row['score_chosen'] - row['score_rejected']}


dataset = dataset.map(add_margin)
training_args = RewardConfig(output_dir=OUT, max_steps=2, per_device_train_batch_size=4, report_to="none",
                             logging_steps=1)
trainer = RewardTrainer(
    model=model,
    args=training_args,
    tokenizer=tokenizer,
    train_dataset=dataset,
    eval_dataset=dataset,
    peft_config=peft_config,
)

result = trainer.train()
prediction = trainer.predict(dataset)
