"""The padded encoder-decoder path (``fastalign.models.seq2seq``) on a tiny T5 (and a tiny BART for
the head's bias): batches split from token-store rows, log-probs through the fused head equal to the
model's own cross-entropy in fp32 (values and gradients), one encoder pass shared by a pair, the
value-head model, and what loading does with an encoder-decoder model."""

from __future__ import annotations

import pytest
import torch

from fastalign.data import IGNORE_INDEX, Sequence, SFTEncoder, plan_padded
from fastalign.data.store import SFT_HALVES, sft_store, tokenize_rows
from fastalign.models import (
    Seq2SeqLMWithValueHead,
    batch_sequence_logprobs,
    load_model,
    seq2seq_collator,
    seq2seq_logprobs,
    seq2seq_logprobs_and_values,
)
from fastalign.models.seq2seq import decoder_states, seq2seq_collate, split_row
from fastalign.models.tiny import char_tokenizer
from helpers import tiny_t5

# Odd lengths: prompts of 5, 3 and 7 tokens, completions of 4, 1 and 6.
ROWS = [([5, 6, 7, 8, 9], [10, 11, 12, 2]), ([13, 14, 2], [2]), ([20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34, 2])]


def prompt_units(rows=ROWS):
    return [[Sequence(p + c, [False] * len(p) + [True] * len(c))] for p, c in rows]


def model_logprobs(model, batch):
    """fp32 log-probs of each label from the model's own full forward (logits of every position)."""
    enc = batch.encoder_index
    logits = model(input_ids=batch.input_ids[enc], attention_mask=batch.attention_mask[enc],
                   decoder_input_ids=batch.decoder_input_ids, decoder_attention_mask=batch.decoder_attention_mask,
                   use_cache=False).logits.float()
    labels = batch.labels.view(batch.num_sequences, -1)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * (labels != IGNORE_INDEX)


def test_rows_split_at_the_prompt_and_plain_text_goes_whole_to_both():
    enc, target, labels = split_row(Sequence([5, 6, 7, 8, 9], [False, False, True, True, True]))
    assert enc.tolist() == [5, 6] and target.tolist() == [7, 8, 9] and labels.tolist() == [7, 8, 9]
    enc, target, labels = split_row(Sequence([5, 6, 7, 8]))  # plain text: no prompt
    assert enc.tolist() == target.tolist() == [5, 6, 7, 8] and labels.tolist() == [IGNORE_INDEX, 6, 7, 8]
    enc, target, labels = split_row(Sequence([5, 6, 7, 8, 9], [False, True, False, True, True]))  # chat turns
    assert enc.tolist() == [5] and labels.tolist() == [6, IGNORE_INDEX, 8, 9]
    with pytest.raises(ValueError, match="loss token"):
        split_row(Sequence([5, 6], [False, False]))


def test_a_batch_counts_the_loss_tokens_the_store_weighs():
    tok = char_tokenizer()
    rows = [{"prompt": "abc=", "completion": "ABC"}, {"text": "hello"}, {"prompt": "xy", "completion": "Z"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]}]
    store = sft_store(tokenize_rows(rows, SFTEncoder(tok), SFT_HALVES))
    for i in range(len(rows)):
        batch = seq2seq_collate([store.unit(i)])
        assert batch.num_loss_tokens == store.weights[i], rows[i]
    batch = seq2seq_collate([store.unit(0)])
    assert tok.decode(batch.input_ids[0]) == "abc=" and batch.labels.tolist() == tok.encode("ABC") + [2]
    assert batch.decoder_input_ids[0].tolist() == [0] + tok.encode("ABC")  # the start token, then shifted


