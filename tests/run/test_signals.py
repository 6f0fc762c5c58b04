"""`on_stop_signals`: the dispositions it leaves, checked by calling the installed handler (no signal is sent, so a
wrong disposition fails an assertion instead of killing the test run)."""

from __future__ import annotations

import signal

import pytest

from sapo.run.signals import on_stop_signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def restored_dispositions():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, old in before.items():
        signal.signal(sig, old)


def receive(sig: int = signal.SIGINT) -> None:
    """What Python does when `sig` arrives: call the installed handler."""
    handler = signal.getsignal(sig)
    assert callable(handler) and handler is not signal.default_int_handler, handler
    handler(sig, None)


def dispositions() -> list[object]:
    return [signal.getsignal(sig) for sig in STOP_SIGNALS]


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN],
                         ids=["python-default", "default", "ignored"])
def test_after_a_stop_signal_the_next_one_kills(inherited):
    """A run started in the background by a script (`cmd &`) or a CI runner inherits an ignored SIGINT: the first
    one still requests the stop, and the second must kill, not be ignored (CI saw exit 130 there)."""
    signal.signal(signal.SIGINT, inherited)
    requests = []
    with on_stop_signals(lambda reason, code: requests.append((reason, code))):
        receive()
        assert dispositions() == [signal.SIG_DFL, signal.SIG_DFL]
    assert requests == [("SIGINT received", 130)]
    assert dispositions() == [signal.SIG_DFL, signal.SIG_DFL]


def test_a_block_without_a_signal_restores_what_was_there():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with on_stop_signals(lambda reason, code: None):
        pass
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_the_programs_own_handler_gets_the_second_signal():
    def own(signum, frame):
        pass

    signal.signal(signal.SIGINT, own)
    with on_stop_signals(lambda reason, code: None):
        receive()
        assert signal.getsignal(signal.SIGINT) is own


def test_in_nested_blocks_the_second_signal_kills_and_stays_a_kill_after_both():
    """An inner block (a save inside training) that receives the stop signal must not hand the next one to the
    outer block's handler, which would request the stop again; the outer block keeps the kill too."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    requests = []
    with on_stop_signals(lambda reason, code: requests.append("outer")):
        with on_stop_signals(lambda reason, code: requests.append("inner")):
            receive()
            assert dispositions() == [signal.SIG_DFL, signal.SIG_DFL]
        assert dispositions() == [signal.SIG_DFL, signal.SIG_DFL]
    assert dispositions() == [signal.SIG_DFL, signal.SIG_DFL]
    assert requests == ["inner"]


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN], ids=["python-default", "ignored"])
def test_an_unarmed_block_leaves_a_kill(inherited):
    signal.signal(signal.SIGINT, inherited)
    with on_stop_signals(lambda reason, code: None, armed=False):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
