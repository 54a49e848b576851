"""Preference rows to pairs: each format, the implicit prompt, TRL's truncation, bad pairs, packing."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastalign.data import pack_all, tokenize_pairs
from fastalign.data.preference import truncate_pair
from fastalign.models.tiny import char_tokenizer

TOK = char_tokenizer()
EOS = TOK.eos_token_id


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_explicit_prompt_splits_prompt_and_completions():
    (pair,), report = tokenize_pairs([{"prompt": "31=", "chosen": "13", "rejected": "31"}], TOK)
    assert pair.chosen_prompt == pair.rejected_prompt == ids("31=")
    assert pair.chosen == ids("13") + [EOS] and pair.rejected == ids("31") + [EOS]
    chosen, rejected = pair.sequences()
    assert chosen.input_ids == ids("31=13") + [EOS]
    assert chosen.loss_mask == [False] * 3 + [True] * 3 and rejected.loss_mask == [False] * 3 + [True] * 3
    assert (report.rows, report.truncated, report.dropped) == (1, 0, 0) and pair.margin is None


def test_implicit_prompt_is_the_longest_common_token_prefix():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    (pair,), _ = tokenize_pairs([row], TOK, max_length=None)
    assert pair.chosen_prompt == pair.rejected_prompt == ids("\n\nHuman: hi\n\nAssistant: ")
    assert pair.chosen == ids("hello") + [EOS] and pair.rejected == ids("go away") + [EOS]


def test_implicit_prompt_when_one_answer_extends_the_other():
    # "ab" vs "abc": the common prefix is "ab"; the chosen completion is then just EOS.
    (pair,), _ = tokenize_pairs([{"chosen": "ab", "rejected": "abc"}], TOK)
    assert pair.chosen_prompt == ids("ab") and pair.chosen == [EOS] and pair.rejected == ids("c") + [EOS]


def _bpe_tokenizer():
    """A BPE tokenizer that merges "ab" into one token, to test splits at token boundaries."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(["abab ab ab cd"] * 50, trainers.BpeTrainer(special_tokens=["<unk>", "<eos>"], vocab_size=40))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def test_explicit_prompt_with_a_token_merging_across_the_boundary():
    tok = _bpe_tokenizer()
    merged = tok("ab", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1  # "a" + "b" is one token
    (pair,), _ = tokenize_pairs([{"prompt": "cd a", "chosen": "b", "rejected": "bab"}], tok)
    # The prompt's last token "a" merges with the completion: it goes to the completion side.
    assert tok.decode(pair.chosen_prompt) == "cd" and pair.chosen[0] == merged[0]
    full = tok("cd ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair.chosen_prompt + pair.chosen == full


def test_conversational_rows_use_the_chat_template():
    prompt = [{"role": "user", "content": "sort 31"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "13"}],
           "rejected": [{"role": "assistant", "content": "31"}]}
    (pair,), _ = tokenize_pairs([row], TOK)
    assert pair.chosen_prompt == ids("<user>sort 31\n<assistant>")
    assert pair.chosen == ids("13\n") + [EOS] and pair.rejected == ids("31\n") + [EOS]
    implicit = {"chosen": prompt + row["chosen"], "rejected": prompt + row["rejected"]}
    (pair2,), _ = tokenize_pairs([implicit], TOK)
    assert pair2.chosen_prompt + pair2.chosen == pair.chosen_prompt + pair.chosen
    assert pair2.chosen == ids("13\n") + [EOS]  # the common prefix runs up to the first differing token


def test_pretokenized_reward_columns_with_margin():
    row = {"input_ids_chosen": [0, 0, 5, 6, 7], "attention_mask_chosen": [0, 0, 1, 1, 1],
           "input_ids_rejected": [5, 6, 8, 9], "attention_mask_rejected": [1, 1, 1, 1], "margin": 2}
    (pair,), _ = tokenize_pairs([row], TOK)
    assert pair.chosen_prompt == [5, 6] and pair.chosen == [7] and pair.rejected == [8, 9] and pair.margin == 2.0


def test_truncation_follows_trl_prompt_first_then_completions():
    prompt, chosen, rejected = list(range(10)), [20, 21, 22, 23], [30, 31]
    # Fits: nothing changes.
    assert truncate_pair(prompt, chosen, prompt, rejected, 14, 5, "keep_end") == (prompt, chosen, prompt, rejected)
    # Too long: the prompt is cut to max_prompt_length (its end kept), which is enough here.
    p, c, _, r = truncate_pair(prompt, chosen, prompt, rejected, 10, 6, "keep_end")
    assert p == prompt[-6:] and c == chosen and r == rejected
    p, *_ = truncate_pair(prompt, chosen, prompt, rejected, 10, 6, "keep_start")
    assert p == prompt[:6]
    # Still too long: both completions are cut to max_length - max_prompt_length.
    p, c, _, r = truncate_pair(prompt, chosen, prompt, rejected, 8, 5, "keep_end")
    assert p == prompt[-5:] and c == chosen[:3] and r == rejected


def test_truncation_is_counted():
    rows = [{"prompt": "1234567890=", "chosen": "0123456789", "rejected": "9876543210"}, {"prompt": "1=", "chosen": "1", "rejected": "2"}]
    pairs, report = tokenize_pairs(rows, TOK, max_length=12, max_prompt_length=4)
    assert report.truncated == 1 and len(pairs) == 2
    long = pairs[0]
    assert len(long.chosen_prompt) == 4 and len(long.chosen_prompt) + len(long.chosen) <= 12
    assert "1 truncated" in str(report)


def test_bad_pairs_raise_naming_the_row_or_are_dropped_and_counted():
    rows = [{"prompt": "1=", "chosen": "1", "rejected": "2"}, {"prompt": "2=", "chosen": "22", "rejected": "22"}]
    with pytest.raises(ValueError, match="row 1: chosen and rejected are the same"):
        tokenize_pairs(rows, TOK)
    pairs, report = tokenize_pairs(rows, TOK, drop_bad_pairs=True)
    assert len(pairs) == 1 and report.dropped == 1
    # Identical after truncation: the completions differ only past the cut.
    rows = [{"prompt": "1=", "chosen": "12345", "rejected": "12399"}]
    with pytest.raises(ValueError, match="row 0: chosen and rejected are the same after truncation"):
        tokenize_pairs(rows, TOK, max_length=5, max_prompt_length=2)


@pytest.mark.parametrize("row, column", [
    ({"prompt": "1=", "chosen": "1"}, "rejected"),
    ({"prompt": "1=", "chosen": "", "rejected": "2"}, "chosen"),
    ({"prompt": "1=", "chosen": 3, "rejected": "2"}, "chosen"),
    ({"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}, "chosen"),
    # Not a list at all (these raised a bare TypeError, naming nothing).
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": 5}, "rejected"),
    ({"prompt": 5, "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     "prompt"),
    ({"input_ids_chosen": [1, 2], "attention_mask_chosen": [1], "input_ids_rejected": [1, 3]}, "attention_mask_chosen"),
    ({"prompt": "1=", "chosen": "1", "rejected": "2", "margin": float("nan")}, "margin"),
])
def test_malformed_rows_name_row_and_column(row, column):
    with pytest.raises(ValueError, match=rf"row 1, column '{column}'"):
        tokenize_pairs([{"prompt": "0=", "chosen": "0", "rejected": "1"}, row], TOK)


def test_max_prompt_length_must_leave_room():
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pairs([], TOK, max_length=8, max_prompt_length=8)


def test_pairs_are_never_split_across_batches():
    rows = [{"prompt": f"{i}" * (1 + i % 5) + "=", "chosen": "1" * (1 + i % 3), "rejected": "2" * (2 + i % 4)}
            for i in range(40)]
    pairs, _ = tokenize_pairs(rows, TOK)
    batches = pack_all([p.sequences() for p in pairs], 40, {"margin": [[float(i)] * 2 for i in range(len(pairs))]})
    seen = []
    for b in batches:
        assert b.num_tokens <= 40 and b.chosen.numel() == b.num_sequences // 2
        assert (b.rejected == b.chosen + 1).all()
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        for c, r in zip(b.chosen.tolist(), b.rejected.tolist()):
            # Both halves of a pair sit in this batch, with the same margin.
            assert b.extras["margin"][c] == b.extras["margin"][r]
            seen.append((int(b.extras["margin"][c]), lengths[c], lengths[r]))
    assert sorted(m for m, *_ in seen) == list(range(len(pairs)))
    for m, lc, lr in seen:
        assert (lc, lr) == (len(pairs[m].chosen_prompt) + len(pairs[m].chosen), len(pairs[m].rejected_prompt) + len(pairs[m].rejected))
