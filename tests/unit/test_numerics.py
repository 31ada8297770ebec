"""--deterministic sets every switch that decides GPU repeatability, and config.yaml says which
were in force. In a subprocess: the switches are process-wide and would leak into other tests."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, child_env

PROBE = """
import json, sys
from distributed_step.parallel import numerics
print(json.dumps(numerics.configure(sys.argv[1] == "1")))
"""


def in_force(deterministic: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if deterministic else "0"], check=True, cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


def test_deterministic_turns_off_autotuning_and_tf32_and_sets_cublas():
    assert in_force(True) == {"deterministic_algorithms": True, "cudnn_deterministic": True,
                              "cudnn_benchmark": False, "tf32_matmul": False, "tf32_cudnn": False,
                              "cublas_workspace_config": ":4096:8"}


def test_default_autotunes_the_fixed_shape_step():
    fast = in_force(False)
    assert fast["cudnn_benchmark"] and not fast["deterministic_algorithms"] and not fast["cudnn_deterministic"]
