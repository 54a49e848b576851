"""PPO for language models (Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
2019), with TRL 0.7.10's options, names and step, on the packed core.

One PPO step (``PPOTrainer.step``) takes ``batch_size`` (query, response, score) samples:

1. scores: optionally scaled by the running standard deviation of all scores so far
   (``use_score_scaling``; also centred with ``use_score_norm``), then clipped (``score_clip``);
2. one padding-free forward each of the policy (log-probs and values) and of the reference
   (log-probs) over query+response, the heads run only at response positions: the whole batch
   is kept flat over its response tokens, sample after sample;
3. rewards per token: ``-kl_coef * kl`` (``kl_penalty``: kl, abs, mse, or the exact ``full``
   KL over the vocabulary), plus the score at each response's last token (fused kernel);
4. GAE advantages and returns (fused scan over ``[batch, longest response]``, nothing longer),
   advantages whitened, rewards too with ``whiten_rewards``;
5. ``ppo_epochs`` passes over the batch in shuffled mini-batches of ``mini_batch_size`` samples
   (each one packed row), the clipped PPO loss (fused kernel), an optimizer step every
   ``gradient_accumulation_steps`` mini-batches; with ``early_stopping`` a pass whose last
   mini-batch has a policy KL over 1.5 x ``target_kl`` ends the step;
6. the KL coefficient adapts to ``target`` (``adap_kl_ctrl``), the stats come back under TRL's
   names (``objective/kl``, ``ppo/policy/approxkl``, ``env/reward_mean``, ...).

Every forward runs in eval mode (no dropout), the training forwards included, as in TRL 0.7.10.
Two things differ from it on purpose. With ``whiten_rewards`` TRL's whitened rewards stay non-zero
at padding and masked positions, so its advantages depend on how much padding a batch has; here
they are zeroed there. And ``max_grad_norm`` clips every optimizer step (TRL 0.7.10 clips only
the first one of a run: its list of parameters is a one-shot iterator).

With several processes each runs ``step`` on its own ``batch_size`` samples (as TRL does); the
gradient is the mean over processes, the stats and the score statistics are global.
"""

from fastalign.tasks.registry import TEXT_REWARDS as BUILTIN_REWARDS
from fastalign.tasks.registry import named_function
from fastalign.tasks.registry import text_reward as reward_function

from .config import KL_PENALTIES, LengthSampler, PPOConfig
from .reference import create_reference_model
from .rollout import Rollout
from .trainer import PPOTrainer

__all__ = ["KL_PENALTIES", "LengthSampler", "PPOConfig", "PPOTrainer", "Rollout", "create_reference_model",
           "BUILTIN_REWARDS", "named_function", "reward_function"]
