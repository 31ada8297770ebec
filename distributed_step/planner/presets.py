"""Interconnects for devices nobody here has measured, each with where its figures come from.

Bandwidths are what an all-reduce achieves (bus bandwidth), not the links' nominal rates: the
nominal rate times an efficiency that nccl-tests runs typically show (about 85% on NICs). The
latencies are NCCL's own tuning constants for the Simple protocol (src/graph/tuning.cc: a base
latency per call of 8.4 us, a per-step hardware latency of 3.4 us on NVLink, 5.7 us on PCI and
6.6 us on the network), plus a per-bucket cost of DDP's (its bookkeeping and the launch) in the
call. A system is nodes of `per_node` devices: one fabric inside a node and one between nodes,
whose bandwidth is the node's NICs together (NCCL runs one ring per NIC).
"""
from __future__ import annotations

from distributed_step.planner.collectives import Fabric, System

NIC_EFFICIENCY = 0.85  # all-reduce bus bandwidth / the NICs' line rate, typical of nccl-tests runs
# NCCL's interference with backward on GPUs (planner.step_model): fitted on the PyTorch DDP
# benchmark's 8-V100 ResNet-50 step (planner.published.fitted_interference; a test keeps the two
# equal). A CPU calibration's own figure (gloo's threads taking cores) does not carry to a GPU.
GPU_INTERFERENCE = 0.061
NCCL_CALL_US = 8.4 + 12.0  # NCCL's base latency, plus DDP's per-bucket work and the launch


def nics(name: str, count: int, gbit: float, alpha_us: float = 6.6, source: str = "") -> Fabric:
    return Fabric(name, count * gbit / 8 * NIC_EFFICIENCY, alpha_us, NCCL_CALL_US, source)


FABRICS = {
    "nvlink4": Fabric("nvlink4", 360.0, 3.4, NCCL_CALL_US,
                      "H100 SXM with NVSwitch (DGX H100): 450 GB/s per direction per GPU; all-reduce bus bandwidth "
                      "about 360 GB/s without NVLink SHARP (nccl-tests on 8 GPUs)"),
    "nvlink3": Fabric("nvlink3", 230.0, 3.4, NCCL_CALL_US,
                      "A100 SXM with NVSwitch (DGX A100): 300 GB/s per direction; about 230 GB/s bus bandwidth"),
    "nvlink2": Fabric("nvlink2", 120.0, 3.4, NCCL_CALL_US,
                      "V100 SXM2, hybrid cube mesh (DGX-1V): about 120 GB/s bus bandwidth over 8 GPUs"),
    "pcie3": Fabric("pcie3", 10.0, 5.7, NCCL_CALL_US,
                    "PCIe 3.0 x16 through a switch: 15.75 GB/s per direction; about 10 GB/s bus bandwidth"),
    "ib400x8": nics("ib400x8", 8, 400, source="8 x 400 Gb/s InfiniBand NDR per node, one NIC per GPU (DGX H100)"),
    "ib200x8": nics("ib200x8", 8, 200, source="8 x 200 Gb/s InfiniBand HDR per node (DGX A100)"),
    "ib100x4": nics("ib100x4", 4, 100, source="4 x 100 Gb/s InfiniBand EDR per node (DGX-1V)"),
    "100gbe": nics("100gbe", 1, 100, alpha_us=10.0, source="one 100 GbE NIC per node (RoCE)"),
    "25gbe": nics("25gbe", 1, 25, alpha_us=10.0, source="one 25 GbE NIC per node (RoCE)"),
}

def gpus(name: str, per_node: int, intra: str, inter: str, source: str) -> System:
    return System(name, per_node, FABRICS[intra], FABRICS[inter], source=source, interference=GPU_INTERFERENCE)


SYSTEMS = {s.name: s for s in (
    gpus("h100-ib400", 8, "nvlink4", "ib400x8", "8 H100 per node (NVLink 4, NVSwitch), 8 x 400 Gb/s InfiniBand"),
    gpus("h100-100gbe", 8, "nvlink4", "100gbe", "8 H100 per node (NVLink 4), one 100 GbE NIC"),
    gpus("h100-25gbe", 8, "nvlink4", "25gbe", "8 H100 per node (NVLink 4), one 25 GbE NIC"),
    gpus("a100-ib200", 8, "nvlink3", "ib200x8", "DGX A100: 8 A100 (NVLink 3), 8 x 200 Gb/s InfiniBand"),
    gpus("v100-ib100x4", 8, "nvlink2", "ib100x4", "DGX-1V: 8 V100 (NVLink 2), 4 x 100 Gb/s InfiniBand"),
    gpus("p100-pcie-25gbe", 4, "pcie3", "25gbe", "4 P100 on PCIe 3.0 per server, one 25 GbE NIC (Horovod's runs)"),
)}


def system(name: str) -> System:
    if name not in SYSTEMS:
        raise ValueError(f"--interconnect {name}: unknown; one of {', '.join(SYSTEMS)} (or a calibration's link)")
    return SYSTEMS[name]
