"""One process of a 2-process SFT run reading a data file (launched by torchrun from the tests).

    torchrun --standalone --nproc_per_node 2 data_worker.py OUT_DIR DATA_FILE

Every call of the formatting function appends a line to OUT_DIR/calls-PID.txt (how often the rows
were tokenized, over all processes). Writes OUT_DIR/rank{R}.json: the micro-batch plan, each
step's micro-batches and the ones this process built.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from fastalign.algorithms import SFTConfig, SFTTrainer  # noqa: E402
from fastalign.data.store import Batches  # noqa: E402
from fastalign.engine import distributed  # noqa: E402
from fastalign.models.tiny import char_tokenizer, tiny_model  # noqa: E402

STEPS = 3


def text(row):
    with open(os.path.join(os.environ["FASTALIGN_TEST_OUT"], f"calls-{os.getpid()}.txt"), "a") as f:
        f.write(f"{row['prompt']}\n")
    return row["prompt"] + row["completion"]


def main(out, data):
    os.environ["FASTALIGN_TEST_OUT"] = out
    built = []
    read = Batches.__getitem__

    def logged(self, k):
        built.append(k)
        return read(self, k)

    Batches.__getitem__ = logged
    args = SFTConfig(output_dir=out, learning_rate=1e-2, max_steps=STEPS, max_tokens_per_batch=48, disable_tqdm=True,
                     seed=0, dataset_num_proc=1)
    trainer = SFTTrainer(tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=1), args=args,
                         train_dataset=data, tokenizer=char_tokenizer(), formatting_func=text)
    trainer.train()
    record = {"plan": [list(map(int, units)) for units in trainer.train_batches.plan],
              "steps": [trainer.step_plan(s) for s in range(STEPS)], "built": built, "world": distributed.world_size()}
    with open(os.path.join(out, f"rank{distributed.rank()}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
