"""What one all-reduce costs, as the collective libraries run it.

A fabric is one level of interconnect, described the way NCCL's tuner (src/graph/tuning.cc) and
nccl-tests describe it: a bus bandwidth B, which is what one rank's links achieve for large
messages (busBw = algBw x 2(n-1)/n for a ring), a latency per algorithm step (alpha), and a
fixed cost per call (the launch, the stream and DDP's bookkeeping). Then, for S bytes on n ranks:

    ring:  call + 2(n-1) alpha + 2(n-1)/n x S / B                      (+ the CPU's reduction, gloo)
    tree:  call + 2 log2(n) alpha + 2(n-1)/n x S / (B x TREE_BW_SHARE)

The ring's latency grows with n and the tree's with log n; the tree pays in bandwidth (NCCL
rates its double binary tree below the ring for large messages). NCCL takes the cheaper of the
two for each size; gloo runs the ring. Across nodes every ring crosses the node boundary, so the
bandwidth is the smaller of the intra-node fabric's and the node's network links together (NCCL
runs one ring per NIC), and each step waits for the slower hop.

A fabric may also carry less than every link at once: a switch oversubscribed at its uplinks,
or hosts emulated on one machine, whose CPU moves every packet of every link. `fabric_gbyte_s`
is what it carries in all; the n ranks of a ring send 2(n-1) S bytes together, so an all-reduce
takes at least 2(n-1) S / fabric_gbyte_s, and the slower of that and the links sets its time.
A non-blocking fat tree (every preset) has no such limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

# The tree's bandwidth as a share of the ring's for large messages (NCCL tuning.cc rates trees
# lower: each rank sends up and down the tree, split over two trees).
TREE_BW_SHARE = 0.9


@dataclass(frozen=True)
class Fabric:
    name: str
    bus_gbyte_s: float  # all-reduce bus bandwidth per rank, large messages (per node across nodes)
    alpha_us: float  # latency per algorithm step
    call_us: float  # fixed cost per collective call
    source: str = ""


@dataclass(frozen=True)
class System:
    """Nodes of `per_node` devices: `intra` inside a node, `inter` between nodes (None: one node)."""
    name: str
    per_node: int
    intra: Fabric
    inter: Fabric | None = None
    backend: str = "nccl"  # nccl: ring or tree, whichever is cheaper; gloo: ring
    reduce_gbyte_s: float = math.inf  # the CPU's reduction rate (gloo adds in host memory)
    source: str = ""
    # Backward's slowdown per second of traffic beside it on this kind of system (None: the
    # calibration's own figure, for the system it was measured on).
    interference: float | None = None
    fabric_gbyte_s: float = math.inf  # all ranks' traffic at once (above); inf: non-blocking

    def scaled(self, bandwidth: float = 1.0, latency: float = 1.0) -> System:
        """The same system with every bandwidth and latency multiplied (the uncertainty band)."""
        def one(f: Fabric | None) -> Fabric | None:
            return f and replace(f, bus_gbyte_s=f.bus_gbyte_s * bandwidth, alpha_us=f.alpha_us * latency,
                                 call_us=f.call_us * latency)
        # replace(), so that a field added later is carried over rather than reset to its default
        return replace(self, intra=one(self.intra), inter=one(self.inter),
                       reduce_gbyte_s=self.reduce_gbyte_s * bandwidth,
                       fabric_gbyte_s=self.fabric_gbyte_s * bandwidth)


def ring_s(nbytes: float, n: int, fabric: Fabric, reduce_gbyte_s: float = math.inf) -> float:
    if n <= 1:
        return 0.0
    wire = 2 * (n - 1) / n * nbytes / (fabric.bus_gbyte_s * 1e9)
    reduction = (n - 1) / n * nbytes / (reduce_gbyte_s * 1e9)
    return (fabric.call_us + 2 * (n - 1) * fabric.alpha_us) * 1e-6 + wire + reduction


def tree_s(nbytes: float, n: int, fabric: Fabric) -> float:
    if n <= 1:
        return 0.0
    wire = 2 * (n - 1) / n * nbytes / (fabric.bus_gbyte_s * 1e9 * TREE_BW_SHARE)
    return (fabric.call_us + 2 * math.ceil(math.log2(n)) * fabric.alpha_us) * 1e-6 + wire


def fabric_bound_s(nbytes: float, n: int, fabric_gbyte_s: float) -> float:
    """The least time the whole fabric needs for the 2(n-1) S bytes an all-reduce sends in all."""
    return 2 * (n - 1) * nbytes / (fabric_gbyte_s * 1e9) if n > 1 else 0.0


def effective(system: System, n: int) -> Fabric:
    """The one fabric an n-rank collective sees: the intra-node one inside a node; across nodes
    the slower bandwidth and the slower step of the two."""
    if n <= system.per_node or system.inter is None:
        return system.intra
    intra, inter = system.intra, system.inter
    return Fabric(f"{intra.name}+{inter.name}", min(intra.bus_gbyte_s, inter.bus_gbyte_s),
                  max(intra.alpha_us, inter.alpha_us), max(intra.call_us, inter.call_us))


def all_reduce_s(nbytes: float, n: int, system: System) -> tuple[float, str]:
    """(seconds, algorithm) of one all-reduce of `nbytes` over n ranks."""
    if n > system.per_node and system.inter is None:
        raise ValueError(f"{system.name}: {n} ranks do not fit one node of {system.per_node}")
    fabric = effective(system, n)
    bound = fabric_bound_s(nbytes, n, system.fabric_gbyte_s) + fabric.call_us * 1e-6
    ring = max(ring_s(nbytes, n, fabric, system.reduce_gbyte_s), bound)
    if system.backend == "gloo":
        return ring, "ring"
    tree = max(tree_s(nbytes, n, fabric), bound)
    return (ring, "ring") if ring <= tree else (tree, "tree")


def fit(samples: list[tuple[float, float]], n: int) -> tuple[float, float]:
    """(bus GB/s, fixed microseconds) from measured (bytes, seconds) of n-rank all-reduces: the
    least-squares line t = a + S x 2(n-1)/n / B. The fixed part holds call and step latencies."""
    xs = [2 * (n - 1) / n * s for s, _ in samples]
    ys = [t for _, t in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    if slope <= 0:
        raise ValueError("the all-reduce times do not grow with size: measure larger messages")
    return 1 / slope / 1e9, max(0.0, intercept) * 1e6
