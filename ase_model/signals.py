"""Stopping on SIGTERM or SIGINT at a step boundary: the step in progress finishes, last.pt is saved, and the run
exits with status 128 + the signal's number (under torchrun, once every rank agreed to stop)."""

import contextlib
import signal
import threading


class Stop(Exception):
    """SIGTERM or SIGINT: the run saved last.pt and stops with status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """The trainer's signal handling. Expects `signal`, `agreed_signal` (set by the trainer's flush under torchrun),
    `world`, `log` and `checkpoint`."""

    @contextlib.contextmanager
    def catching_signals(self):
        """SIGTERM and SIGINT call `on_signal` inside the block (from the main thread only, where Python delivers
        signals); the previous handlers come back after it."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def on_signal(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (last.pt is the last periodic checkpoint)
        self.signal = signum
        self.log(f"{signal.Signals(signum).name}: finishing the current step, then saving last.pt")

    def stop_if_signalled(self) -> None:
        """After a step: stop if a signal came (under torchrun, once the ranks agreed on it in `flush`)."""
        signum = self.signal if self.world == 1 else self.agreed_signal
        if signum is not None:
            self.checkpoint("last.pt")
            raise Stop(signum)
