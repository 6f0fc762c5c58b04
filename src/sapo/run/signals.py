"""SIGINT/SIGTERM during training or the final save: the run finishes its step (or save), makes it durable,
then stops (`on_stop_signals`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


def _kill_on(old: object) -> object:
    """The disposition a second signal gets: the default action (a kill, no KeyboardInterrupt traceback), unless
    the program had installed a handler of its own, which then gets it. Not kept: Python's SIGINT handler (a
    traceback), an ignored signal (a run started by `cmd &` in a script or a CI runner inherits an ignored SIGINT:
    the first one still stops the run, so the second, which the message says kills, must not be ignored) and the
    stop handler of an enclosing block (it would request the same stop again)."""
    if old in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL, None) or getattr(old, "stops_run", False):
        return signal.SIG_DFL
    return old


@contextlib.contextmanager
def on_stop_signals(request_stop: Callable[[str, int], None],
                    doing: str = "saving a checkpoint after the current step", *, armed: bool = True) -> Iterator[None]:
    """While training (or saving): SIGINT/SIGTERM call `request_stop(reason, exit_code)` so the run can finish its
    step (or save) and make it durable; the handlers are then removed, so a second signal kills at once, also after
    the block (and after an enclosing block). `armed=False` (a stage after a stop was requested, e.g. the final save)
    installs no handler: a signal kills. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    fired = not armed

    def handler(signum, frame):
        nonlocal fired
        fired = True
        # disarmed first: a second signal sent once the message below is seen must kill, not request the stop again
        for sig, old in previous.items():  # Python's own SIGINT handler would raise KeyboardInterrupt: a traceback,
            # and cleanup that may take long (a thread pool hashing a checkpoint finishes first), not a kill
            signal.signal(sig, _kill_on(old))
        name = signal.Signals(signum).name
        logger.warning("%s received: %s (send again to kill)", name, doing)
        request_stop(f"{name} received", 128 + signum)

    handler.stops_run = True  # type: ignore[attr-defined]  # a nested block's second signal kills (`_kill_on`)
    for sig, old in previous.items():
        signal.signal(sig, handler if armed else _kill_on(old))
    try:
        yield
    finally:
        # not our handler any more: a nested block received the stop signal and left the kill disposition
        fired = fired or any(signal.getsignal(sig) is not handler for sig in previous)
        for sig, old in previous.items():
            signal.signal(sig, _kill_on(old) if fired else old)
