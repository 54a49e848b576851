"""What DPO and reward modeling share: preference rows to pairs, pairs to packed batches.

Each pair is one packing unit of two sequences (chosen, then rejected), so a pair is never split
across micro-batches, and both halves of every pair of a micro-batch go through one forward pass.
The weight of a micro-batch is its number of pairs: logged values are means over pairs.
"""

from __future__ import annotations

from fastalign.data import Pair, load_rows, pack_all, tokenize_pairs
from fastalign.engine import Trainer


class PairTrainer(Trainer):
    """A ``Trainer`` whose units are ``Pair``s; subclasses write ``compute_loss``."""

    def _pairs(self, name, dataset, tokenizer, args) -> list[Pair]:
        pairs, report = tokenize_pairs(
            load_rows(dataset), tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
            truncation_mode=args.truncation_mode, drop_bad_pairs=args.drop_bad_pairs,
        )
        self.reports[name] = report
        longest = max((p.num_tokens for p in pairs), default=0)
        if longest > args.max_tokens_per_batch:
            raise ValueError(f"the {name} set has a pair of {longest} tokens, more than max_tokens_per_batch="
                             f"{args.max_tokens_per_batch}: raise it to at least 2 x max_length, or lower max_length")
        return pairs

    def _datasets(self, args, train_dataset, eval_dataset, tokenizer):
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset")
        self.reports = {}
        train = self._pairs("train", train_dataset, tokenizer, args)
        evals = self._pairs("eval", eval_dataset, tokenizer, args) if eval_dataset is not None else None
        return train, evals

    def make_batches(self, pairs: list[Pair]):
        extras = None
        if any(p.margin is not None for p in pairs):  # a missing margin counts as 0
            extras = {"margin": [[p.margin or 0.0] * 2 for p in pairs]}
        return pack_all([p.sequences() for p in pairs], self.args.max_tokens_per_batch, extras)

    def batch_weight(self, batch) -> float:
        return float(batch.chosen.numel())

