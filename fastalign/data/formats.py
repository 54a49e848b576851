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
    """What tokenizing a dataset did: rows read, truncated, and dropped (and why they are dropped)."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    unit: str = "rows"  # what a row becomes, as printed: "pairs" for preference data
    dropped_because: str = "no loss token left"

    def __str__(self) -> str:
        return f"{self.rows} {self.unit}: {self.truncated} truncated, {self.dropped} dropped ({self.dropped_because})"


def _bad(row: int, column: str, what: str) -> ValueError:
    return ValueError(f"row {row}, column {column!r}: {what}")


def _column(row: dict, i: int, column: str):
    if column not in row:
        raise _bad(i, column, f"missing (the row has {sorted(row)})")
    return row[column]


def _text(row: dict, i: int, column: str) -> str:
    value = _column(row, i, column)
    if not isinstance(value, str):
        raise _bad(i, column, f"expected a string, got {type(value).__name__}")
    if not value:
        raise _bad(i, column, "empty")
    return value


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _messages(row: dict, i: int, column: str) -> list[dict]:
    messages = _column(row, i, column)
    if not isinstance(messages, list) or not messages:
        raise _bad(i, column, "expected a non-empty list of {role, content} messages")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _bad(i, column, f"message {k} is not a {{role, content}} mapping")
    return messages


def _pretokenized(row: dict, i: int, ids_column: str, per_id_column: str, per_id: str):
    """``(ids, values)``: the row's token ids (a non-empty list) and its ``per_id_column``, one
    value per id (``None`` where the row has no such column); ``per_id`` names a value in errors."""
    ids, values = row.get(ids_column), row.get(per_id_column)
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        raise _bad(i, ids_column, "expected a non-empty list of token ids")
    if values is not None and (not isinstance(values, list) or len(values) != len(ids)):
        raise _bad(i, per_id_column, f"expected {len(ids)} {per_id}, one per input id")
    return list(ids), values


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` ending with the EOS token: appended unless already last (or the tokenizer has none)."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _masked_with_eos(tokenizer, ids: list[int], mask: list[bool]):
    """``_with_eos`` and the loss mask: an appended EOS is scored like the token before it."""
    with_eos = _with_eos(tokenizer, ids)
    return with_eos, mask + [mask[-1] if mask else True] * (len(with_eos) - len(ids))


def _conversation(tokenizer, messages: list[dict], i: int, completion_only: bool):
    """Tokens of a chat and the loss mask of its assistant turns (rendered turn by turn)."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, message in enumerate(messages):
        rendered = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        full = _ids(tokenizer, rendered, special=False)
        if full[: len(ids)] != ids:
            raise _bad(i, "messages", "the chat template does not render turn by turn as a prefix")
        turn = full[len(ids):]
        ids += turn
        mask += [message["role"] == "assistant" or not completion_only] * len(turn)
    return ids, mask


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


@dataclass
class SFTEncoder:
    """SFT rows to token-store columns (``fastalign.data.store``): per row its ids, the length of
    its no-loss prompt or an explicit loss mask, whether it was truncated and its loss tokens. A
    dropped row (no loss token left) keeps its place with no ids."""

    tokenizer: object
    dataset_text_field: str | None = None
    formatting_func: object = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    completion_only_loss: bool = True

    def __post_init__(self):
        check_truncation(self.max_length, self.truncation_mode)

    def _parse(self, row: dict, i: int, texts: Texts):
        """What the row holds: ``(ids, prompt, mask)`` known now, or the slots of texts to encode."""
        if self.formatting_func is not None:
            text = self.formatting_func(row)
            if not isinstance(text, str) or not text:
                raise _bad(i, "formatting_func", "must return a non-empty string")
            return "text", texts.add(text, True)
        if "input_ids" in row:
            ids, labels = _pretokenized(row, i, "input_ids", "labels", "labels")
            return "ids", (ids, 0, None if labels is None else [label != IGNORE_INDEX for label in labels])
        if "messages" in row:
            ids, mask = _conversation(self.tokenizer, _messages(row, i, "messages"), i, self.completion_only_loss)
            ids, mask = _masked_with_eos(self.tokenizer, ids, mask)
            return "ids", (ids, 0, mask)
        if "prompt" in row or "completion" in row:
            return "prompt", (texts.add(_text(row, i, "prompt"), True), texts.add(_text(row, i, "completion"), False))
        return "text", texts.add(_text(row, i, self.dataset_text_field or "text"), True)

    def _tokens(self, kind, what, texts: Texts):
        if kind == "ids":
            return what
        if kind == "text":
            return _with_eos(self.tokenizer, texts[what]), 0, None
        prompt, completion = texts[what[0]], texts[what[1]]
        return _with_eos(self.tokenizer, prompt + completion), len(prompt) if self.completion_only_loss else 0, None

    def __call__(self, rows: list[dict], indices: list[int]) -> dict[str, list]:
        texts = Texts()
        parsed = [self._parse(row, i, texts) for row, i in zip(rows, indices)]
        texts.encode(self.tokenizer)
        out = {"ids": [], "prompt": [], "mask": [], "truncated": [], "loss": []}
        for kind, what in parsed:
            ids, prompt, mask = self._tokens(kind, what, texts)
            truncated = self.max_length is not None and len(ids) > self.max_length
            if truncated:
                cut = kept_part(len(ids), self.max_length, self.truncation_mode)
                prompt = max(0, min(prompt - cut.start, self.max_length))
                ids, mask = ids[cut], None if mask is None else mask[cut]
            loss = sum(mask[1:]) if mask is not None else len(ids) - max(prompt, 1)
            if len(ids) < 2 or loss <= 0:
                ids, prompt, mask, loss = [], 0, None, 0
            out["ids"].append(ids)
            out["prompt"].append(prompt)
            out["mask"].append([] if mask is None else [int(m) for m in mask])
            out["truncated"].append(truncated)
            out["loss"].append(loss)
        return out


def check_truncation(max_length, truncation_mode) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")


def kept_part(length: int, max_length: int, truncation_mode: str) -> slice:
    """The tokens a sequence of ``length`` keeps when cut to ``max_length``: its first
    (``keep_start``) or last (``keep_end``) ones; all of them when it is not longer."""
    return slice(0, max_length) if truncation_mode == "keep_start" else slice(max(0, length - max_length), None)


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
    """``(sequences, report)`` for SFT from any iterable of row mappings, in memory: the small-data
    form of what the trainers read from a token store (``fastalign.data.store``)."""
    from .store import SFT_HALVES, TokenStore, tokenize_rows

    encode = SFTEncoder(tokenizer, dataset_text_field, formatting_func, max_length, truncation_mode,
                        completion_only_loss)
    store = TokenStore(tokenize_rows(rows, encode, SFT_HALVES), SFT_HALVES)
    sequences = [store.unit(i)[0] for i in store.kept]
    return [Sequence(s.input_ids.tolist(), s.loss_mask.tolist()) for s in sequences], store.report
