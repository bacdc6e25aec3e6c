"""Preemption: SIGTERM or SIGINT makes the loop save the current step and stop.

Cloud schedulers send SIGTERM some seconds before they kill a VM, and Ctrl-C sends SIGINT;
without a handler either loses everything since the last periodic checkpoint. With `Watch`
active the loop asks `requested(step)` after every step; when it says yes, the loop waits
for any in-flight save, saves that step (state and data position: the resumed run is
bitwise the unbroken one), and `train` raises `Preempted`, which the command turns into
one line and exit status 75 (`errors.EXIT_PREEMPTED`). A second signal of the same kind
acts as if no handler were installed (a second Ctrl-C interrupts at once).

Every host of a pod must save the same step. With several processes, SIGTERM is left to
JAX's preemption service (set up by `jax.distributed.initialize`), which agrees on a step
without a collective per step: `multihost_utils.reached_preemption_sync_point`, the call
orbax's `CheckpointManager.reached_preemption` makes. SIGINT, which that service does not
see, is agreed on at the loop's sync steps (log and checkpoint steps) with one allgather.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np

from jumprelu import errors


class Preempted(Exception):
    """The run saved a checkpoint at `step` because of `signal_name` and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"stopped by {signal_name} at step {step}: saved {checkpoint}; run the same command again to resume"
        )


def _jax_preemption_service() -> bool:
    """Whether JAX's preemption service owns SIGTERM here (a multi-process run with it enabled)."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        multihost_utils.reached_preemption_sync_point(-1)  # a query; raises if the service is off
    except RuntimeError:
        return False
    return True


def ignore_from_now() -> None:
    """For a command whose run is complete (report written): a SIGTERM or Ctrl-C from here to the
    process's exit changes nothing, so it is ignored; it made a finished run exit 143 (killed) as
    it printed its report, which a scheduler reads as a run to start again."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


class Watch:
    """Context manager: installs the handlers for its block and restores the previous ones after."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1
        self._jax_sigterm = _jax_preemption_service()

    def _handler(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal is not caught

    def __enter__(self) -> Watch:
        errors.stop_on_dropped_ctrl_c()  # a Ctrl-C during start-up whose KeyboardInterrupt Python dropped
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            signals = [signal.SIGINT] + ([] if self._jax_sigterm else [signal.SIGTERM])
            for s in signals:
                self._previous[s] = signal.signal(s, self._handler)
                # Restart system calls the signal interrupts: Python's default (EINTR) reaches C++
                # threads too, and a collective whose socket read fails with EINTR hangs (seen with
                # two processes on CPU).
                signal.siginterrupt(s, False)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, handler)
        self._previous.clear()

    def requested(self, step: int, sync_step: bool) -> bool:
        """Whether to save `step` and stop. Call after every step, on every process, with the same
        `sync_step` (True at steps where all processes may run a collective)."""
        if self._jax_sigterm:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
        if not self._multi:
            return self.signal_name is not None
        if not sync_step:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(np.any(flags))
