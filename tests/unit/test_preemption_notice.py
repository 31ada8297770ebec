"""A launcher's preemption notice (Ray Train's get_preemption_info, faked here): the ranks ask
every K steps, and on the first notice a checkpoint is saved at once, then training goes on."""
from __future__ import annotations

import json
import sys

import pytest

from distributed_step.parallel.preemption import PreemptionNotice, PreemptionWatch
from tests.helpers import TINY, run_ok

pytestmark = pytest.mark.slow  # one training process

RUN = """
import json, sys
from distributed_step import train
from distributed_step.config import parse_args
from distributed_step.parallel.preemption import PreemptionNotice
asked = []
def imminent():
    asked.append(1)
    return len(asked) >= 2  # the notice comes at the second ask
summary = train(parse_args(sys.argv[1:]), preemption=PreemptionNotice(imminent, every=2))
print(json.dumps({"asked": len(asked), "steps": summary.steps}))
"""


def test_the_first_notice_saves_at_once_and_training_goes_on(tmp_path):
    out = tmp_path / "run"
    proc = run_ok([sys.executable, "-c", RUN, *TINY, "--steps", "7", "--checkpoint-every", "0", "--out", str(out)])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"asked": 2, "steps": 7}  # at steps 2 and 4; none after the save
    # Step 4's checkpoint, saved on the notice, and the final one; nothing else (no periodic saves).
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_00000004.pt", "step_00000007.pt"]


def test_the_watch_asks_only_at_its_steps_and_saves_once():
    answers = iter([False, True, True])
    watch = PreemptionWatch(PreemptionNotice(lambda: next(answers), every=3))
    assert [watch.save_now(step) for step in range(1, 10)] == [False, False, False, False, False, True,
                                                                 False, False, False]
    assert PreemptionWatch(None).save_now(3) is False


def test_sigterm_stops_a_run_on_another_thread_once_the_main_thread_installed_the_handler():
    """Ray Train's case: the run on a worker thread, the handler from the main thread."""
    import os
    import signal
    import threading
    import time

    from distributed_step.parallel import preemption

    previous = signal.getsignal(signal.SIGTERM)
    entered, seen = threading.Event(), []

    def run():
        with preemption.StopRequest() as stop:  # not the main thread: installs nothing itself
            entered.set()
            deadline = time.monotonic() + 10
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(stop.requested)

    try:
        preemption.stop_on_sigterm()
        worker = threading.Thread(target=run)
        worker.start()
        entered.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)
        worker.join(15)
        assert seen == [True] and preemption.sigterm_received()
    finally:
        signal.signal(signal.SIGTERM, previous)
        preemption._received = False
