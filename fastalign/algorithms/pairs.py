"""What the pair trainers (DPO, reward modeling, CPO, ORPO) share: the pair data's options,
preference rows to pairs, pairs to packed batches.

Each pair is one packing unit of two sequences (chosen, then rejected), so a pair is never split
across micro-batches, and both halves of every pair of a micro-batch go through one forward pass.
The weight of a micro-batch is its number of pairs: logged values are means over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.data import PackedBatch, PairEncoder, load_rows
from fastalign.data.rows import TRUNCATION_MODES
from fastalign.data.store import PAIR_HALVES, TokenStore, token_data
from fastalign.engine import Trainer, TrainingConfig, distributed
from fastalign.options import option


@dataclass
class PairDataConfig(TrainingConfig):
    """How preference rows become pairs (DPO, reward modeling, CPO, ORPO): TRL 0.7.10's truncation
    (``fastalign.data.preference``); a trainer changes the defaults it needs."""

    max_length: int | None = option(512, "tokens kept of prompt plus completion (null: all)", ge=1)
    max_prompt_length: int | None = option(128, "tokens a prompt is cut to when a pair is too long", ge=1)
    truncation_mode: str = option("keep_end", "which tokens a too-long prompt keeps", choices=TRUNCATION_MODES)
    drop_bad_pairs: bool = option(False, "drop and count pairs whose chosen equals rejected (false: such a pair "
                                  "is an error naming its row)")


class PairTrainer(Trainer):
    """A ``Trainer`` whose units are pairs (store rows of a chosen and a rejected half);
    subclasses write ``compute_loss``. A trainer of other rows (KTO's unpaired ones) sets
    ``halves`` and ``encoder``."""

    halves = PAIR_HALVES

    def encoder(self, tokenizer, args):
        """What tokenizes a batch of rows into the store's columns."""
        return PairEncoder(tokenizer, args.max_length, args.max_prompt_length, args.truncation_mode,
                           args.drop_bad_pairs)

    def _pairs(self, name, dataset, tokenizer, args):
        encode = self.encoder(tokenizer, args)
        store = token_data(load_rows(dataset, streaming=args.streaming and name == "train"), encode, self.halves,
                           num_proc=args.dataset_num_proc, desc=f"tokenizing the {name} set", progress=not args.disable_tqdm,
                           main_first=distributed.local_main_first)
        if isinstance(store, TokenStore):  # a stream is tokenized as it is read
            self.reports[name] = store.report
        return store

    def _datasets(self, args, train_dataset, eval_dataset, tokenizer):
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset")
        self.reports = {}
        train = self._pairs("train", train_dataset, tokenizer, args)
        evals = self._pairs("eval", eval_dataset, tokenizer, args) if eval_dataset is not None else None
        return train, evals

    def batch_weight(self, batch: PackedBatch) -> float:
        return float(batch.chosen.numel())

