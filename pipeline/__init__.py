"""scoreda's orchestration layer (stages, storage, launchers, CLI)."""

from __future__ import annotations

import signal as _signal
import threading as _threading

# SLURM's pre-timeout signal (--signal=USR1@lead) may come up to a minute early, i.e. while a
# process is still importing torch; its default action would kill it. The CLI records it from
# its first line on, and runtime.StopSignals picks it up once the stage watches for signals.
_early: list[str] = []


def catch_early_usr1() -> None:
    """Record SIGUSR1 instead of dying of it, until a stage installs its own handler."""
    if _threading.current_thread() is _threading.main_thread():
        _signal.signal(_signal.SIGUSR1, lambda signum, frame: _early.append("SIGUSR1"))


def early_signal() -> str | None:
    """The signal that arrived before a stage watched for it, if any."""
    return _early[-1] if _early else None
