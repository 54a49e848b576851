"""The errors fastalign raises for a user's mistakes, one type per kind of mistake.

Each message is one line naming what is wrong and where (a file, a row and a column, a config key)
and what was expected. The ``fastalign`` command prints it as ``fastalign: error: <message>`` and
exits with status 2 (``UsageError`` and its kinds; also ``FileNotFoundError``); a failure while
the run runs exits with status 1. ``--debug`` (or ``FASTALIGN_DEBUG=1``) prints the traceback too.

The data and config errors are also ``ValueError``s and the checkpoint error a ``RuntimeError``, so
code that caught those built-in types keeps working.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in what the user gave: data, configuration, a checkpoint or a path."""


class DataError(UsageError, ValueError):
    """A data set row or file that cannot be trained on: the message names the file when there is
    one, the row (its index in the data set as given) and the column."""


class ConfigError(UsageError, ValueError):
    """A configuration value of the wrong type or out of range, or keys that do not fit together:
    the message names the key."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint or output folder that does not belong to this run, or cannot be read."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) at a step boundary,
    after saving a checkpoint to resume from: ``signal`` (its number), ``step``, ``checkpoint`` (the
    folder saved, or None when the trainer keeps no checkpoints)."""

    def __init__(self, signal: int, step: int, total: int, checkpoint=None, resume_key: str = "resume_from_checkpoint"):
        self.signal, self.step, self.total, self.checkpoint = signal, step, total, checkpoint
        saved = (f": saved {checkpoint}; resume with {resume_key}=true" if checkpoint is not None
                 else "; nothing was saved")
        super().__init__(f"interrupted at step {step} of {total}{saved}")
