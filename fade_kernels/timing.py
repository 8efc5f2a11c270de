"""Wall time per pipeline stage: StageTimer and the `stage` hook the solvers call.

The solvers stay pure functions without timing arguments: where a stage begins they enter
`stage(name)`, which times into the StageTimer made current by `timing(timer)` and does nothing
when there is none. The current timer is a context variable, so two runs in two threads (or
two asyncio tasks) each time into their own StageTimer.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time

_current: contextvars.ContextVar["StageTimer | None"] = contextvars.ContextVar("fade_stage_timer", default=None)


class StageTimer:
    """Exclusive wall seconds per pipeline stage, accumulated over a run (report.stage_seconds).

    Stages: capture (block-0 inputs), forward (full-precision twin, next inputs, final norm),
    statistics (Gram accumulation passes), factorisation (GPTQ's inverse-Hessian factor), sweep
    (GPTQ column sweep), solve (everything else in the solvers: QEP correction, FADE's alpha, AWQ's
    search, RTN), diagnostics (report errors), packing (QuantLinear.from_codes), checkpoint (resume
    state writes), offload (activation cache writes to disk). A stage timed inside another is
    subtracted from the outer one, so the values add up to the timed total. Each thread keeps its
    own stack of open stages; the totals are shared under a lock.
    """

    STAGES = ("capture", "forward", "statistics", "factorisation", "sweep", "solve", "diagnostics", "packing",
              "checkpoint", "offload")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._lock = threading.Lock()
        self._local = threading.local()   # .stack: [stage, start, seconds of nested stages] per open stage

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if stage not in self.seconds:
            raise ValueError(f"stage must be one of {self.STAGES}, got {stage!r}")
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append([stage, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            name, begin, nested = stack.pop()
            elapsed = time.perf_counter() - begin
            with self._lock:
                self.seconds[name] += elapsed - nested
            if stack:
                stack[-1][2] += elapsed


@contextlib.contextmanager
def timing(timer: StageTimer):
    """Make `timer` the one `stage` reports to, in this thread or task, until the block exits."""
    token = _current.set(timer)
    try:
        yield timer
    finally:
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Time the block as stage `name` of the current StageTimer (nothing without one)."""
    timer = _current.get()
    if timer is None:
        yield
    else:
        with timer(name):
            yield
