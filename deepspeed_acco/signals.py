"""SIGTERM stops an ACCO rank cleanly: the training thread unwinds and the worker thread is joined.

Python's default action for SIGTERM kills the process at once: no ``finally`` block, no
``atexit`` hook, no ``engine.destroy()``; the background round is cut off wherever it is. SIGTERM
is what DeepSpeed's ``launch.py`` sends to every rank when one rank fails or when it is itself
terminated, and what job schedulers send before SIGKILL. While ACCO is enabled, the handler
installed here turns the first SIGTERM into ``AccoTerminated`` (a ``SystemExit`` with status
143 = 128 + SIGTERM) raised in the main thread, exactly where it is (also inside a wait for a
round), so ``finally`` blocks and ``atexit`` run, ``engine.destroy()`` / the exit hook join the
worker thread, and the process exits with a non-zero status. A SIGTERM that comes while the
main thread is already unwinding from ``KeyboardInterrupt``, ``SystemExit`` or ``AccoRoundError``
does not raise (it would cut that clean-up short), and further SIGTERMs are ignored while the rank
stops (launchers and schedulers often send several: one to the process group, then one per
child); SIGKILL still forces it, and DeepSpeed's ``launch.py`` sends SIGKILL 30 s after SIGTERM.

Rules, so that nothing is taken over silently:

- installed only by ``deepspeed_acco.initialize`` with ``acco.enabled=true``, only from the main
  thread, and only if SIGTERM still has its default action: a handler of your own (installed
  before or after ``initialize``) is never replaced, and SIG_IGN is respected;
- it logs once that it is installed; ``restore_sigterm()`` gives SIGTERM its previous action;
- when no ACCO optimizer is alive any more, the handler restores the default action and re-sends
  the signal, so the process dies as it would have without ACCO.

SIGINT (Ctrl-C) needs nothing: Python already raises ``KeyboardInterrupt`` in the main thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from deepspeed.utils import logger

from deepspeed_acco.pipeline import AccoRoundError

__all__ = ["AccoTerminated", "install_sigterm_handler", "restore_sigterm", "sigterm_handler_installed"]

_lock = threading.RLock()
_previous: Any = None
_installed = False
_live_check: Callable[[], bool] | None = None
_stopping = False


class AccoTerminated(SystemExit):
    """Raised in the main thread by the first SIGTERM while ACCO runs (exit status 128 + signal number)."""


def sigterm_handler_installed() -> bool:
    """Whether SIGTERM currently runs ACCO's handler."""
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


def install_sigterm_handler(has_live_engines: Callable[[], bool]) -> bool:
    """Install the SIGTERM handler if SIGTERM has its default action; return whether it is installed.

    Args:
        has_live_engines: returns True while an ACCO optimizer is alive (checked when the signal comes).
    """
    global _previous, _installed, _live_check
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:
            _live_check = has_live_engines
            return True
        if current is not signal.SIG_DFL:
            return False  # the application or a framework owns SIGTERM: leave it alone
        _live_check = has_live_engines
        _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
        if not _installed:
            logger.info("ACCO: SIGTERM now raises deepspeed_acco.signals.AccoTerminated (SystemExit 143) in the "
                        "main thread so that the background round's thread is joined before exit; "
                        "deepspeed_acco.signals.restore_sigterm() undoes it")
        _installed = True
        return True


def restore_sigterm() -> None:
    """Give SIGTERM back the action it had before ``install_sigterm_handler`` (idempotent, main thread only)."""
    global _previous
    with _lock:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
        _previous = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _stopping
    rank = os.environ.get("RANK", "?")
    if _stopping:
        os.write(2, f"[deepspeed_acco] rank {rank} (pid {os.getpid()}): SIGTERM again, already stopping "
                    "(SIGKILL forces it)\n".encode())
        return
    unwinding = sys.exc_info()[1]
    if isinstance(unwinding, (KeyboardInterrupt, SystemExit, AccoRoundError)):
        # Already stopping (Ctrl-C, an exit, a failed round; the launcher SIGTERMs every rank once one has
        # failed): raising now, or dying, would only cut the clean-up that joins the worker thread short.
        _stopping = True
        os.write(2, f"[deepspeed_acco] rank {rank} (pid {os.getpid()}): SIGTERM received while already stopping "
                    f"({type(unwinding).__name__}); letting the clean-up finish\n".encode())
        return
    if _live_check is None or not _live_check():
        restore_sigterm()
        os.kill(os.getpid(), signum)  # no ACCO engine alive: behave as if we had never been installed
        return
    _stopping = True
    # os.write, not print: a handler may interrupt a print that holds the stdout buffer's lock.
    os.write(2, f"[deepspeed_acco] rank {rank} (pid {os.getpid()}): SIGTERM received, stopping: "
                f"raising AccoTerminated (exit status {128 + signum}) in the main thread; the ACCO worker "
                "thread is joined on the way out\n".encode())
    raise AccoTerminated(128 + signum)