def test_pairs_share_one_encoder_row_when_their_prompts_agree():
    p = [5, 6, 7]
    units = [[Sequence(p + [8, 9], [0, 0, 0, 1, 1]), Sequence(p + [10], [0, 0, 0, 1])],
             [Sequence([5, 8], [0, 1]), Sequence([5, 9, 11], [0, 0, 1])]]  # prompts differ: two rows
    batch = seq2seq_collate(units, {"margin": [1.0, 1.0, 2.0, 2.0]})
    assert batch.input_ids.shape[0] == 3 and batch.encoder_index.tolist() == [0, 0, 1, 2]
    assert batch.chosen.tolist() == [0, 2] and batch.rejected.tolist() == [1, 3]
    assert batch.extras["margin"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert batch.num_real_tokens == 3 + 1 + 2 + 2 + 1 + 1 + 1 and batch.num_tokens == 3 * 3 + 4 * 2


def test_logprobs_equal_the_model_cross_entropy_values_and_gradients():
    model = tiny_t5().float()
    batch = seq2seq_collate(prompt_units())
    ours = seq2seq_logprobs(model, batch)
    want = model_logprobs(model, batch)
    torch.testing.assert_close(ours, want.detach(), rtol=1e-5, atol=1e-5)
    (-ours.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # transformers' own loss: the mean cross-entropy of labels=..., the decoder input shifted from them.
    labels = batch.labels.view(batch.num_sequences, -1)
    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    torch.testing.assert_close(-ours.sum().detach() / batch.num_loss_tokens, loss.detach(), rtol=1e-5, atol=1e-6)
    (loss * batch.num_loss_tokens).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_row_kind_matches_the_full_forward_and_a_shared_encoder_changes_nothing():
    model = tiny_t5(seed=1).float()
    units = [[Sequence([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), Sequence([5, 6, 7, 9], [0, 0, 1, 1])],
             [Sequence([11, 12, 13, 14, 15, 16, 17]), Sequence([11, 12, 18], [0, 1, 1])],
             [Sequence([20, 21, 22, 23, 24], [0, 1, 0, 1, 1]), Sequence([20, 25, 26], [0, 1, 1])]]
    shared = seq2seq_collate(units)
    assert shared.encoder_index.tolist() == [0, 0, 1, 2, 3, 3]  # the first and last pairs share their prompt
    torch.testing.assert_close(seq2seq_logprobs(model, shared), model_logprobs(model, shared).detach(),
                               rtol=1e-5, atol=1e-5)
    apart = seq2seq_collate([[s] for u in units for s in u])  # every half alone: its own encoder row
    torch.testing.assert_close(batch_sequence_logprobs(model, shared), batch_sequence_logprobs(model, apart),
                               rtol=1e-5, atol=1e-5)
    averaged = batch_sequence_logprobs(model, shared, average=True)
    counts = (shared.labels != IGNORE_INDEX).view(6, -1).sum(1)
    torch.testing.assert_close(averaged, batch_sequence_logprobs(model, shared) / counts)


def test_bart_head_adds_its_final_logits_bias():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0)).eval()
    model.final_logits_bias.normal_()
    batch = seq2seq_collator(model)(prompt_units())
    assert int(batch.decoder_input_ids[0, 0]) == 2
    torch.testing.assert_close(seq2seq_logprobs(model, batch), model_logprobs(model, batch).detach(),
                               rtol=1e-5, atol=1e-5)


def test_value_head_model_reads_the_decoder(tmp_path):
    model = Seq2SeqLMWithValueHead(tiny_t5(seed=2), summary_dropout_prob=0.0)
    batch = seq2seq_collate(prompt_units())
    out = seq2seq_logprobs_and_values(model, batch, return_entropy=True)
    pos = (batch.labels != IGNORE_INDEX).nonzero()[:, 0]
    logits, _, values = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              decoder_input_ids=batch.decoder_input_ids,
                              decoder_attention_mask=batch.decoder_attention_mask)
    torch.testing.assert_close(out.values, values.reshape(-1)[pos].float())
    torch.testing.assert_close(out.logprobs, model_logprobs(model.pretrained_model, batch).reshape(-1)[pos])
    assert out.entropy.shape == out.logprobs.shape and logits.shape[:2] == batch.decoder_input_ids.shape
    torch.testing.assert_close(decoder_states(model, batch).shape, torch.Size([batch.labels.numel(), 32]))
    model.save_pretrained(tmp_path)
    again = Seq2SeqLMWithValueHead.from_pretrained(str(tmp_path), summary_dropout_prob=0.0)
    torch.testing.assert_close(seq2seq_logprobs_and_values(again, batch).values, out.values)
    with pytest.raises(ValueError, match="not an encoder-decoder model: use CausalLMWithValueHead"):
        Seq2SeqLMWithValueHead(load_model("fastalign/tiny-llama")[0])


def test_loading_keeps_the_models_own_attention_and_says_padded(tmp_path):
    model, report = load_model(tiny_t5())
    assert model.config._attn_implementation != "fastalign_varlen" and "padded" in report
    model.save_pretrained(tmp_path)
    loaded, report = load_model(str(tmp_path))
    assert type(loaded).__name__ == "T5ForConditionalGeneration" and "padded" in report


def test_padded_plan_keeps_rows_times_longest_within_the_budget():
    lengths = [3, 9, 4, 8, 2, 7, 7, 1]
    plan = plan_padded(lengths, 20)
    assert sorted(i for b in plan for i in b.tolist()) == list(range(8))
    assert all(len(b) * max(lengths[i] for i in b) <= 20 for b in plan)
    with pytest.raises(ValueError, match="more than max_tokens_per_batch"):
        plan_padded([30], 20)
