"""The calibration file: what `distributed-step calibrate` measured, for `distributed-step plan`.

JSON, one object: the model it was measured on (architecture and parameter count, which `load`
checks against the gradients and the model planned for; and a digest of the parameter shapes,
which tells two layouts of one architecture apart), the device and precision, one
device's step split into forward, backward and optimizer, DDP's own cost at one rank, the step's
jitter, every gradient's bytes and the moment in backward when it was ready, the compression
hook's cost, the interference measured with a real all-reduce beside backward, and the link:
(bytes, seconds) of all-reduces over the ranks it ran on, with the fitted bandwidth and latency.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from distributed_step.planner.collectives import Fabric, System
from distributed_step.planner.step_model import Profile

FORMAT = "distributed-step-calibration/1"


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and what is wrong."""


def shapes_digest(shapes: list[tuple[int, ...]]) -> str:
    return hashlib.sha256(json.dumps([list(s) for s in shapes]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Link:
    """The measured all-reduces: ranks in all, ranks per host, backend, and the fit."""
    ranks: int
    per_host: int
    backend: str
    samples: tuple[tuple[int, float], ...]  # (bytes, seconds)
    bus_gbyte_s: float
    fixed_us: float  # the fit's intercept: call and step latencies together

    def system(self) -> System:
        """A system of hosts like the measured ones. The intercept is split as a ring of `ranks`
        spends it: one call and 2(n-1) steps, each step costing as much as the call."""
        steps = 2 * (self.ranks - 1) + 1
        fabric = Fabric("measured", self.bus_gbyte_s, self.fixed_us / steps, self.fixed_us / steps,
                        f"measured over {self.ranks} ranks, {self.per_host} per host")
        # Past the measured ranks: more hosts joined by links like the measured one (on one host
        # that is its loopback, which only a multi-host calibration makes a real network).
        return System(f"measured-{self.backend}", self.per_host, fabric, fabric, backend=self.backend,
                      source=fabric.source)


@dataclass(frozen=True)
class Calibration:
    arch: str
    params: int
    shapes_digest: str
    device: str
    precision: str
    image_size: int
    profile: Profile
    link: Link | None = None

    def save(self, path: str) -> None:
        record = {"format": FORMAT, **asdict(self)}
        Path(path).write_text(json.dumps(record, indent=1) + "\n")


def _need(condition: bool, path: str, what: str) -> None:
    if not condition:
        raise CalibrationError(f"calibration {path}: {what}")


def load(path: str, arch: str | None = None) -> Calibration:
    """Read and check a calibration file; `arch`: the model the plan is for (refused if another)."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration {path}: no such file (`distributed-step calibrate` makes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"calibration {path}: not readable JSON ({exc})") from None
    _need(isinstance(record, dict) and record.get("format") == FORMAT, path,
          f"not a calibration file (expected \"format\": \"{FORMAT}\")")
    try:
        given = record["profile"]  # a field with a default may be missing (a file from before it)
        profile = Profile(**{f.name: given[f.name] for f in fields(Profile) if f.name in given or f.default is MISSING})
        profile = Profile(**{**asdict(profile), "grad_bytes": tuple(profile.grad_bytes),
                             "grad_ready": tuple(profile.grad_ready)})
        link = record.get("link")
        link = link and Link(**{**link, "samples": tuple(tuple(s) for s in link["samples"])})
        calibration = Calibration(record["arch"], record["params"], record["shapes_digest"], record["device"],
                                  record["precision"], record["image_size"], profile, link)
    except (KeyError, TypeError) as exc:
        raise CalibrationError(f"calibration {path}: missing or malformed field {exc}") from None
    numbers = [profile.forward_s, profile.backward_s, profile.optimizer_s]
    _need(all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers), path,
          "forward, backward and optimizer times must be positive seconds")
    _need(len(profile.grad_bytes) == len(profile.grad_ready) > 0, path, "one ready time per gradient")
    _need(sum(profile.grad_bytes) == 4 * calibration.params or calibration.precision != "fp32", path,
          f"gradient bytes ({sum(profile.grad_bytes)}) do not match {calibration.params} fp32 parameters")
    _need(all(0 <= r <= 1 for r in profile.grad_ready) and list(profile.grad_ready) == sorted(profile.grad_ready),
          path, "ready times must be fractions of backward, in order")
    if arch is not None and arch != calibration.arch:
        raise CalibrationError(f"calibration {path} was measured on {calibration.arch} "
                               f"({calibration.params:,} parameters), not {arch}: calibrate {arch}")
    return calibration
