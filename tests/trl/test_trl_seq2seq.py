"""Encoder-decoder models through fastalign.trl, as TRL 0.7.10 takes them: ``DPOTrainer`` with
``is_encoder_decoder=True`` (and ``max_target_length``), ``SFTTrainer`` with a seq2seq model object,
``PPOTrainer`` with ``AutoModelForSeq2SeqLMWithValueHead``, on a tiny T5 saved with the built-in
character tokenizer. They run padded (``fastalign.models.seq2seq``)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, T5ForConditionalGeneration, TrainingArguments

from fastalign.models import Seq2SeqBatch, seq2seq_logprobs
from fastalign.models.seq2seq import seq2seq_collate
from fastalign.models.tiny import char_tokenizer
from fastalign.trl import (
    AutoModelForSeq2SeqLMWithValueHead,
    DPOTrainer,
    PPOConfig,
    PPOTrainer,
    SFTTrainer,
    create_reference_model,
)
from fastalign.trl.core import LengthSampler
from helpers import one_torch_thread, tiny_t5

WORDS = ["abc", "bead", "cafe", "dab", "faced", "ace", "bad", "fade"]
PAIRS = [{"prompt": w + "=", "chosen": w.upper(), "rejected": w[::-1]} for w in WORDS]


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    tiny_t5().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, **kw)


def test_value_head_model_from_a_name_and_the_wrong_kind(t5_dir, assets):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(t5_dir)
    assert model.is_encoder_decoder and not model.is_peft_model
    ref = create_reference_model(model)
    assert type(ref) is type(model) and not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(ValueError, match="use AutoModelForCausalLMWithValueHead"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained(str(assets / "tiny"))


def test_dpo_with_is_encoder_decoder_learns_the_pairs(t5_dir, tmp_path):
    model = T5ForConditionalGeneration.from_pretrained(t5_dir)
    a = args(tmp_path, max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1)
    trainer = DPOTrainer(model, None, args=a, train_dataset=Dataset.from_list(PAIRS), eval_dataset=PAIRS[:4],
                         is_encoder_decoder=True, max_length=64, max_prompt_length=16, max_target_length=8,
                         generate_during_eval=True)
    assert trainer.is_encoder_decoder and trainer.args.max_length == 24  # max_prompt_length + max_target_length
    batch = trainer.train_batches[0].to(trainer.engine.device)
    assert isinstance(batch, Seq2SeqBatch)
    _, sums = trainer.compute_loss(batch)
    with torch.no_grad():  # logits/chosen: the mean logit over the chosen completions' decoder positions
        enc = batch.encoder_index[batch.chosen]
        logits = trainer.model(input_ids=batch.input_ids[enc], attention_mask=batch.attention_mask[enc],
                               decoder_input_ids=batch.decoder_input_ids[batch.chosen]).logits
        real = batch.decoder_attention_mask[batch.chosen].bool()
        want = sum(logits[k][real[k]].mean() for k in range(len(enc)))
    assert torch.allclose(sums["logits/chosen"], want, atol=1e-4)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before - 0.2 and after["eval_rewards/accuracies"] == 1.0, (before, after)
    assert trainer.predict(PAIRS[:3]).predictions.shape == (3, 2)
    assert (tmp_path / "out" / "game_log.jsonl").is_file()


def test_sft_with_a_seq2seq_model_lowers_the_loss(t5_dir, tmp_path):
    rows = [{"text": w * 2} for w in WORDS]
    a = args(tmp_path, max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3)
    trainer = SFTTrainer(T5ForConditionalGeneration.from_pretrained(t5_dir), args=a,
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]),
                         max_seq_length=32)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < 0.7 * before
    assert trainer.predict(rows[:2]).predictions.shape == (2,)


def test_ppo_with_the_seq2seq_value_head_model(t5_dir, tmp_path):
    config = PPOConfig(model_name=t5_dir, batch_size=4, mini_batch_size=2, output_dir=str(tmp_path / "ppo"),
                       kl_penalty="full")
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(config.model_name)
    ref = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(config.model_name)
    tok = AutoTokenizer.from_pretrained(t5_dir)
    trainer = PPOTrainer(config, model, ref, tok)
    assert trainer.is_encoder_decoder
    queries = [torch.tensor(tok.encode(w)) for w in WORDS[:4]]
    responses = trainer.generate(queries, length_sampler=LengthSampler(2, 5), return_prompt=False, do_sample=True)
    assert all(1 <= len(r) <= 4 for r in responses)  # the decoder's tokens after its start token
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.5), torch.tensor(0.2)])
    assert stats["objective/logprobs"].shape[0] == 4
    trainer.log_stats(stats, {"query": WORDS[:4], "response": tok.batch_decode(responses)}, [1.0, 0.0, 0.5, 0.2])
    # TRL's padded building block scores every response token, the same log-probs as the packed-free path.
    logprobs, logits, values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, None, True)
    assert masks.sum(1).tolist() == [len(r) for r in responses] and values.shape == masks.shape
    units = [[_unit(q, r)] for q, r in zip(queries, responses)]
    want = seq2seq_logprobs(trainer.model, seq2seq_collate(units))
    for j, r in enumerate(responses):
        torch.testing.assert_close(logprobs[j, :len(r)], want[j, :len(r)], rtol=1e-4, atol=1e-5)
    trainer.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "value_head.safetensors").is_file()


def _unit(query, response):
    from fastalign.data import Sequence

    return Sequence(torch.cat([query, response]).tolist(), [False] * len(query) + [True] * len(response))
