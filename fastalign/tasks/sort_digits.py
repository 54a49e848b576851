"""The "sort a list of digits" task: the built-in demo problem, with an exact quality measure.

Format (one character per token with the built-in :func:`~fastalign.models.tiny.char_tokenizer`)::

    prompt      "39141="     the digits to sort, then "="
    completion  "11349"      the same digits in non-decreasing order

Training rows are ``{"prompt", "completion"}`` mappings, ready for
:func:`fastalign.data.formats.tokenize_sft` (which appends the end-of-sequence token and, with
``completion_only_loss``, takes the loss on the completion only). No spaces or separators: the
shortest text a character-level model can learn the task from. The number of digits is drawn
uniformly from ``[min_digits, max_digits]`` and each digit uniformly from 0-9, so repeats occur.

Checking an answer needs only the prompt: :func:`is_sorted_answer` is the exact-match test and
:func:`sortedness_reward` a graded score in [0, 1] for reward-driven training (PPO), equal to 1
exactly when the answer is correct. :func:`make_preference_pairs` gives (chosen, rejected) rows
for DPO or a reward model, and :func:`evaluate` greedy-decodes a model on held-out rows and
reports both measures.

Everything is deterministic for a seed; different seeds draw different rows (a small digit range
has few distinct prompts, so pass ``exclude=`` to keep an evaluation set disjoint from training).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

SEPARATOR = "="
DIGITS = "0123456789"

# The digit range of the embedded demo.
MIN_DIGITS = 3
MAX_DIGITS = 8


def _rng(kind: str, seed: int) -> random.Random:
    # A string seed keeps the row and pair streams of one seed independent of each other.
    return random.Random(f"fastalign.sort_digits/{kind}/{seed}")


def _draw_digits(rng: random.Random, min_digits: int, max_digits: int) -> str:
    n = rng.randint(min_digits, max_digits)
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _check_range(min_digits: int, max_digits: int) -> None:
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")


def prompt_for(digits: str) -> str:
    """The prompt asking to sort ``digits`` (a string of 0-9)."""
    return digits + SEPARATOR


def digits_of(prompt: str) -> str:
    """The digits a prompt asks to sort: the digit characters before the last ``=``."""
    head = prompt.rsplit(SEPARATOR, 1)[0] if SEPARATOR in prompt else prompt
    return "".join(c for c in head if c in DIGITS)


def answer_for(prompt: str) -> str:
    """The correct completion for ``prompt``: its digits, sorted."""
    return "".join(sorted(digits_of(prompt)))


def _prompts(rng: random.Random, n: int, min_digits: int, max_digits: int, exclude: set[str]) -> list[str]:
    _check_range(min_digits, max_digits)
    space = sum(10**k for k in range(min_digits, max_digits + 1))
    if exclude and len(exclude) >= space:
        raise ValueError(f"exclude covers all {space} prompts of {min_digits}-{max_digits} digits")
    out = []
    while len(out) < n:
        prompt = prompt_for(_draw_digits(rng, min_digits, max_digits))
        if prompt not in exclude:
            out.append(prompt)
    return out


def make_rows(
    n: int,
    seed: int = 0,
    min_digits: int = MIN_DIGITS,
    max_digits: int = MAX_DIGITS,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """``n`` rows ``{"prompt": "39141=", "completion": "11349"}``, deterministic for ``seed``.

    ``exclude``: prompts never to draw (e.g. the training prompts, for a disjoint eval set).
    Prompts may repeat within one call; small digit ranges have few distinct prompts.
    """
    prompts = _prompts(_rng("rows", seed), n, min_digits, max_digits, set(exclude))
    return [{"prompt": p, "completion": answer_for(p)} for p in prompts]


def _clean(completion: str) -> str:
    """A completion without the end-of-sequence marker and surrounding whitespace."""
    text = completion.strip()
    for marker in ("<eos>", "</s>"):
        if marker in text:
            text = text.split(marker, 1)[0]
    return text.strip()


def is_sorted_answer(prompt: str, completion: str) -> bool:
    """Whether ``completion`` is exactly the sorted digits of ``prompt`` (a trailing eos or
    newline is ignored)."""
    return _clean(completion) == answer_for(prompt)


def sortedness_reward(prompt: str, completion: str) -> float:
    """A graded score in [0, 1] of how close ``completion`` is to the sorted digits of ``prompt``.

    The product of two fractions:

    - *content*: the multiset overlap of the answer's characters with the prompt's digits,
      ``sum(min(count_answer[d], count_prompt[d])) / max(len(answer), len(digits))``. It is 1 exactly
      when the answer holds the same digits, as often; a missing, extra or wrong character
      lowers it, and non-digits never match.
    - *order*: the fraction of all character pairs ``(answer[i], answer[j])``, ``i < j``, that
      are digits in non-decreasing order: 1 minus the normalised inversion count (1 for an
      answer of one character). Unlike counting adjacent pairs only, it tells a near miss from
      a shuffle: one swapped neighbour costs a single pair.

    The reward is 1 exactly when :func:`is_sorted_answer` holds, and 0 for an empty answer, one
    sharing no digit with the prompt, or one in strictly decreasing order. Example for prompt
    ``"3914="`` (answer ``"1349"``): ``"1349"`` 1.0, ``"1394"`` 5/6 (right digits, one pair
    swapped), ``"134"`` 3/4 (a digit missing), ``"1359"`` 3/4 (a digit wrong), ``"3914"`` 1/2
    (the prompt echoed), ``"9431"`` 0.
    """
    answer = _clean(completion)
    target = digits_of(prompt)
    if not answer or not target:
        return float(answer == target)
    have, want = Counter(answer), Counter(target)
    content = sum(min(have[d], want[d]) for d in want) / max(len(answer), len(target))
    if len(answer) < 2:
        order = 1.0
    else:
        pairs = [(a, b) for i, a in enumerate(answer) for b in answer[i + 1:]]
        order = sum(a in DIGITS and b in DIGITS and a <= b for a, b in pairs) / len(pairs)
    return content * order


def _wrong_answers(digits: str, rng: random.Random) -> list[str]:
    """Plausible wrong answers for ``digits``, most plausible kinds first, shuffled within."""
    right = "".join(sorted(digits))
    candidates = []
    # One adjacent pair out of order: the near miss.
    swaps = [i for i in range(len(right) - 1) if right[i] != right[i + 1]]
    if swaps:
        i = rng.choice(swaps)
        candidates.append(right[:i] + right[i + 1] + right[i] + right[i + 2:])
    # A digit dropped, duplicated or replaced.
    i = rng.randrange(len(right))
    if len(right) > 1:
        candidates.append(right[:i] + right[i + 1:])
    candidates.append("".join(sorted(right + right[i])))
    replacement = rng.choice([d for d in DIGITS if d != right[i]])
    candidates.append("".join(sorted(right[:i] + replacement + right[i + 1:])))
    # The prompt echoed unsorted.
    if digits != right:
        candidates.append(digits)
    return [c for c in candidates if c and c != right]


def make_preference_pairs(
    n: int,
    seed: int = 0,
    min_digits: int = MIN_DIGITS,
    max_digits: int = MAX_DIGITS,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``: the correct answer against a plausible
    wrong one, deterministic for ``seed``.

    The wrong answer is, at random, one adjacent pair swapped, a digit dropped, duplicated or
    replaced (kept sorted), or the prompt's digits echoed unsorted; it always differs from the
    correct answer, so ``is_sorted_answer`` holds for ``chosen`` and never for ``rejected``.
    """
    rng = _rng("pairs", seed)
    rows = []
    for prompt in _prompts(rng, n, min_digits, max_digits, set(exclude)):
        rejected = rng.choice(_wrong_answers(digits_of(prompt), rng))
        rows.append({"prompt": prompt, "chosen": answer_for(prompt), "rejected": rejected})
    return rows


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of ``prompts`` (the new text only, up to the end-of-sequence token).

    Prompts are tokenized as in training (``add_special_tokens=True``), left-padded with an
    attention mask, and decoded without special tokens. The caller sets eval mode and no-grad
    (``evaluate`` does both).
    """
    import torch

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, add_special_tokens=True, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate(model, tokenizer, rows, max_new_tokens: int | None = None, batch_size: int = 64) -> dict:
    """``{"exact_sorted", "reward_mean"}`` of the model's greedy answers to ``rows``' prompts.

    ``exact_sorted`` is the fraction answered exactly (:func:`is_sorted_answer`), ``reward_mean``
    the mean :func:`sortedness_reward`. Answers are judged against the prompt, so rows need only
    a ``"prompt"``. ``max_new_tokens`` defaults to the longest prompt's digit count plus one (the
    end-of-sequence token). The model runs in eval mode without gradients and is put back in
    training mode afterwards if it was training.
    """
    import torch

    from fastalign.models.modes import eval_mode

    prompts = [row["prompt"] for row in rows]
    if not prompts:
        raise ValueError("evaluate needs at least one row")
    if max_new_tokens is None:
        max_new_tokens = max(len(digits_of(p)) for p in prompts) + 1
    with torch.no_grad(), eval_mode(model):
        answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    exact = [is_sorted_answer(p, a) for p, a in zip(prompts, answers)]
    rewards = [sortedness_reward(p, a) for p, a in zip(prompts, answers)]
    return {"exact_sorted": sum(exact) / len(exact), "reward_mean": sum(rewards) / len(rewards)}
