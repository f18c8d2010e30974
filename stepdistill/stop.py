"""Stopping a training run cleanly on a signal: the loop finishes its step, checkpoints and exits with one line."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) while training: finish the step, checkpoint, stop with
    one line. A second Ctrl-C interrupts at once. Handlers are installed in the main thread only, and not for
    a signal the process was started ignoring."""

    def __init__(self):
        self.name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. nohup / a background job: keep ignoring it
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
