"""The one interrupt flag: Ctrl-C and SIGTERM as one KeyboardInterrupt, remembered once it came.

Imports nothing of ours, so that the entry point can install it before anything
heavy is imported, and every layer (run files, training) can ask whether an
interrupt arrived.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
import time

INTERRUPTED = 130
_interrupted = False
# Our KeyboardInterrupt was dropped (see _quiet_unraisable) and is being sent again: until it is raised, the next
# signal raises it too.
_dropped = False
_signum = signal.SIGINT  # the signal that interrupted us: the one sent again
# Whether a thread sends the dropped interrupt again. It gives that up under the lock, so that a drop coming as it
# stops starts the next one. Reentrant: a signal's handler may drop the interrupt again while the main thread holds
# it in _drop.
_sending = False
_handoff = threading.RLock()
# Between hold() and release() an interrupt is only remembered, and release() raises it.
_held = False
_held_back = False
_reported_by = sys.unraisablehook


def _raise_once(signum, frame) -> None:
    # A second signal while the first unwinds is ignored, so that the run's status and
    # temporary files are cleaned up instead of being cut off half-way.
    global _interrupted, _dropped, _signum, _held_back
    if _interrupted and not _dropped:
        return
    _interrupted, _signum = True, signum
    if _held:
        # Taken, as a raise would take it (a dropped one is sent no more): release() raises it.
        _dropped, _held_back = False, True
        return
    if _inside(frame, _quiet_unraisable):
        # Raised in the hook, it would be reported as the hook's own failure, traceback and all.
        _drop()
        return
    _dropped = False
    raise KeyboardInterrupt


def _quiet_unraisable(unraisable) -> None:
    # Our KeyboardInterrupt raised inside a callback whose errors Python only reports (a weakref callback, a
    # __del__: matplotlib's, during garbage collection) would print a traceback, and Python then drops it: the
    # command would run on, deaf to the next signal (a worker until its parent kills it, its row left running).
    if _interrupted and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _drop()
        return
    _reported_by(unraisable)


def _inside(frame, function) -> bool:
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


def _drop() -> None:
    global _dropped, _sending
    with _handoff:
        _dropped = True
        if _sending:
            # The interrupt raised again may land in the next finalizer and be dropped again: a thread for each
            # drop would pile up by the hundred through a run of them, each signalling the process.
            return
        _sending = True
    threading.Thread(target=_raise_again, args=(_signum,), name="interrupt-again", daemon=True).start()


def _raise_again(signum: int) -> None:
    """Signal the main thread until the dropped interrupt is raised there, or the handlers are no longer ours."""
    global _sending
    while True:
        # The main thread leaves the callback meanwhile; if it is still inside, it is signalled again.
        time.sleep(0.01)
        with _handoff:
            if not _dropped or signal.getsignal(signum) is not _raise_once:
                _sending = False
                return
        if hasattr(signal, "pthread_kill"):
            # A real signal also wakes a main thread that waits in a system call (the pool's wait for its workers).
            signal.pthread_kill(threading.main_thread().ident, signum)
        else:
            _thread.interrupt_main(signum)


def install() -> dict:
    """Route SIGINT and SIGTERM into one KeyboardInterrupt; returns the handlers it replaced. Installed again
    over itself (the entry point, then the CLI), it keeps what came in between: a signal during the CLI's
    imports may have had its KeyboardInterrupt swallowed by library code, and the flag is then all that is
    left of it."""
    global _interrupted, _dropped, _held_back, _reported_by
    if not any(signal.getsignal(sig) is _raise_once for sig in (signal.SIGINT, signal.SIGTERM)):
        _interrupted = _dropped = _held_back = False
    if sys.unraisablehook is not _quiet_unraisable:
        _reported_by, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
    # A signal ignored by whoever started us (`vera ... &` in a script ignores SIGINT) stays ignored.
    return {sig: signal.signal(sig, _raise_once) for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) is not signal.SIG_IGN}


def hold() -> None:
    """Until `release()`, an interrupt is remembered and not raised: for two steps that must not be told apart
    by where it lands (a run's directory published, and its recording started). Only under the handlers that
    `install()` sets, and only in the main thread, where Python runs them: held by another thread, the main
    thread's interrupt would be taken from it and raised in that thread's release()."""
    global _held
    if threading.current_thread() is threading.main_thread():
        _held = True


def release() -> None:
    """End `hold()`, raising the interrupt that came meanwhile (in the main thread; elsewhere nothing)."""
    global _held, _held_back
    if threading.current_thread() is not threading.main_thread():
        return
    _held = False
    if _held_back:
        _held_back = False
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a signal arrived since install(), even one that library code swallowed."""
    return _interrupted


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if sys.unraisablehook is _quiet_unraisable and not any(
            signal.getsignal(sig) is _raise_once for sig in (signal.SIGINT, signal.SIGTERM)):
        # The last installation is undone: the flag stays set, and the hook would go on silencing every
        # KeyboardInterrupt that this process's callbacks raise.
        sys.unraisablehook = _reported_by
