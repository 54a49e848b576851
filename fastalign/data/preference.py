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

from .formats import TokenizeReport, _bad, _column, _ids, _messages, _pretokenized, _text, _with_eos, check_truncation
from .packing import Sequence


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


def _attended(row, i, half) -> list[int]:
    """The pre-tokenized ids of one half where its attention mask (if any) is 1."""
    ids, mask = _pretokenized(row, i, f"input_ids_{half}", f"attention_mask_{half}", "entries")
    return ids if mask is None else [t for t, m in zip(ids, mask) if m]


def _split(tokenizer, row, i) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(prompt_c, completion_c, prompt_r, completion_r)`` token ids of one row."""
    if "input_ids_chosen" in row:
        full_c, full_r = _attended(row, i, "chosen"), _attended(row, i, "rejected")
        n = _common_prefix(full_c, full_r)
        return full_c[:n], full_c[n:], full_r[:n], full_r[n:]
    for column in ("chosen", "rejected"):
        _column(row, i, column)  # a missing one named first, whatever else is wrong
    if isinstance(row["chosen"], list):  # conversational
        chosen, rejected = _messages(row, i, "chosen"), _messages(row, i, "rejected")
        render = lambda msgs, gen=False: _ids(  # noqa: E731
            tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), special=False)
        if row.get("prompt") is not None:
            prompt = _messages(row, i, "prompt")
            prompt_ids = render(prompt, gen=True)
            full_c, full_r = render(prompt + chosen), render(prompt + rejected)
        else:
            full_c, full_r = render(chosen), render(rejected)
            prompt_ids = full_c[:_common_prefix(full_c, full_r)]
    elif row.get("prompt") is not None:  # explicit prompt
        prompt = _text(row, i, "prompt")
        prompt_ids = _ids(tokenizer, prompt, special=True)
        full_c = _ids(tokenizer, prompt + _text(row, i, "chosen"), special=True)
        full_r = _ids(tokenizer, prompt + _text(row, i, "rejected"), special=True)
    else:  # implicit prompt
        full_c = _ids(tokenizer, _text(row, i, "chosen"), special=True)
        full_r = _ids(tokenizer, _text(row, i, "rejected"), special=True)
        prompt_ids = full_c[:_common_prefix(full_c, full_r)]
    full_c, full_r = _with_eos(tokenizer, full_c), _with_eos(tokenizer, full_r)
    n_c, n_r = _common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r)
    return full_c[:n_c], full_c[n_c:], full_r[:n_r], full_r[n_r:]


def _margin(row, i):
    if row.get("margin") is None:
        return None
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(i, "margin", f"expected a finite number, got {value!r}")
    return float(value)


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


def tokenize_pairs(rows, tokenizer, *, max_length=512, max_prompt_length=128, truncation_mode="keep_end",
                   drop_bad_pairs=False) -> tuple[list[Pair], TokenizeReport]:
    """``(pairs, report)`` from any iterable of preference rows (a ``datasets.Dataset``)."""
    check_truncation(max_length, truncation_mode)
    if max_length is not None:
        if max_prompt_length is None or not 0 < max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}: "
                             "the completions need room")
    pairs, report = [], TokenizeReport(unit="pairs", dropped_because="bad pairs")
    for i, row in enumerate(rows):
        report.rows += 1
        prompt_c, chosen, prompt_r, rejected = _split(tokenizer, row, i)
        margin = _margin(row, i)
        problem = None
        if prompt_c + chosen == prompt_r + rejected:
            problem = "chosen and rejected are the same"
        elif not chosen or not rejected:
            problem = f"the {'chosen' if not chosen else 'rejected'} completion is empty (nothing after the prompt)"
        if problem is None and max_length is not None:
            before = (len(prompt_c) + len(chosen), len(prompt_r) + len(rejected))
            prompt_c, chosen, prompt_r, rejected = truncate_pair(
                prompt_c, chosen, prompt_r, rejected, max_length, max_prompt_length, truncation_mode)
            if (len(prompt_c) + len(chosen), len(prompt_r) + len(rejected)) != before:
                report.truncated += 1
                if prompt_c + chosen == prompt_r + rejected:
                    problem = f"chosen and rejected are the same after truncation to max_length={max_length}"
        if problem is not None:
            if not drop_bad_pairs:
                raise ValueError(f"row {i}: {problem} (drop_bad_pairs=True drops such rows and counts them)")
            report.dropped += 1
            continue
        pairs.append(Pair(prompt_c, chosen, prompt_r, rejected, margin))
    return pairs, report
