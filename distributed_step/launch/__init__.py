"""Launchers that are not torchrun: Ray Train (`distributed-step ray`, the [ray] extra). The
only room that imports ray, and only inside functions, so the package imports without it."""
