"""Bad input fails fast, on every rank, with one line naming the flag or path; never a hang.

All cases start at once (they are mostly waiting on imports) and are checked together.
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest
import torch

from tests.helpers import BIN, ROOT, TINY, child_env, free_port, python_cmd, torchrun_cmd

pytestmark = pytest.mark.slow

CASES = {
    # name: (command, extra env, text every failing rank must print)
    "batch_not_divisible": (torchrun_cmd(2, TINY + ["--global-batch-size", "15"]), {},
                            "--global-batch-size 15 is not divisible by the world size 2"),
    # The same check on each rank started by hand: each fails on its own, before any collective
    # (under torchrun the first failure makes torchrun stop the others, possibly before they print).
    **{f"batch_not_divisible_rank{r}": (python_cmd(TINY + ["--global-batch-size", "15"]),
                                        {"WORLD_SIZE": "2", "RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": "PORT"},
                                        "--global-batch-size 15 is not divisible by the world size 2")
       for r in (0, 1)},
    "missing_dataset": (python_cmd(["--data", "imagefolder:/nonexistent/imagenet"]), {},
                        "directory /nonexistent/imagenet does not exist"),
    "unknown_flag": (python_cmd(["--learning-rate", "0.1"]), {}, "unrecognized arguments: --learning-rate"),
    # Past the memory the kernel's OOM killer would end the rank without a word.
    "image_too_large": (python_cmd(TINY + ["--image-size", "4000"]), {},
                        "--image-size 4000 with 16 images per rank and micro-step needs at least"),
    "unknown_flag_console_script": ([str(BIN / "distributed-step"), "train", "--lr", "fast"], {},
                                    "argument --lr: invalid float value: 'fast'"),
    "out_not_a_directory": (python_cmd(TINY + ["--out", "/etc/hostname/run"]), {},
                            "--out /etc/hostname/run: cannot create the run directory"),
    "no_master_address": (python_cmd(TINY), {"WORLD_SIZE": "2", "RANK": "1"},
                          "MASTER_ADDR/MASTER_PORT are not set"),
    "unreachable_rendezvous": (python_cmd(TINY + ["--timeout-s", "3"]),
                               {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT"},
                               "no rendezvous at MASTER_ADDR=127.0.0.1"),
    # A port that accepts connections but is not a c10d store: TCPStore alone would wait forever.
    "silent_rendezvous": (python_cmd(TINY + ["--timeout-s", "3"]),
                          {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "SILENT"},
                          "accepts connections but did not answer as a c10d store within --timeout-s 3"),
}


@pytest.fixture(scope="module")
def silent_port():
    """A listener that accepts and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.extend(iter(server.accept, None)), daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, silent_port):
    started, procs = time.time(), {}
    for name, (cmd, env, _) in CASES.items():
        ports = {"PORT": str(free_port()), "SILENT": str(silent_port)}
        env = {k: ports.get(v, v) for k, v in env.items()}
        out = [] if "--out" in cmd else ["--out", str(tmp_path_factory.mktemp(name))]
        procs[name] = subprocess.Popen(cmd + out, cwd=ROOT,
                                       env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        results[name] = (proc.returncode, output, time.time() - started)
    return results


@pytest.mark.parametrize("name", CASES)
def test_fails_fast_with_one_line_naming_the_problem(outcomes, name):
    code, output, seconds = outcomes[name]
    expected = CASES[name][2]
    # bad input exits 2; a rendezvous that never completes is not bad input (exit 1); torchrun
    # exits 1 whatever its ranks did
    assert code == (1 if "rendezvous" in name or "torchrun" in CASES[name][0][0] else 2), (code, output[-2000:])
    assert seconds < 60, f"took {seconds:.0f} s"
    ours = [line for line in output.splitlines() if "distributed-step" in line and "error" in line]
    assert ours and all(expected in line for line in ours), output[-2000:]
    if "torchrun" in CASES[name][0][0]:
        assert all(line.startswith("[rank ") for line in ours)
    else:
        assert "Traceback" not in output and len(ours) == 1, output[-2000:]


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = subprocess.run(python_cmd(TINY + ["--lr", "1e12", "--steps", "6", "--checkpoint-every", "1",
                                             "--out", str(out)]), check=False,
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "loss is not finite at step 2" in proc.stderr, proc.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000001.pt"]  # the diverged state was never written
    state = torch.load(out / "checkpoints" / names[0], map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (out / "model.pt").exists()


def test_unreadable_image_ends_every_rank_in_seconds_naming_the_rank_and_file(tmp_path):
    """A zero-byte JPEG read by a loader worker: that rank names the file and exits at once, the
    other rank's collective fails within seconds, and torchrun's root cause is the right rank."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (20 * i, 100, 50 if c == "a" else 200)).save(
                tmp_path / "data" / "train" / c / f"{i}.jpg")
    (tmp_path / "data" / "train" / "a" / "zero.jpg").write_bytes(b"")
    began = time.time()
    proc = subprocess.run(torchrun_cmd(2, ["--data", f"imagefolder:{tmp_path / 'data'}", "--image-size", "16",
                                           "--global-batch-size", "8", "--steps", "12", "--workers", "1",
                                           "--out", str(tmp_path / "run")]),
                          check=False, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    seconds, output = time.time() - began, proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 45, (seconds, output[-2000:])
    ranks_part, summary_part = output.split("Failures:")  # the ranks' own output, then torchrun's summary
    summary_part = summary_part.split("Root Cause (first observed failure)")[1]
    culprit = [line for line in ranks_part.splitlines() if "unreadable image" in line]
    assert len(culprit) == 1 and culprit[0].startswith("[rank ") and "train/a/zero.jpg" in culprit[0], output[-3000:]
    rank = culprit[0].split("]")[0].removeprefix("[rank ")
    assert f"rank      : {rank} (local_rank: {rank})" in summary_part  # torchrun's root cause: that rank
    assert "train/a/zero.jpg" in summary_part  # its report, as torchelastic's error file
    # no traceback through our code from any rank: only torchrun's summary shows the culprit's
    assert not [line for line in ranks_part.splitlines() if 'File "' in line and "distributed_step" in line]
