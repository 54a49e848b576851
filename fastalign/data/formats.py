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
from .rows import Texts, check_truncation, encode, kept_part, row_error, row_messages, row_text, row_token_ids, with_eos


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


def _masked_with_eos(tokenizer, ids: list[int], mask: list[bool]):
    """``with_eos`` and the loss mask: an appended EOS is scored like the token before it."""
    ended = with_eos(tokenizer, ids)
    return ended, mask + [mask[-1] if mask else True] * (len(ended) - len(ids))


def _conversation(tokenizer, messages: list[dict], i: int, completion_only: bool):
    """Tokens of a chat and the loss mask of its assistant turns (rendered turn by turn)."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, message in enumerate(messages):
        rendered = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        full = encode(tokenizer, rendered, special=False)
        if full[: len(ids)] != ids:
            raise row_error(i, "messages", "the chat template does not render turn by turn as a prefix")
        turn = full[len(ids):]
        ids += turn
        mask += [message["role"] == "assistant" or not completion_only] * len(turn)
    return ids, mask


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

    def _parse(self, row: dict, i: int, texts: Texts, vocab: int):
        """What the row holds: ``(ids, prompt, mask)`` known now, or the slots of texts to encode."""
        if self.formatting_func is not None:
            text = self.formatting_func(row)
            if not isinstance(text, str) or not text:
                raise row_error(i, "formatting_func", "must return a non-empty string")
            return "text", texts.add(text, True)
        if "input_ids" in row:
            ids, labels = row_token_ids(row, i, "input_ids", "labels", "labels", vocab)
            return "ids", (ids, 0, None if labels is None else [label != IGNORE_INDEX for label in labels])
        if "messages" in row:
            messages = row_messages(row, i, "messages", learn_from_assistant=self.completion_only_loss)
            ids, mask = _conversation(self.tokenizer, messages, i, self.completion_only_loss)
            ids, mask = _masked_with_eos(self.tokenizer, ids, mask)
            return "ids", (ids, 0, mask)
        if "prompt" in row or "completion" in row:
            return "prompt", (texts.add(row_text(row, i, "prompt"), True), texts.add(row_text(row, i, "completion"), False))
        return "text", texts.add(row_text(row, i, self.dataset_text_field or "text"), True)

    def _tokens(self, kind, what, texts: Texts):
        if kind == "ids":
            return what
        if kind == "text":
            return with_eos(self.tokenizer, texts[what]), 0, None
        prompt, completion = texts[what[0]], texts[what[1]]
        return with_eos(self.tokenizer, prompt + completion), len(prompt) if self.completion_only_loss else 0, None

    def __call__(self, rows: list[dict], indices: list[int]) -> dict[str, list]:
        texts = Texts()
        vocab = len(self.tokenizer)
        parsed = [self._parse(row, i, texts, vocab) for row, i in zip(rows, indices)]
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
    from .store import SFT_HALVES, sft_store, tokenize_rows

    encode = SFTEncoder(tokenizer, dataset_text_field, formatting_func, max_length, truncation_mode,
                        completion_only_loss)
    store = sft_store(tokenize_rows(rows, encode, SFT_HALVES))
    sequences = [store.unit(i)[0] for i in store.kept]
    return [Sequence(s.input_ids.tolist(), s.loss_mask.tolist()) for s in sequences], store.report
