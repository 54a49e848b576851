"""Data: reading datasets, row checks (``rows``), tokenizing into memory-mapped token stores
(``store``: SFT rows, preference pairs), padding-free packing, PackedBatch."""

from .formats import SFTEncoder, TokenizeReport, tokenize_sft
from .loading import load_rows
from .packing import IGNORE_INDEX, PackedBatch, Sequence, pack, pack_all, plan_batches, plan_padded, plan_units
from .preference import Pair, PairEncoder, tokenize_pairs
from .store import Batches, TokenStore, tokenize_rows

__all__ = [
    "IGNORE_INDEX", "PackedBatch", "Sequence", "load_rows", "pack", "pack_all", "plan_batches", "plan_padded", "plan_units", "TokenizeReport",
    "tokenize_sft",
    "Pair", "tokenize_pairs", "SFTEncoder", "PairEncoder", "TokenStore", "Batches", "tokenize_rows",
]
