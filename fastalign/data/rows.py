"""Row checks and token helpers, the one place a data set row's columns are read and checked.

Every check raises ``DataError`` naming the row and the column (``row 12, column 'prompt':
empty``); ``in_file`` puts the file the rows were read from in front (``pairs.jsonl: row 12, ...``).
``Texts`` gathers the texts of a batch of rows so the fast tokenizer encodes them in one call;
``with_eos`` ends a sequence with the end-of-sequence token; ``kept_part`` is the truncation rule
(``keep_start`` keeps the first ``max_length`` tokens, ``keep_end`` the last).
"""

from __future__ import annotations

import contextlib

from fastalign.errors import ConfigError, DataError

TRUNCATION_MODES = ("keep_start", "keep_end")
ROLES = ("system", "user", "assistant")  # the roles of a chat message


def row_error(row: int, column: str, what: str) -> DataError:
    """The error for a bad value: ``row R, column C: what``."""
    return DataError(f"row {row}, column {column!r}: {what}")


def source_file(rows) -> str | None:
    """The data file ``rows`` (a data set ``load_rows`` returned) were read from, else None."""
    return getattr(rows, "fastalign_file", None)


@contextlib.contextmanager
def in_file(file: str | None):
    """A ``DataError`` raised in the block names ``file`` first (when there is one)."""
    try:
        yield
    except DataError as error:
        if file is not None and not str(error).startswith(f"{file}: "):
            error.args = (f"{file}: {error}",)
        raise


def row_value(row: dict, i: int, column: str):
    """Row ``i``'s value of ``column``; a missing column is an error naming the ones it has."""
    if column not in row:
        raise row_error(i, column, f"missing (the row has {sorted(row)})")
    return row[column]


def row_text(row: dict, i: int, column: str) -> str:
    """Row ``i``'s non-empty string in ``column``."""
    value = row_value(row, i, column)
    if value is None:
        raise row_error(i, column, "expected a string, got null")
    if not isinstance(value, str):
        raise row_error(i, column, f"expected a string, got {type(value).__name__}")
    if not value:
        raise row_error(i, column, "empty")
    return value


def encode(tokenizer, text: str, special: bool) -> list[int]:
    """The token ids of one text (with the tokenizer's special tokens when ``special``)."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def row_messages(row: dict, i: int, column: str, learn_from_assistant: bool = False) -> list[dict]:
    """Row ``i``'s non-empty list of ``{role, content}`` messages in ``column``: each role one of
    ``ROLES``, each content text (an assistant's not empty). ``learn_from_assistant``: the loss is
    on the assistant's turns, so there must be one."""
    messages = row_value(row, i, column)
    if not isinstance(messages, list) or not messages:
        raise row_error(i, column, "expected a non-empty list of {role, content} messages")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise row_error(i, column, f"message {k} is not a {{role, content}} mapping")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise row_error(i, column, f"message {k} has the role {role!r} (expected {', '.join(ROLES[:-1])} or "
                                       f"{ROLES[-1]})")
        if not isinstance(content, str):
            got = "null" if content is None else type(content).__name__
            raise row_error(i, column, f"message {k} ({role}): content is {got} (expected text)")
        if role == "assistant" and not content:
            raise row_error(i, column, f"message {k} ({role}): empty (the model would learn to answer nothing)")
    if learn_from_assistant and not any(m["role"] == "assistant" for m in messages):
        raise row_error(i, column, "no assistant message to learn from (the loss is on the assistant's turns)")
    return messages


def row_token_ids(row: dict, i: int, ids_column: str, per_id_column: str, per_id: str, vocab: int | None = None):
    """``(ids, values)``: the row's token ids (a non-empty list, each in ``[0, vocab)``: the
    tokenizer's) and its ``per_id_column``, one value per id (``None`` where the row has no such
    column); ``per_id`` names a value in errors."""
    ids, values = row.get(ids_column), row.get(per_id_column)
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        raise row_error(i, ids_column, "expected a non-empty list of token ids")
    check_token_ids(ids, i, ids_column, vocab)
    if values is not None and (not isinstance(values, list) or len(values) != len(ids)):
        raise row_error(i, per_id_column, f"expected {len(ids)} {per_id}, one per input id")
    return list(ids), values


def check_token_ids(ids, i: int, column: str, vocab: int | None) -> None:
    """Row ``i``'s token ids are ids of the tokenizer (``vocab`` of them, when known): a negative one,
    or one past its vocabulary (ids made with another tokenizer), would fail in the model's
    embedding at the first step."""
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        limit = f"0 to {vocab - 1}, the tokenizer's" if vocab is not None else "0 or more"
        raise row_error(i, column, f"token id {bad} is not an id of the tokenizer (expected {limit})")


def with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` ending with the EOS token: appended unless already last (or the tokenizer has none)."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


class Texts:
    """The texts of a batch of rows, tokenized in one call per kind (the fast tokenizer encodes a
    batch in parallel): ``add`` returns a slot, ``encode`` runs the tokenizer, ``[slot]`` reads."""

    def __init__(self):
        self.texts: tuple[list[str], list[str]] = ([], [])  # without, with special tokens
        self.ids: list[list[list[int]]] = [[], []]

    def add(self, text: str, special: bool) -> tuple[int, int]:
        self.texts[special].append(text)
        return int(special), len(self.texts[special]) - 1

    def encode(self, tokenizer) -> None:
        self.ids = [tokenizer(texts, add_special_tokens=bool(s))["input_ids"] if texts else []
                    for s, texts in enumerate(self.texts)]

    def __getitem__(self, slot: tuple[int, int]) -> list[int]:
        return self.ids[slot[0]][slot[1]]


def check_truncation(max_length, truncation_mode) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}")


def kept_part(length: int, max_length: int, truncation_mode: str) -> slice:
    """The tokens a sequence of ``length`` keeps when cut to ``max_length``: its first
    (``keep_start``) or last (``keep_end``) ones; all of them when it is not longer."""
    return slice(0, max_length) if truncation_mode == "keep_start" else slice(max(0, length - max_length), None)
