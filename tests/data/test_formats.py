"""Rows to sequences: each format, completion-only masks, truncation counts, row/column errors."""

import pytest

from fastalign.data.formats import kept_part, tokenize_sft
from fastalign.models.tiny import char_tokenizer

TOK = char_tokenizer()
EOS = TOK.eos_token_id


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_plain_text_every_token_has_a_loss():
    (seq,), report = tokenize_sft([{"text": "abc"}], TOK)
    assert seq.input_ids == ids("abc") + [EOS]
    assert seq.loss_mask == [True] * 4 and report.rows == 1


def test_prompt_completion_masks_the_prompt():
    (seq,), _ = tokenize_sft([{"prompt": "2 1:", "completion": "1 2"}], TOK)
    assert seq.input_ids == ids("2 1:") + ids("1 2") + [EOS]
    assert seq.loss_mask == [False] * 4 + [True] * 4
    (seq,), _ = tokenize_sft([{"prompt": "2 1:", "completion": "1 2"}], TOK, completion_only_loss=False)
    assert all(seq.loss_mask)


def test_messages_loss_on_assistant_turns_only():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (seq,), _ = tokenize_sft([{"messages": chat}], TOK)
    user, assistant = ids("<user>hi\n"), ids("<assistant>yo\n")
    assert seq.input_ids == user + assistant + [EOS]
    assert seq.loss_mask == [False] * len(user) + [True] * (len(assistant) + 1)


def test_pretokenized_with_labels_and_formatting_func():
    (seq,), _ = tokenize_sft([{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}], TOK)
    assert seq.input_ids == [5, 6, 7, 8] and seq.loss_mask == [False, False, True, True]
    (seq,), _ = tokenize_sft([{"q": "x", "a": "y"}], TOK, formatting_func=lambda r: r["q"] + "=" + r["a"])
    assert seq.input_ids == ids("x=y") + [EOS]


def test_truncation_is_counted_and_empty_completions_dropped():
    rows = [{"prompt": "abcdef", "completion": "gh"}, {"prompt": "a", "completion": "bcdefgh"}, {"text": "ab"}]
    seqs, report = tokenize_sft(rows, TOK, max_length=5)
    # Row 0 keeps "abcde" (all prompt): nothing left to learn, dropped. Row 1 keeps "abcde". Row 2 fits.
    assert (report.rows, report.truncated, report.dropped) == (3, 2, 1)
    assert [s.input_ids for s in seqs] == [ids("abcde"), ids("ab") + [EOS]]
    seqs, report = tokenize_sft(rows[:1], TOK, max_length=5, truncation_mode="keep_end")
    assert seqs[0].input_ids == ids("efgh") + [EOS] and report.dropped == 0
    assert "3 rows: 2 truncated, 1 dropped" in str(tokenize_sft(rows, TOK, max_length=5)[1])


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"text": "ok"}, {"txt": "oops"}], r"row 1, column 'text': missing \(the row has \['txt'\]\)"),
        ([{"text": ""}], r"row 0, column 'text': empty"),
        ([{"text": 3}], r"row 0, column 'text': expected a string, got int"),
        ([{"prompt": "p", "completion": None}], r"row 0, column 'completion': expected a string"),
        ([{"input_ids": [1, "x"]}], r"row 0, column 'input_ids': expected a non-empty list of token ids"),
        ([{"input_ids": [1, 2], "labels": [1]}], r"row 0, column 'labels': expected 2 labels"),
        ([{"messages": []}], r"row 0, column 'messages': expected a non-empty list"),
        ([{"messages": [{"role": "user"}]}], r"row 0, column 'messages': message 0 is not"),
    ],
)
def test_bad_rows_name_row_and_column(rows, match):
    with pytest.raises(ValueError, match=match):
        tokenize_sft(rows, TOK)


def test_bad_options():
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_sft([], TOK, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_sft([], TOK, max_length=1)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_kept_part_cuts_only_longer_sequences(mode):
    ids = list(range(7))
    assert ids[kept_part(7, 10, mode)] == ids
    assert ids[kept_part(7, 7, mode)] == ids
    assert ids[kept_part(7, 3, mode)] == ([0, 1, 2] if mode == "keep_start" else [4, 5, 6])
