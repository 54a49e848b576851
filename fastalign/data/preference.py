"""Preference rows to tokenized (chosen, rejected) pairs, for DPO and reward modeling.

Row formats, picked from the columns:

- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings; each completion is tokenized
  together with the prompt and split where the prompt's own tokens stop matching (so a token that
  merges across the boundary goes to the completion);
- implicit prompt: ``chosen`` and ``rejected`` only (Anthropic HH-RLHF); the prompt is the longest
  common prefix of their token ids, which is a token boundary in both;
- conversational: ``chosen``/``rejected`` (and optionally ``prompt``) as lists of
  ``{role, content}`` messages, rendered with the tokenizer's chat template (with an explicit
  prompt, the prompt is rendered with the generation prompt);
- pre-tokenized (reward modeling): ``input_ids_chosen``, ``attention_mask_chosen``,
  ``input_ids_rejected``, ``attention_mask_rejected`` (tokens where the mask is 1), prompt
  implicit.

Any row may carry a numeric ``margin`` (reward modeling). Completions end with the EOS token.

Truncation follows TRL 0.7.10's DPO tokenisation: when prompt + longer completion exceeds
``max_length``, the prompt is cut to ``max_prompt_length`` (its start or its end kept, per
``truncation_mode``); if that is still too long, both completions are cut to
``max_length - max_prompt_length``. Truncated pairs are counted. A pair whose chosen equals its
rejected, or with an empty completion, raises naming the row (or, with ``drop_bad_pairs``, is
dropped and counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastalign.errors import ConfigError, DataError

from .formats import TokenizeReport
from .packing import Sequence
from .rows import Texts, check_truncation, encode, row_error, row_messages, row_text, row_token_ids, row_value, with_eos


@dataclass
class Pair:
    """One tokenized pair: prompt and completion ids of each half, and an optional margin."""

    chosen_prompt: list[int]
    chosen: list[int]
    rejected_prompt: list[int]
    rejected: list[int]
    margin: float | None = None

    def sequences(self) -> list[Sequence]:
        """The two halves as sequences with the loss on the completion tokens."""
        return [Sequence(p + c, [False] * len(p) + [True] * len(c))
                for p, c in ((self.chosen_prompt, self.chosen), (self.rejected_prompt, self.rejected))]

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_prompt) + len(self.chosen) + len(self.rejected_prompt) + len(self.rejected)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _attended(row, i, half, vocab: int) -> list[int]:
    """The pre-tokenized ids of one half where its attention mask (if any) is 1."""
    ids, mask = row_token_ids(row, i, f"input_ids_{half}", f"attention_mask_{half}", "entries", vocab)
    return ids if mask is None else [t for t, m in zip(ids, mask) if m]


def _parse(tokenizer, row, i, texts: Texts, vocab: int):
    """What a row holds: its four id lists now (pre-tokenized, conversational rows), or the slots
    of its texts in ``texts`` (prompt or None, prompt + chosen, prompt + rejected)."""
    if "input_ids_chosen" in row:
        full_c, full_r = _attended(row, i, "chosen", vocab), _attended(row, i, "rejected", vocab)
        n = _common_prefix(full_c, full_r)
        return "ids", (full_c[:n], full_c[n:], full_r[:n], full_r[n:])
    for column in ("chosen", "rejected"):
        row_value(row, i, column)  # a missing one named first, whatever else is wrong
    if "prompt" in row and row["prompt"] is None:
        raise row_error(i, "prompt", "null (expected the prompt; a data set whose pairs carry the prompt in chosen and "
                                     "rejected has no prompt column)")
    if isinstance(row["chosen"], list):  # conversational
        chosen, rejected = row_messages(row, i, "chosen"), row_messages(row, i, "rejected")
        render = lambda msgs, gen=False: encode(  # noqa: E731
            tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), special=False)
        if "prompt" in row:
            prompt = row_messages(row, i, "prompt")
            prompt_ids = render(prompt, gen=True)
            full_c, full_r = render(prompt + chosen), render(prompt + rejected)
        else:
            full_c, full_r = render(chosen), render(rejected)
            prompt_ids = full_c[:_common_prefix(full_c, full_r)]
        return "split", (prompt_ids, full_c, full_r)
    if "prompt" in row:  # explicit prompt
        prompt = row_text(row, i, "prompt")
        return "texts", (texts.add(prompt, True), texts.add(prompt + row_text(row, i, "chosen"), True),
                         texts.add(prompt + row_text(row, i, "rejected"), True))
    # implicit prompt
    return "texts", (None, texts.add(row_text(row, i, "chosen"), True), texts.add(row_text(row, i, "rejected"), True))


def _split(tokenizer, kind, what, texts: Texts) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(prompt_c, completion_c, prompt_r, completion_r)`` token ids of one parsed row."""
    if kind == "ids":
        return what
    if kind == "split":
        prompt_ids, full_c, full_r = what
    else:
        full_c, full_r = texts[what[1]], texts[what[2]]
        prompt_ids = texts[what[0]] if what[0] is not None else full_c[:_common_prefix(full_c, full_r)]
    full_c, full_r = with_eos(tokenizer, full_c), with_eos(tokenizer, full_r)
    n_c, n_r = _common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r)
    return full_c[:n_c], full_c[n_c:], full_r[:n_r], full_r[n_r:]


