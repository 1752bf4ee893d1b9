"""Stopping a run cleanly: SIGTERM and SIGINT raise, and wait while a checkpoint is written."""
import contextlib
import signal
import threading

# what stops or preempts a run (SIGUSR1/2: Slurm's and submitit's warning before a time-out)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The process received SIGTERM or SIGINT (a KeyboardInterrupt: no `except Exception` takes it,
    and DataLoader workers that get the same signal end quietly)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_raise():
    """While the block runs, SIGTERM and SIGINT raise Interrupted, unless others handle them."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                installed[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def signals_deferred(signums=STOP_SIGNALS):
    """Hold back `signums` while the block runs (in the main thread), then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    # a handler installed outside Python (getsignal gives None) could not be put back: left alone
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in signums if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
