"""Supervised fine-tuning on the packed core.

Rows are tokenized once into a token store (``fastalign.data.SFTEncoder``: plain text,
prompt/completion, chat ``messages`` or pre-tokenized ids; in ``dataset_num_proc`` processes, cached
beside the data set), packed into padding-free micro-batches, and the loss is the
mean negative log-likelihood over the loss tokens of each optimizer step, computed through the
fused head at loss positions only. With ``completion_only_loss`` (the default) prompt tokens and
non-assistant turns carry no loss.

An encoder-decoder model (T5, BART; ``fastalign.models.seq2seq``) runs padded, one row per
sequence, since packing cannot isolate its sequences: the prompt (the row's leading no-loss tokens)
goes to the encoder and the rest is the decoder's target; a plain-text row goes whole to both, as
transformers and TRL 0.7.10 train a seq2seq model on text. ``completion_only_loss`` is then always
on (the encoder's input is never a target) and NEFTune is not supported.

NEFTune (Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning", 2023): while
training, uniform noise in ``[-1, 1]`` scaled by ``alpha / sqrt(L * d)`` is added to the input
embeddings, L being the length of the token's own sequence and d the embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.data import PackedBatch, SFTEncoder, load_rows, plan_padded
from fastalign.data.rows import TRUNCATION_MODES
from fastalign.data.store import SFT_HALVES, TokenStore, token_data
from fastalign.engine import Trainer, TrainingConfig, distributed
from fastalign.errors import ConfigError
from fastalign.models import (
    Seq2SeqBatch,
    is_encoder_decoder,
    load_model,
    packed_logprobs,
    prepare_model,
    seq2seq_collator,
    seq2seq_logprobs,
)
from fastalign.options import option

from .launch import PACKED_KEYS, launch_packed


@dataclass
class SFTConfig(TrainingConfig):
    learning_rate: float = 2e-5
    dataset_text_field: str | None = option(None, "the column of plain text (null: text, prompt/completion, "
                                            "messages or input_ids, whichever the rows hold)")
    max_length: int | None = option(1024, "tokens kept of each sequence (null: all)", ge=1)
    truncation_mode: str = option("keep_start", "which tokens a too-long sequence keeps", choices=TRUNCATION_MODES)
    packing: bool = option(True, "pack sequences into micro-batches (false: one sequence per micro-batch, still "
                           "no padding)")
    completion_only_loss: bool = option(True, "no loss on prompt tokens and non-assistant turns")
    neftune_noise_alpha: float | None = option(None, "NEFTune: noise of scale alpha/sqrt(L*d) on the input "
                                               "embeddings while training (null: off)", ge=0)


class SFTTrainer(Trainer):
    model_loader = staticmethod(load_model)  # how a model name is loaded
    peft_task_type = "CAUSAL_LM"
    run_keys = PACKED_KEYS  # what a run names besides SFTConfig (fastalign.algorithms.launch)
    launch = classmethod(launch_packed)

    def __init__(self, model, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 peft_config=None, formatting_func=None, optimizers=(None, None)):
        args = args or SFTConfig()
        if train_dataset is None:
            raise ValueError("SFTTrainer needs a train_dataset")
        model, tokenizer, self.attention = prepare_model(model, tokenizer, peft_config, self.model_loader)
        self.seq2seq = is_encoder_decoder(model)
        if self.seq2seq:  # padded: the prompt to the encoder, the completion the decoder's target
            if args.neftune_noise_alpha:
                raise ConfigError("neftune_noise_alpha is not supported for encoder-decoder models")
            self.planner, self.collate = plan_padded, seq2seq_collator(model)
        self.reports = {}
        train = self._store("train", train_dataset, tokenizer, args, formatting_func)
        evals = self._store("eval", eval_dataset, tokenizer, args, formatting_func) if eval_dataset is not None else None
        super().__init__(model, args, train, evals, tokenizer, optimizers)
        self._neftune_lengths = None
        if args.neftune_noise_alpha:
            model.get_input_embeddings().register_forward_hook(self._neftune_hook)

    def _store(self, name, dataset, tokenizer, args, formatting_func):
        # An encoder-decoder model never scores its encoder's input: the prompt stays apart.
        completion_only = args.completion_only_loss or self.seq2seq
        encode = SFTEncoder(tokenizer, args.dataset_text_field, formatting_func, args.max_length,
                            args.truncation_mode, completion_only)
        store = token_data(load_rows(dataset, streaming=args.streaming and name == "train"), encode, SFT_HALVES,
                           num_proc=args.dataset_num_proc, desc=f"tokenizing the {name} set", progress=not args.disable_tqdm,
                           main_first=distributed.local_main_first)
        if isinstance(store, TokenStore):  # a stream is tokenized as it is read
            self.reports[name] = store.report
        return store

    def plan(self, store: TokenStore) -> list:
        if self.args.packing:
            return super().plan(store)
        return [[i] for i in store.kept.tolist()]  # one sequence per micro-batch

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        if self.args.neftune_noise_alpha and self.model.training:
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(batch.seq_index.device)
            self._neftune_lengths = lengths[batch.seq_index]
        if isinstance(batch, Seq2SeqBatch):
            return -seq2seq_logprobs(self.model, batch).sum(), {}
        logp = packed_logprobs(self.model, batch)
        self._neftune_lengths = None
        return -logp.sum(), {}

    def _neftune_hook(self, module, inputs, output):
        if self._neftune_lengths is None:
            return output
        scale = self.args.neftune_noise_alpha / torch.sqrt(self._neftune_lengths.to(output.dtype) * output.shape[-1])
        noise = torch.empty_like(output).uniform_(-1, 1)
        return output + noise * scale.view(1, -1, 1)
