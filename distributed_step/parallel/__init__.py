"""Making one process a rank of many: who am I and the process group, DDP and its hook policy,
SyncBN, the per-step flags the ranks agree on, preemption, placement on cores, peers across
hosts, and numerics. Imports config and data, nothing above."""
