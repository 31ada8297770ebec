"""How `train`'s failures become one line and an exit code (distributed_step.__main__._explain)."""
from __future__ import annotations

from distributed_step.__main__ import _explain, _fail
from distributed_step.config import ConfigError, TrainConfig
from distributed_step.data.images import UnreadableImage

CFG = TrainConfig(image_size=4000, global_batch_size=16)


def test_out_of_memory_names_the_flags_to_lower():
    line, code = _explain(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                       "98304000000 bytes. Error code 12 (Cannot allocate memory)"), CFG)
    assert code == 1 and line.startswith("out of memory at --image-size 4000 with 16 images per rank")


def test_a_loader_workers_exception_keeps_only_its_last_line():
    wrapped = UnreadableImage("Caught UnreadableImage in DataLoader worker process 0.\nOriginal Traceback "
                              "(most recent call last):\n  File \"x.py\", line 1, in f\ndistributed_step.data."
                              "UnreadableImage: unreadable image /d/train/a/zero.jpg (OSError: truncated)")
    assert _explain(wrapped, CFG) == ("unreadable image /d/train/a/zero.jpg (OSError: truncated)", 2)


def test_bad_input_is_exit_2_and_a_peer_failure_says_where_the_cause_is():
    assert _explain(ConfigError("--lr must be positive"), CFG) == ("--lr must be positive", 2)
    line, code = _explain(RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error: "
                                       "Connection reset by peer"), CFG)
    assert code == 1 and line.startswith("a collective failed: another rank stopped")


def test_an_error_after_the_launchers_sigterm_is_its_consequence_not_a_traceback(monkeypatch, capsys):
    from distributed_step import __main__ as entry
    from distributed_step.parallel import preemption

    monkeypatch.setattr(preemption, "_received", True)  # torchrun stopping this rank after another failed
    line, code = _explain(EOFError("unexpected EOF"), CFG)  # its loader's forkserver got the signal too
    assert code == 1 and line == "stopped by the launcher (SIGTERM), after which: EOFError: unexpected EOF"
    assert line.startswith(entry.CONSEQUENCES) and "Traceback" not in capsys.readouterr().err


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Every rank of a job shares one stderr, unbuffered in pods (PYTHONUNBUFFERED=1): the line
    and its newline must go out in one write, or two ranks' lines interleave into one."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Recorder())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _fail("--out /x: no space left", 1) == 1
    assert writes == ["[rank 1] distributed-step: error: --out /x: no space left\n"]
