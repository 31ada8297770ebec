"""What a failed or stuck rank leaves behind (observe/evidence.py), in this process: the failure
report and torchelastic's error file, and the stack dump of a rank that stopped making progress."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from distributed_step.observe.evidence import HangWatch, record_failure


def _read_the_data():
    raise ValueError("the disk is a teapot")


def _failure() -> ValueError:
    try:
        _read_the_data()
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.fixture
def rank3(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)


def test_a_failure_report_names_the_rank_the_reason_and_the_traceback(tmp_path, rank3):
    before = time.strftime("%Y-%m-%d")
    path = record_failure(_failure(), "could not read the data", str(tmp_path))
    assert path == str(tmp_path / "errors" / "rank3.txt")
    head, reason, blank, *stack = Path(path).read_text().splitlines()
    assert head.startswith(f"rank 3 on {socket.gethostname()}, pid {os.getpid()}, ")
    assert before in head or time.strftime("%Y-%m-%d") in head
    assert (reason, blank) == ("could not read the data", "")
    assert stack[0] == "Traceback (most recent call last):"
    assert any("in _read_the_data" in line for line in stack)
    assert stack[-1] == "ValueError: the disk is a teapot"


def test_torchelastic_gets_the_reason_last_in_its_call_stack_and_the_reports_path(tmp_path, rank3, monkeypatch):
    elastic = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(elastic))
    out = tmp_path / "run"
    out.mkdir()
    path = record_failure(_failure(), "could not read the data", str(out))
    message = json.loads(elastic.read_text())["message"]
    assert message["message"] == f"could not read the data (report: {path})"
    stack = message["extraInfo"]["py_callstack"]
    assert "in _read_the_data" in stack and stack.endswith(f"teapot\n\ncould not read the data (report: {path})")
    assert abs(int(message["extraInfo"]["timestamp"]) - time.time()) < 60

    # A run without a directory leaves no report, and says so by naming none.
    assert record_failure(_failure(), "bad flag", str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing").exists()
    assert json.loads(elastic.read_text())["message"]["message"] == "bad flag"


def test_recording_a_failure_never_raises(tmp_path, rank3, monkeypatch):
    (tmp_path / "errors").write_text("a file where the folder should be")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "no" / "such" / "dir" / "error.json"))
    assert record_failure(_failure(), "reason", str(tmp_path)) is None
    assert record_failure(_failure(), "reason", None) is None


def test_the_dump_comes_before_the_collective_timeout(tmp_path):
    """The margin before --timeout-s is a quarter of it, at most 30 s; the wait at least 1 s."""
    for timeout_s, after_s in ((300.0, 270.0), (60.0, 45.0), (8.0, 6.0), (1.0, 1.0)):
        watch = HangWatch(str(tmp_path), timeout_s)
        watch.close()
        assert watch.after_s == after_s


def _stuck_until_dumped(path: Path, limit_s: float) -> str:
    """A rank that waits without progress (the name the dump must show)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not path.stat().st_size:
        time.sleep(0.05)
    time.sleep(0.05)  # the watchdog may still be writing the other threads
    return path.read_text()


def test_beats_hold_the_dump_off_and_silence_brings_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    watch = HangWatch(str(tmp_path), timeout_s=1.0)
    path = tmp_path / "errors" / "rank2-stacks.txt"
    try:
        assert watch.after_s == 1.0 and path.exists()
        seen = []
        for batch in watch.beating(range(12)):  # 1.2 s of progress, longer than after_s
            seen.append(batch)
            time.sleep(0.1)
        assert seen == list(range(12))
        assert path.stat().st_size == 0, path.read_text()
        began = time.monotonic()
        text = _stuck_until_dumped(path, limit_s=4.0)
        waited = time.monotonic() - began
    finally:
        watch.close()
    assert "most recent call first" in text and "_stuck_until_dumped" in text
    assert 0.5 <= waited < 3.0  # about after_s after the last beat, not at once
    assert path.read_text() == text  # close() keeps the evidence


def test_a_clean_end_leaves_no_errors_folder_and_an_old_dump_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    HangWatch(str(tmp_path), timeout_s=300.0).close()
    assert not (tmp_path / "errors").exists()

    (tmp_path / "errors").mkdir()
    old = tmp_path / "errors" / "rank0-stacks.txt"
    old.write_text("Thread 0x1 (most recent call first): the last attempt's evidence\n")
    watch = HangWatch(str(tmp_path), timeout_s=300.0)
    assert watch.after_s == 270.0
    watch.close()
    assert old.read_text().startswith("Thread 0x1")  # appended to, never truncated or removed
