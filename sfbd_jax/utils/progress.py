"""One progress line for a whole run: which phase, how far, how fast, and when it ends.

A run declares its plan up front: the phases it will go through, each with the images it
processes (training images, noisy images denoised, images sampled for metrics) and what one
image costs in network evaluations. Every ``every_secs`` the current phase reports a line
(one line; wrapped here)::

    [4m12s] run 31% ETA 9m05s | round 1/2 backward: 2,048/4,950 images (41%),
            52.3 images/s, phase ETA 55s

and the same figures go to TensorBoard (``progress/*`` in ``WORKDIR/progress``, a run of its
own, against the run's cumulative image count; not to the log's metric lines). Rates are
measured per phase from its second report on, so the first dispatch (which compiles) does not
drag them down; the run ETA uses the last measured rate of each kind of work, or, for a kind
not measured yet, the measured one scaled by the network evaluations an image costs (marked
``≈``). Phases before the one that begins are counted as done, so a resumed run reports the
right fraction. clu's ``ReportProgress`` knows one phase at a time; this class knows the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
from absl import logging

# Network evaluations (forward-pass equivalents) one training image costs: forward + backward.
TRAIN_COST = 3.0


@dataclasses.dataclass(frozen=True)
class Phase:
    """``name``: its key (the training tag, e.g. 'pretrain', 'round1', 'round1/backward');
    ``label``: how the line shows it; ``kind``: 'train' | 'denoise' | 'sample' (rates are kept
    per kind); ``total``: images the phase processes; ``cost``: network evaluations per image."""

    name: str
    label: str
    kind: str
    total: int
    cost: float = TRAIN_COST


def format_duration(seconds: float) -> str:
    """'45s', '12m05s', '3h07m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(rate: float) -> str:
    """Three significant figures, never '0.0': 123, 45.6, 0.383."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.3g}"


class RunProgress:
    """Progress of a run through ``phases`` (see the module docstring)."""

    def __init__(self, phases: Sequence[Phase], *, writer=None, every_secs: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None):
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique: {names}")
        self.phases = list(phases)
        self.writer, self.every_secs, self.clock = writer, every_secs, clock
        self.log = log or (lambda text: logging.info("%s", text))
        self.start_time = clock()
        self.rates: dict[str, float] = {}  # images/s of the last measured phase of each kind
        self._costs: dict[str, float] = {}  # network evaluations per image of those phases
        self._index: int | None = None
        self._done = 0
        self._mark: tuple[float, int] | None = None  # (time, done) where rate measuring starts
        self._phase_start = self.start_time
        self._last_report = self.start_time
        self.last_line = ""

    # ----- the plan -----------------------------------------------------------------------
    def _find(self, name: str) -> int:
        for i, p in enumerate(self.phases):
            if p.name == name:
                return i
        raise KeyError(f"progress: no phase {name!r} in the run's plan "
                       f"({', '.join(p.name for p in self.phases)})")

    @property
    def phase(self) -> Phase | None:
        return None if self._index is None else self.phases[self._index]

    def begin(self, name: str, done: int = 0, *, timed_from_start: bool = False) -> None:
        """Start phase ``name`` with ``done`` images already processed (a resumed phase);
        every phase before it in the plan counts as done. The rate is measured from the first
        update on (so a first dispatch that compiles is left out), or from now with
        ``timed_from_start`` (a phase reported only when it ends)."""
        self._index, self._done = self._find(name), int(done)
        self._phase_start = self.clock()
        self._mark = (self._phase_start, self._done) if timed_from_start else None
        # The first line comes every_secs into the phase: a rate over a few asynchronously
        # dispatched steps would read far too high.
        self._last_report = self._phase_start

    def update(self, done: int, *, force: bool = False) -> None:
        """``done`` images of the current phase are processed; report when due (or ``force``).
        The first update of a phase only starts the rate clock."""
        now = self.clock()
        self._done = int(done)
        if self._mark is None:
            self._mark = (now, self._done)
            return
        t0, d0 = self._mark
        if now > t0 and self._done > d0:
            self.rates[self.phase.kind] = (self._done - d0) / (now - t0)
            self._costs[self.phase.kind] = self.phase.cost
        if force or now - self._last_report >= self.every_secs:
            self._last_report = now
            self.report()

    def end(self) -> None:
        """The current phase is complete: a last line with its wall time."""
        phase = self.phase
        self.update(phase.total, force=False)
        self.note(f"{phase.label}: done, {phase.total:,} images in "
                  f"{format_duration(self.clock() - self._phase_start)}")

    def note(self, message: str) -> None:
        """A status line with the run's elapsed time (e.g. 'compiling the train step')."""
        self.log(f"[{format_duration(self.clock() - self.start_time)}] {message}")

    # ----- estimates ----------------------------------------------------------------------
    def _rate(self, phase: Phase) -> tuple[float | None, bool]:
        """(images/s for ``phase``'s kind, whether it is estimated from another kind's rate
        scaled by the network evaluations per image)."""
        if phase.kind in self.rates:
            return self.rates[phase.kind], False
        for kind, rate in self.rates.items():
            return rate * self._costs[kind] / phase.cost, True
        return None, False

    def fraction(self) -> float:
        """The run's done fraction, weighted by network evaluations."""
        total = sum(p.total * p.cost for p in self.phases)
        if self._index is None or total == 0:
            return 0.0
        done = sum(p.total * p.cost for p in self.phases[: self._index])
        done += min(self._done, self.phase.total) * self.phase.cost
        return done / total

    def seconds_left(self) -> tuple[float | None, float | None, bool]:
        """(phase ETA, run ETA, run ETA uses an estimated rate) in seconds; None when no rate
        is known yet."""
        phase = self.phase
        rate, _ = self._rate(phase)
        if rate is None:
            return None, None, False
        phase_left = max(0, phase.total - self._done) / rate
        run_left, estimated = phase_left, False
        for p in self.phases[self._index + 1:]:
            r, est = self._rate(p)
            if r is None:
                return phase_left, None, False
            run_left += p.total / r
            estimated |= est
        return phase_left, run_left, estimated

    def images_done(self) -> int:
        """Images processed by the run so far (every phase), the TensorBoard step."""
        return sum(p.total for p in self.phases[: self._index]) + self._done

    def report(self) -> str:
        """Log (and write to TensorBoard) the progress line; returns it."""
        phase = self.phase
        phase_left, run_left, estimated = self.seconds_left()
        rate = self.rates.get(phase.kind) if self._mark is not None else None
        fraction = self.fraction()
        run_eta = ("" if run_left is None
                   else f" ETA {'≈' if estimated else ''}{format_duration(run_left)}")
        pct = 100.0 * min(self._done, phase.total) / max(phase.total, 1)
        line = (f"[{format_duration(self.clock() - self.start_time)}] run "
                f"{100 * fraction:.0f}%{run_eta} | {phase.label}: {self._done:,}/"
                f"{phase.total:,} images ({pct:.0f}%)")
        line += (f", {format_rate(rate)} images/s" if rate else ", measuring speed")
        if phase_left is not None:
            line += f", phase ETA {format_duration(phase_left)}"
        self.last_line = line
        self.log(line)
        if self.writer is not None:
            scalars = {"progress/run_percent": 100.0 * fraction,
                       "progress/phase_percent": pct}
            if rate:
                scalars["progress/images_per_sec"] = rate
            if phase_left is not None:
                scalars["progress/phase_eta_minutes"] = phase_left / 60
            if run_left is not None:
                scalars["progress/run_eta_minutes"] = run_left / 60
            self.writer.write_scalars(self.images_done(), scalars)
            self.writer.flush()
        return line

    def close(self) -> None:
        """Close the TensorBoard writer (if any)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_writer(workdir: str):
    """A TensorBoard-only writer for the progress scalars in ``workdir/progress`` (process 0;
    None on the others)."""
    if jax.process_index() != 0:
        return None
    from clu import metric_writers

    return metric_writers.SummaryWriter(os.path.join(workdir, "progress"))


def single_phase(name: str, total: int, *, writer=None, label: str | None = None,
                 every_secs: float = 30.0) -> RunProgress:
    """A plan of one training phase (a plain EDM or Ambient run, or a caller without a plan);
    ``writer``: e.g. ``tensorboard_writer(workdir)``."""
    return RunProgress([Phase(name, label or name, "train", total)], writer=writer,
                       every_secs=every_secs)
