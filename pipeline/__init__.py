"""scoreda's orchestration layer (stages, storage, launchers, CLI)."""

from __future__ import annotations

import atexit as _atexit
import signal as _signal
import threading as _threading

# SLURM's pre-timeout signal (--signal=USR1@lead) may come up to a minute early, i.e. while a
# process is still importing torch; its default action would kill it. The CLI records it from
# its first line on, and runtime.StopSignals picks it up once the stage watches for signals.
_early: list[str] = []


def _ignore_late_usr1() -> None:
    """At exit: ignore SIGUSR1. Python resets its own handlers to the default (die) while it
    shuts down, and a USR1 arriving then (the job runner passes it on every 10 s until the stage
    exits) would turn a finished, committed stage into a job killed by a signal. SIG_IGN is kept
    through the shutdown."""
    if _threading.current_thread() is _threading.main_thread():
        _signal.signal(_signal.SIGUSR1, _signal.SIG_IGN)


def catch_early_usr1() -> None:
    """Record SIGUSR1 instead of dying of it, until a stage installs its own handler; ignore it
    once the process exits (:func:`_ignore_late_usr1`)."""
    if _threading.current_thread() is _threading.main_thread():
        _signal.signal(_signal.SIGUSR1, lambda signum, frame: _early.append("SIGUSR1"))
        _atexit.unregister(_ignore_late_usr1)  # once per process, however often main() runs
        _atexit.register(_ignore_late_usr1)


def early_signal() -> str | None:
    """The signal that arrived before a stage watched for it, if any."""
    return _early[-1] if _early else None