def _margin(row, i):
    """The row's margin (None where it has none); text that reads as a number counts (a CSV file)."""
    value = row.get("margin")
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(value, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise row_error(i, "margin", f"expected a finite number, got {value!r}")
    return float(number)


def truncate_pair(prompt_c, chosen, prompt_r, rejected, max_length, max_prompt_length, truncation_mode):
    """TRL 0.7.10's rule: the prompt first, then both completions; returns the four id lists."""
    longer = max(len(chosen), len(rejected))
    if max(len(prompt_c), len(prompt_r)) + longer > max_length:
        cut = slice(None, max_prompt_length) if truncation_mode == "keep_start" else slice(-max_prompt_length, None)
        prompt_c, prompt_r = prompt_c[cut], prompt_r[cut]
    if max(len(prompt_c), len(prompt_r)) + longer > max_length:
        keep = max_length - max_prompt_length
        chosen, rejected = chosen[:keep], rejected[:keep]
    return prompt_c, chosen, prompt_r, rejected


@dataclass
class PairEncoder:
    """Preference rows to token-store columns (``fastalign.data.store``): per half its ids (prompt
    then completion) and prompt length, per row whether it was truncated and its margin. A bad
    pair raises naming the row, or with ``drop_bad_pairs`` keeps its place with no ids."""

    tokenizer: object
    max_length: int | None = 512
    max_prompt_length: int | None = 128
    truncation_mode: str = "keep_end"
    drop_bad_pairs: bool = False

    def __post_init__(self):
        check_truncation(self.max_length, self.truncation_mode)
        if self.max_length is not None:
            if self.max_prompt_length is None or not 0 < self.max_prompt_length < self.max_length:
                raise ConfigError(f"max_prompt_length must be in [1, max_length={self.max_length}), got "
                                  f"{self.max_prompt_length}: the completions need room")

    def _pair(self, prompt_c, chosen, prompt_r, rejected):
        """The pair after truncation, whether it was cut, and what is wrong with it (or None)."""
        truncated = False
        if prompt_c + chosen == prompt_r + rejected:
            return (prompt_c, chosen, prompt_r, rejected), truncated, "chosen and rejected are the same"
        if not chosen or not rejected:
            empty = "chosen" if not chosen else "rejected"
            return (prompt_c, chosen, prompt_r, rejected), truncated, \
                f"the {empty} completion is empty (nothing after the prompt)"
        if self.max_length is not None:
            before = (len(prompt_c) + len(chosen), len(prompt_r) + len(rejected))
            prompt_c, chosen, prompt_r, rejected = truncate_pair(
                prompt_c, chosen, prompt_r, rejected, self.max_length, self.max_prompt_length, self.truncation_mode)
            truncated = (len(prompt_c) + len(chosen), len(prompt_r) + len(rejected)) != before
            if truncated and prompt_c + chosen == prompt_r + rejected:
                return (prompt_c, chosen, prompt_r, rejected), truncated, \
                    f"chosen and rejected are the same after truncation to max_length={self.max_length}"
        return (prompt_c, chosen, prompt_r, rejected), truncated, None

    def __call__(self, rows: list[dict], indices: list[int]) -> dict[str, list]:
        texts = Texts()
        vocab = len(self.tokenizer)
        parsed = [(_parse(self.tokenizer, row, i, texts, vocab), _margin(row, i)) for row, i in zip(rows, indices)]
        texts.encode(self.tokenizer)
        out = {k: [] for k in ("chosen_ids", "chosen_prompt", "chosen_mask", "rejected_ids", "rejected_prompt",
                               "rejected_mask", "truncated", "loss", "margin")}
        for i, ((kind, what), margin) in zip(indices, parsed):
            (prompt_c, chosen, prompt_r, rejected), truncated, problem = self._pair(
                *_split(self.tokenizer, kind, what, texts))
            if problem is not None:
                if not self.drop_bad_pairs:
                    raise DataError(f"row {i}: {problem} (drop_bad_pairs=True drops such rows and counts them)")
                prompt_c = chosen = prompt_r = rejected = []
            for half, prompt, completion in (("chosen_", prompt_c, chosen), ("rejected_", prompt_r, rejected)):
                out[f"{half}ids"].append(prompt + completion)
                out[f"{half}prompt"].append(len(prompt))
                out[f"{half}mask"].append([])
            out["truncated"].append(truncated)
            out["loss"].append(len(chosen) + len(rejected))
            out["margin"].append(margin)
        return out


def tokenize_pairs(rows, tokenizer, *, max_length=512, max_prompt_length=128, truncation_mode="keep_end",
                   drop_bad_pairs=False) -> tuple[list[Pair], TokenizeReport]:
    """``(pairs, report)`` from any iterable of preference rows, in memory: the small-data form of
    what the trainers read from a token store (``fastalign.data.store``)."""
    from .store import PAIR_HALVES, pair_store, tokenize_rows

    encode = PairEncoder(tokenizer, max_length, max_prompt_length, truncation_mode, drop_bad_pairs)
    table = tokenize_rows(rows, encode, PAIR_HALVES)
    store, margins = pair_store(table), table.column("margin").to_pylist()
    pairs = []
    for i in store.kept.tolist():
        (c, nc), (r, nr) = [(h.ids[i].tolist(), int(h.prompt[i])) for h in store.halves]
        pairs.append(Pair(c[:nc], c[nc:], r[:nr], r[nr:], margins[i]))
    return pairs, store.report
