"""The outer loop every trainer runs: the progress bar, the logging cadence, evaluation, saving
checkpoints, the final save and closing the logs, in one place.

A trainer supplies the step source, ``step(unit) -> [(step, metrics), ...]``: one unit of the
run (an optimizer step over packed batches, a PPO step over a rollout, a DDPO epoch of diffusion
samples) and the records it produced, each at its step number. The loop logs every
``logging_steps``-th record, the records in between reduced by ``window`` (means by default),
evaluates every ``eval_steps`` units and at the end, checkpoints every ``save_steps`` units, then
runs ``finish`` (the final save). Resuming happens before the loop: the trainer restores its
checkpoint (``Checkpointer.resume``) and starts the loop at the unit it reached.

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during the loop stops the run after the unit
under way: every process saves the checkpoint, then ``Interrupted`` is raised. A second signal
stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fastalign.errors import Interrupted

from . import distributed
from .metrics import BAR_KEYS, MetricsLogger

Records = list[tuple[int, dict]]
# Metrics that say where the run is, not what happened over a window: the window logs the last.
POSITION = ("lr", "epoch", "peak_memory_gb")


def mean_window(records: list[dict]) -> dict:
    """Metrics over a logging window: means, except the position in the run (last value); a metric
    some steps lack (KTO's per-label means, in a step without such rows) over the steps that have it."""
    out = {}
    for k in dict.fromkeys(k for r in records for k in r):
        values = [r[k] for r in records if k in r]
        out[k] = values[-1] if k in POSITION else sum(values) / len(values)
    return out


def last_window(records: list[dict]) -> dict:
    """The window's last record."""
    return records[-1]


@dataclass
class Cadence:
    """How often, in units of the run: log (every ``logging_steps``-th record), evaluate, save
    (``save_last``: also when the last unit is a multiple of ``save_steps``)."""

    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_last: bool = True


class StopRequest:
    """While entered (on the main thread), SIGINT and SIGTERM ask the run to stop at the next unit's
    end instead of killing it; the first one restores the previous handlers, so a second stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame) -> None:
        self.signal = int(sig)
        self._restore()
        if distributed.is_main():
            print(f"\nfastalign: {signal.Signals(sig).name}: stopping after this step to save a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self._restore()

    def agreed(self, device) -> int:
        """The signal any process got (0: none); every process calls it after each unit."""
        return distributed.all_reduce_max(self.signal, device)


class Loop:
    """One run of ``total`` units from ``start``; ``logger`` is its ``MetricsLogger`` (the main
    process writes, the others hold a silent one)."""

    def __init__(self, output_dir, total: int, start: int = 0, *, report_to=(), show_bar: bool = True,
                 keep_records_to: int | None = None, bar_keys=BAR_KEYS, bar_desc: str = "train", bar_unit: str = "step",
                 device=None, resume_key: str = "resume_from_checkpoint"):
        """``keep_records_to``: the step up to which ``metrics.jsonl``'s records are kept (a resumed
        run's checkpoint step; default ``start``; 0 starts the file anew). ``device``: where the
        processes agree on a stop request (the engine's device); ``resume_key``: the config key
        that resumes the run, as an interrupted run names it."""
        self.total, self.start, self.device, self.resume_key = total, start, device, resume_key
        keep = start if keep_records_to is None else keep_records_to
        self.logger = MetricsLogger(output_dir, total, keep, report_to, enabled=distributed.is_main(),
                                    show_bar=show_bar, bar_keys=bar_keys, bar_initial=start, bar_desc=bar_desc,
                                    bar_unit=bar_unit)

    def run(self, step: Callable[[int], Records], every: Cadence, *, window: Callable[[list[dict]], dict] = mean_window,
            evaluate: Callable[[], dict] | None = None, save: Callable[[], object] | None = None,
            finish: Callable[[], None] | None = None, shown: Callable[[], dict] | None = None) -> dict:
        """Run the units; returns the final evaluation (``{}`` without ``evaluate``), logged at
        step ``total``. ``shown()``, if given, is what the bar shows after each unit (default: the
        last record logged). The logger is closed however the run ends."""
        final, stop = {}, StopRequest()
        try:
            # The final evaluation and save run under the same guard: a signal then lets them end
            # (the run is complete), a second one stops at once.
            with stop:
                self._units(step, every, window, evaluate, save, shown, stop)
                if evaluate is not None:
                    final = evaluate()
                    if final:
                        self.logger.log(self.total, final)
                if finish is not None:
                    finish()
        finally:
            self.logger.close()
        return final

    def _units(self, step, every: Cadence, window, evaluate, save, shown, stop: StopRequest) -> None:
        pending = []
        for unit in range(self.start, self.total):
            records = step(unit)
            done, saved = unit + 1, None
            for k, (at, metrics) in enumerate(records):
                pending.append(metrics)
                if at % every.logging_steps == 0 or (done == self.total and k == len(records) - 1):
                    self.logger.log(at, pending[0] if len(pending) == 1 else window(pending))
                    pending = []
            if evaluate is not None and every.eval_steps and done % every.eval_steps == 0 and done < self.total:
                self.logger.log(records[-1][0], evaluate())
            if save is not None and every.save_steps and done % every.save_steps == 0 and (every.save_last or done < self.total):
                saved = save()
                self.logger.write(f"saved {saved}")
            if shown is not None:
                self.logger.show(shown())
            self.logger.advance()
            sig = stop.agreed(self.device) if done < self.total else 0  # at the end: the run finishes
            if sig:  # the records so far are logged, then the checkpoint the run resumes from
                if pending:
                    self.logger.log(records[-1][0], window(pending))
                if saved is None and save is not None:
                    saved = save()
                    self.logger.write(f"saved {saved}")
                raise Interrupted(sig, done, self.total, saved, self.resume_key)
