"""devtools.procs: the free-port and process-supervision helpers the cluster, the bench and the tests share."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from devtools.procs import ProcessFailed, ProcessTimeout, Supervised, free_port, port_is_free

pytestmark = pytest.mark.timeout(30)


def test_free_port_is_bindable_and_with_bus_leaves_the_bus_port_free() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it
        s.listen()
        assert not port_is_free("127.0.0.1", port)
    for _ in range(5):
        node = free_port(with_bus=True)
        assert node + 10000 <= 65535 and port_is_free("127.0.0.1", node + 10000)


def test_wait_until_returns_once_the_check_passes(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    child = Supervised("writer", [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r})"
                                  ".write_text('x'); time.sleep(30)"], tmp_path / "writer.log").start()
    try:
        child.wait_until(marker.exists, 10, what="writing its marker")
        assert child.running
    finally:
        assert child.stop() == -signal.SIGTERM
    assert not child.running


def test_wait_until_fails_loudly_when_the_process_exits_first(tmp_path: Path) -> None:
    child = Supervised("quitter", [sys.executable, "-c", "import sys; print('bad option'); sys.exit(3)"],
                       tmp_path / "quitter.log").start()
    with pytest.raises(ProcessFailed, match=r"(?s)quitter exited with 3 before it was ready.*bad option"):
        child.wait_until(lambda: False, 10)


def test_wait_until_times_out_with_the_output(tmp_path: Path) -> None:
    child = Supervised("sleeper", [sys.executable, "-u", "-c", "import time; print('starting'); time.sleep(30)"],
                       tmp_path / "sleeper.log").start()
    try:
        # the output is there once it printed; the check that never passes then times out
        child.wait_until(lambda: "starting" in child.output(), 10, what="printing")
        with pytest.raises(ProcessTimeout, match=r"(?s)sleeper not answering within 0\.2s.*starting") as info:
            child.wait_until(lambda: False, 0.2, what="answering", details=lambda: "extra details")
        assert isinstance(info.value, TimeoutError) and "extra details" in str(info.value)
    finally:
        child.kill()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); "
            "time.sleep(30)")
    child = Supervised("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log", own_group=True).start()
    child.wait_until(lambda: "armed" in child.output(), 10, what="ignoring SIGTERM")
    assert child.stop(signal.SIGTERM, timeout=0.5) == -signal.SIGKILL
    assert child.stop() == -signal.SIGKILL  # stopping again: the same status, no error


def test_echo_copies_output_prefixed_with_the_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = Supervised("talker", [sys.executable, "-c", "print('hello')"], tmp_path / "talker.log", echo=True).start()
    assert child.wait(10) == 0
    assert "   talker | hello" in capsys.readouterr().out
    assert child.output() == "hello\n"
