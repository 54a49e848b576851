"""``trl.PPOTrainer`` (0.7.10) on fastalign's ``PPOTrainer``: the same ``generate`` and ``step``
(packed and fused), plus what TRL scripts call besides: ``log_stats``, ``accelerator``,
``current_device``, ``dataloader``/``prepare_dataloader``, and the padded building blocks TRL
exposes (``batched_forward_pass``, ``compute_rewards``, ``compute_advantages``, ``loss``,
``train_minibatch``, ``record_step_stats``, ``gather_stats``) for code that drives them by hand.

``log_stats`` writes the step's scalar stats (TRL's names) to ``OUTPUT_DIR/metrics.jsonl`` (and
TensorBoard with ``log_with="tensorboard"``), keeps them in ``log_history``, and appends the batch's
``columns_to_log`` with each reward to ``OUTPUT_DIR/game_log.jsonl`` (TRL's wandb table). Step stats
add TRL's ``objective/logprobs`` and ``objective/ref_logprobs``: ``[batch, longest response]``
arrays of the response tokens (TRL's also cover the query positions, masked).

An encoder-decoder policy (``AutoModelForSeq2SeqLMWithValueHead``; ``is_encoder_decoder`` is then
true) runs padded: queries go to the encoder, ``generate`` returns the decoder's tokens after its
start token (TRL keeps the start token; ``step`` takes them as ``generate`` returns them), and
``batched_forward_pass`` scores every response token (TRL 0.7.10's mask skips the first).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

from fastalign.algorithms.ppo import PPOTrainer as NativePPOTrainer
from fastalign.algorithms.ppo.prompts import dict_of_lists, prompt_loader
from fastalign.engine import distributed
from fastalign.engine.metrics import MetricsLogger
from fastalign.functional import compute_advantages, compute_rewards, entropy_from_logits, masked_mean, ppo_loss
from fastalign.models import CausalLMWithValueHead
from fastalign.models.modes import train_mode

from ..core import flatten_dict, logprobs_from_logits, stats_to_np
from .accelerator import AcceleratorView
from .base import push_folder, write_model_card
from .loading import resolve
from .ppo_config import PPOConfig

GAME_ROWS = 16  # rows of each batch kept in game_log.jsonl


class PPOTrainer(NativePPOTrainer):
    def __init__(self, config: PPOConfig | None = None, model=None, ref_model=None, tokenizer=None, dataset=None,
                 optimizer=None, data_collator=None, num_shared_layers=None, lr_scheduler=None, *, peft_config=None,
                 reward_model=None, train_dataset=None):
        config = config if config is not None else PPOConfig()
        dataset = train_dataset if dataset is None else dataset  # TRL's PPO docs call it train_dataset
        lm = model.pretrained_model if isinstance(model, CausalLMWithValueHead) else model
        base = getattr(lm, "get_base_model", lambda: lm)()
        _, tokenizer = resolve(base if not isinstance(model, str) else model, tokenizer)
        if isinstance(ref_model, CausalLMWithValueHead):
            ref_model = ref_model.pretrained_model  # the reference's value head is never used
        super().__init__(config, model, ref_model, tokenizer, dataset, optimizer, data_collator, num_shared_layers,
                         lr_scheduler, peft_config=peft_config, reward_model=reward_model)
        self.accelerator = AcceleratorView(self.engine.device, self._log)
        self.is_distributed = self.world_size > 1
        self.is_encoder_decoder = self.forwards.encoder_decoder
        self.log_history: list[dict] = []
        self._stats_logger = None

    @property
    def current_device(self) -> torch.device:
        return self.engine.device

    # ---- the step, with TRL's extra stats --------------------------------------------------------
    def step(self, queries, responses, scores, response_masks=None) -> dict:
        stats = super().step(queries, responses, scores, response_masks)
        r = self.last_rollout
        stats["objective/logprobs"] = r.layout.padded(r.logprobs)[0].cpu().numpy()
        stats["objective/ref_logprobs"] = r.layout.padded(r.ref_logprobs)[0].cpu().numpy()
        return stats

    # ---- logging -----------------------------------------------------------------------------------
    def _log(self, values: dict, step: int | None = None) -> None:
        """Scalars of ``values`` to metrics.jsonl (and TensorBoard) at ``step`` (default: the PPO step)."""
        step = self.global_step if step is None else step
        scalars = {k: float(v) for k, v in stats_to_np(values).items()
                   if isinstance(v, (int, float)) or (isinstance(v, np.ndarray) and v.size == 1)}
        self.log_history.append({**scalars, "step": step})
        if self._stats_logger is None:
            self._stats_logger = MetricsLogger(self.config.output_dir, 0, 0, self.config.report_to,
                                               enabled=distributed.is_main(), show_bar=False)
        self._stats_logger.log(step, scalars)
        if self._stats_logger.writer is not None:
            self._stats_logger.writer.flush()

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> None:
        """TRL's ``log_stats``: the step's stats with the rewards' mean, std and distribution over
        every process, and a game log of ``columns_to_log`` with each reward."""
        rewards = torch.as_tensor(torch.stack([torch.as_tensor(r, dtype=torch.float32).reshape(()) for r in rewards])
                                  if isinstance(rewards, (list, tuple)) else rewards, dtype=torch.float32)
        rewards = self.accelerator.gather(rewards.to(self.current_device)).flatten().cpu()
        logs = dict(stats)
        logs["env/reward_mean"] = float(rewards.mean())
        logs["env/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
        logs["env/reward_dist"] = rewards.numpy()
        self._log(logs)
        missing = [c for c in columns_to_log if c not in batch]
        if missing:
            raise ValueError(f"Columns to log {list(columns_to_log)} are not present in the batch {list(batch)}.")
        if distributed.is_main() and columns_to_log:
            with open(os.path.join(self.config.output_dir, "game_log.jsonl"), "a") as f:
                for i in range(min(GAME_ROWS, len(rewards))):
                    row = {c: _plain(batch[c][i]) for c in columns_to_log}
                    f.write(json.dumps({"step": self.global_step, **row, "reward": float(rewards[i])}) + "\n")

    # ---- data ----------------------------------------------------------------------------------------
    def prepare_dataloader(self, dataset, data_collator=None):
        """``batch_size`` rows at a time, shuffled from the seed, the last partial batch dropped."""
        return prompt_loader(dataset, self.config.batch_size, self.config.seed, data_collator or dict_of_lists)

    # ---- TRL's padded building blocks ----------------------------------------------------------------
    def batched_forward_pass(self, model, queries, responses, model_inputs=None, return_logits: bool = False,
                             response_masks=None):
        """``(logprobs, logits or None, values, masks)``, each ``[B, L - 1]`` over right-padded
        query+response rows (position t scores token t + 1); masks are 1 at response tokens. An
        encoder-decoder model's rows are its decoder's, the start token then the response (every
        response token is scored; TRL 0.7.10's mask skips the first)."""
        device, pad = self.current_device, self.tokenizer.pad_token_id
        if self.is_encoder_decoder:  # the decoder's rows: its start token, then the response
            start = getattr(self.model.config, "decoder_start_token_id", None)
            rows = [torch.cat([torch.tensor([pad if start is None else start]), r.cpu()]).to(device) for r in responses]
            prompts = [1] * len(rows)
        else:
            rows = [torch.cat([q, r]).to(device) for q, r in zip(queries, responses)]
            prompts = [len(q) for q in queries]
        ids, attention = _right_padded(rows, pad, device)
        masks = torch.zeros(len(rows), ids.shape[1] - 1, device=device)
        for j, (p, r) in enumerate(zip(prompts, responses)):
            masks[j, p - 1:p - 1 + len(r)] = 1 if response_masks is None else response_masks[j].float()
        if self.is_encoder_decoder:
            encoder_ids, encoder_mask = _right_padded([q.to(device) for q in queries], pad, device)
            out = model(input_ids=encoder_ids, attention_mask=encoder_mask, decoder_input_ids=ids,
                        decoder_attention_mask=attention)
        else:
            out = model(input_ids=ids, attention_mask=attention)
        logits = out[0] if isinstance(out, tuple) else out.logits
        values = out[2][:, :-1] if isinstance(out, tuple) else torch.zeros_like(masks)
        logprobs = logprobs_from_logits(logits[:, :-1, :], ids[:, 1:])
        return logprobs, logits[:, :-1, :] if return_logits else None, values, masks

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        """``(rewards, non_score_rewards, kls)``: the KL penalty per token, the score at each row's
        last response token (this trainer's KL coefficient and ``kl_penalty``)."""
        return compute_rewards(torch.as_tensor(scores).to(logprobs.device).float(), logprobs, ref_logprobs, masks,
                               self.kl_ctl.value, self.config.kl_penalty)

    def compute_advantages(self, values, rewards, mask):
        """``(values, advantages, returns)``: GAE with this trainer's ``gamma`` and ``lam``."""
        c = self.config
        return compute_advantages(values, rewards, mask, c.gamma, c.lam, c.whiten_rewards)

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        """``(pg_loss, vf_coef x vf_loss, stats)``: TRL's clipped PPO loss and its stats."""
        c = self.config
        entropy = entropy_from_logits(logits).detach() if logits is not None else None
        return ppo_loss(old_logprobs=old_logprobs, values=values, vpreds=vpreds, logprobs=logprobs, mask=mask,
                        advantages=advantages, returns=returns, cliprange=c.cliprange,
                        cliprange_value=c.cliprange_value, vf_coef=c.vf_coef, ratio_threshold=c.ratio_threshold,
                        entropy=entropy)

    def train_minibatch(self, old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns) -> dict:
        """One optimizer step on a mini-batch's loss (``logprobs``/``vpreds`` computed with grad)."""
        with train_mode(self.model):
            pg, vf, stats = self.loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns)
            self.engine.accumulate(pg + vf, last=True)
            self.engine.step()
        return stats

    def record_step_stats(self, kl_coef: float, **data) -> dict:
        """TRL's step stats from a step's padded tensors (``scores``, ``logprobs``, ``ref_logprobs``,
        ``non_score_reward``, ``train_stats``, ``masks``, ``queries``, ``responses``, ``kls``)."""
        mask = data.pop("masks")
        kls = data.get("kls", data["logprobs"] - data["ref_logprobs"])
        kl_per_sample = (kls * mask).sum(1)
        entropy = (-data["logprobs"] * mask).sum(1).mean()
        stats = {"objective/kl": kl_per_sample.mean(), "objective/kl_dist": kl_per_sample,
                 "objective/logprobs": data["logprobs"], "objective/ref_logprobs": data["ref_logprobs"],
                 "objective/kl_coef": kl_coef, "objective/entropy": entropy,
                 "ppo/mean_non_score_reward": masked_mean(data["non_score_reward"], mask),
                 "ppo/mean_scores": torch.as_tensor(data["scores"]).float().mean(),
                 "ppo/std_scores": torch.as_tensor(data["scores"]).float().std()}
        q_len = torch.tensor([len(q) for q in data["queries"]], dtype=torch.float)
        a_len = torch.tensor([len(r) for r in data["responses"]], dtype=torch.float)
        stats.update({"tokens/queries_len_mean": q_len.mean(), "tokens/queries_len_std": q_len.std(),
                      "tokens/queries_dist": q_len, "tokens/responses_len_mean": a_len.mean(),
                      "tokens/responses_len_std": a_len.std(), "tokens/responses_dist": a_len})
        for key, value in flatten_dict(data.get("train_stats", {})).items():
            stats[f"ppo/{key}"] = torch.mean(torch.as_tensor(value).float(), axis=0) if key not in (
                "policy/advantages", "policy/ratio") else value
        if "ppo/val/error" in stats and "ppo/returns/var" in stats:
            stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        return stats

    def gather_stats(self, stats: dict) -> dict:
        """``stats``' tensors averaged over the processes."""
        if self.world_size == 1:
            return stats
        out = {}
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.current_device).float().clone()
                torch.distributed.all_reduce(value)
                value /= self.world_size
            out[key] = value
        return out

    # ---- saving and the Hub --------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str) -> None:
        """The model (value head beside it), the tokenizer and a model card in ``save_directory``."""
        self.save_model(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        self.create_model_card(save_directory)

    _save_pretrained = save_pretrained

    def create_model_card(self, path: str, model_name: str | None = "TRL Model") -> None:
        base = getattr(self.model.config, "_name_or_path", None)
        write_model_card(path, model_name, "PPOTrainer", base, self.config.query_dataset, ("ppo",))

    def push_to_hub(self, repo_id: str, *args, **kwargs) -> str:
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, kwargs.get("token"), kwargs.get("private"))


def _right_padded(rows: list, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of 1-D token rows, right-padded with ``pad``."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for j, row in enumerate(rows):
        ids[j, :len(row)], attention[j, :len(row)] = row, 1
    return ids, attention


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.dim() else value.item()
    return value
