"""Seeing a run: honest metrics, TensorBoard, the phase clock, straggler detection, the
profiler, and what a failed or stuck rank leaves behind. Imports config, data and parallel."""
