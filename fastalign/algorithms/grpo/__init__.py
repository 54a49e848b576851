"""GRPO and RLOO: group-baseline online RL for language models, with TRL 1.16's names, on the
packed core.

    GRPO   Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
           Models", 2024, arXiv:2402.03300 (and its variants: DAPO's clip-higher and token-level
           loss, arXiv:2503.14476; Dr. GRPO's unscaled advantages, arXiv:2503.20783)
    RLOO   Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
           from Human Feedback in LLMs", 2024, arXiv:2402.14740

Both sample ``num_generations`` completions per prompt and take each completion's baseline from its
own group, so neither needs a value model. One generation (``rollout``) draws the prompts, samples
the completions through a ``Generator`` (the model's own ``generate`` by default; under ZeRO-3 the
policy gathered once per generation), scores them with reward functions or reward models, and
records the log-probs its objective needs, from packed prompt+completion rows with the lm_head
fused at completion tokens. Then ``steps_per_generation`` micro-steps, ``num_iterations`` times
over, train on it (``objective``): GRPO's clipped token-level loss with the k3 KL to the
reference, or RLOO's clipped loss on summed completion log-probs with the KL in the reward. The
trainers run the engine's one outer loop (``Loop``), checkpoint with its ``Checkpointer`` (the
generation in progress included: a resumed run ends where an uninterrupted one does) and launch
from ``fastalign train grpo|rloo``.

Modules, one job each: ``config`` (options), ``prompts`` (which prompts each generation and process
takes), ``generation`` (the ``Generator`` interface), ``rewards``, ``rollout`` (one generation),
``objective`` (the losses over packed rows and their metrics), ``trainer`` (what both share),
``grpo`` and ``rloo`` (each algorithm's advantages and loss), ``launch`` (run keys).
"""

from .config import GroupConfig, GRPOConfig, RLOOConfig
from .generation import Generator, ModelGenerator
from .grpo import GRPOTrainer
from .rewards import RewardFunctions
from .rloo import RLOOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "Generator", "GroupConfig", "ModelGenerator", "RLOOConfig", "RLOOTrainer",
           "RewardFunctions"]
