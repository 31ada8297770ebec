"""Harnesses for the tests and the benchmarks, not shipped in the wheel: hosts as network
namespaces (netlab), the Kubernetes operators and kubelet emulated (k8s), process helpers."""
