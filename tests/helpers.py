"""Helpers shared by the tests (on sys.path through pytest's `pythonpath` setting)."""

import contextlib

import torch

# Where the Triton path runs: natively on a GPU, else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Machine epsilon of each input dtype (distance from 1.0 to the next representable number).
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close(actual, expected, rtol, what=""):
    """Within ``rtol`` relative, element-wise or against the tensor's largest entry.

    Entries near zero come from cancellation (a softmax gradient is p - 1[y]), so an element-wise
    relative bound alone would demand more than fp32 holds there; they are held to ``rtol`` times
    the tensor's scale instead. A tensor that should be all zeros must be (almost) exactly zero.
    """
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}"
    )


def tiny_t5(seed: int = 0, dropout: float = 0.0, **config):
    """A tiny T5 built from a config (random weights) that fits the built-in character tokenizer
    (``fastalign.models.tiny.char_tokenizer``: pad 0, eos 2, 100 ids): the decoder starts from pad."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    options = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=2, dropout_rate=dropout)
    return T5ForConditionalGeneration(T5Config(**{**options, **config}))


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block (a shared 2-core machine runs small models far faster so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
