"""Dataset rows to tokenized ``Sequence``s, for supervised fine-tuning.

Row formats, picked from the columns (or forced by the arguments):

- ``formatting_func(row) -> str``, or a text column (``dataset_text_field``, default ``"text"``):
  plain text, every token carries a loss.
- ``prompt`` + ``completion``: the loss is on the completion only (``completion_only_loss``).
- ``messages``: a conversation rendered with the tokenizer's chat template; the loss is on the
  assistant turns only (``completion_only_loss``).
- ``input_ids`` (+ optional ``labels``, -100 where no loss): already tokenized.

Truncation is explicit and counted: ``max_length`` tokens kept from the start (``keep_start``) or
the end (``keep_end``). A sequence left with no loss token is dropped and counted. A bad row (a
missing column, an empty or mistyped value) raises before any training, naming row and column.
"""

from __future__ import annotations

from dataclasses import dataclass

from .packing import IGNORE_INDEX, Sequence

TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class TokenizeReport:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.rows} rows: {self.truncated} truncated, {self.dropped} dropped (no loss token left)"


def _bad(row: int, column: str, what: str) -> ValueError:
    return ValueError(f"row {row}, column {column!r}: {what}")


def _text(row: dict, i: int, column: str) -> str:
    if column not in row:
        raise _bad(i, column, f"missing (the row has {sorted(row)})")
    value = row[column]
    if not isinstance(value, str):
        raise _bad(i, column, f"expected a string, got {type(value).__name__}")
    if not value:
        raise _bad(i, column, "empty")
    return value


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _with_eos(tokenizer, ids: list[int], mask: list[bool]):
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids, mask = ids + [eos], mask + [mask[-1] if mask else True]
    return ids, mask


def _conversation(tokenizer, messages, i: int, completion_only: bool):
    """Tokens of a chat and the loss mask of its assistant turns (rendered turn by turn)."""
    if not isinstance(messages, list) or not messages:
        raise _bad(i, "messages", "expected a non-empty list of {role, content} messages")
    ids: list[int] = []
    mask: list[bool] = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _bad(i, "messages", f"message {k} is not a {{role, content}} mapping")
        rendered = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        full = _ids(tokenizer, rendered, special=False)
        if full[: len(ids)] != ids:
            raise _bad(i, "messages", "the chat template does not render turn by turn as a prefix")
        turn = full[len(ids):]
        ids += turn
        mask += [message["role"] == "assistant" or not completion_only] * len(turn)
    return ids, mask


def _row_tokens(row, i, tokenizer, text_field, formatting_func, completion_only):
    if formatting_func is not None:
        text = formatting_func(row)
        if not isinstance(text, str) or not text:
            raise _bad(i, "formatting_func", "must return a non-empty string")
        ids = _ids(tokenizer, text, special=True)
        return _with_eos(tokenizer, ids, [True] * len(ids))
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise _bad(i, "input_ids", "expected a non-empty list of token ids")
        labels = row.get("labels")
        if labels is None:
            return list(ids), [True] * len(ids)
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise _bad(i, "labels", f"expected {len(ids)} labels, one per input id")
        return list(ids), [label != IGNORE_INDEX for label in labels]
    if "messages" in row:
        ids, mask = _conversation(tokenizer, row["messages"], i, completion_only)
        return _with_eos(tokenizer, ids, mask)
    if "prompt" in row or "completion" in row:
        prompt = _ids(tokenizer, _text(row, i, "prompt"), special=True)
        completion = _ids(tokenizer, _text(row, i, "completion"), special=False)
        mask = [not completion_only] * len(prompt) + [True] * len(completion)
        return _with_eos(tokenizer, prompt + completion, mask)
    ids = _ids(tokenizer, _text(row, i, text_field or "text"), special=True)
    return _with_eos(tokenizer, ids, [True] * len(ids))


def check_truncation(max_length, truncation_mode) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")


def kept_part(length: int, max_length: int, truncation_mode: str) -> slice:
    """The tokens a sequence of ``length`` keeps when cut to ``max_length``: its first
    (``keep_start``) or last (``keep_end``) ones."""
    return slice(0, max_length) if truncation_mode == "keep_start" else slice(length - max_length, None)


def tokenize_sft(
    rows,
    tokenizer,
    *,
    dataset_text_field=None,
    formatting_func=None,
    max_length=None,
    truncation_mode="keep_start",
    completion_only_loss=True,
):
    """``(sequences, report)`` for SFT from any iterable of row mappings (a ``datasets.Dataset``)."""
    check_truncation(max_length, truncation_mode)
    sequences, report = [], TokenizeReport()
    for i, row in enumerate(rows):
        report.rows += 1
        ids, mask = _row_tokens(row, i, tokenizer, dataset_text_field, formatting_func, completion_only_loss)
        if max_length is not None and len(ids) > max_length:
            report.truncated += 1
            cut = kept_part(len(ids), max_length, truncation_mode)
            ids, mask = ids[cut], mask[cut]
        if len(ids) < 2 or not any(mask[1:]):
            report.dropped += 1
            continue
        sequences.append(Sequence(ids, mask))
    return sequences, report
