"""--metrics-port: rank 0 serves what each log point measures, for Prometheus to scrape.

The gauges follow metrics.jsonl: they change at every log point (--log-every) and evaluation,
from the same all-reduced numbers, so a dashboard and the file never disagree. prometheus_client
serves them in its own thread; rank 0 only, since every rank would report the same run.
"""
from __future__ import annotations

import errno

from distributed_step.config import ConfigError

PREFIX = "distributed_step_"


class PrometheusExporter:
    """Listens to metrics.jsonl's records (observe.metrics.JsonlLog) and serves them."""

    def __init__(self, port: int, addr: str = "0.0.0.0"):
        try:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server
        except ImportError:  # a GPU image run from the checkout has torch, not our dependencies
            raise ConfigError(f"--metrics-port {port}: needs the prometheus_client package "
                              "(pip install prometheus-client)") from None

        self.registry = CollectorRegistry()

        def gauge(name: str, help_text: str, labels=()):
            made = Gauge(PREFIX + name, help_text, labels, registry=self.registry)
            if not labels:
                made.set(float("nan"))  # nothing measured yet: no point on a graph, not a zero
            return made

        self.step = gauge("step", "the last finished step that was logged")
        self.epoch = gauge("epoch", "epochs done, fractional")
        self.loss = gauge("loss", "training loss, mean over the log window and the ranks")
        self.lr = gauge("learning_rate", "the learning rate the last step used")
        self.images = gauge("images_per_second", "training images per second over the log window, all ranks")
        self.step_s = gauge("step_seconds", "wall time of a step, mean over the log window")
        self.data_s = gauge("data_wait_seconds", "time a step waited for its batch, mean over the window")
        self.busy_s = gauge("rank_busy_seconds", "a rank's compute and communication time per step", ["rank"])
        self.straggler = gauge("rank_straggler", "1 while a rank is slow enough to be named a straggler", ["rank"])
        self.eval_loss = gauge("eval_loss", "held-out loss at the last evaluation")
        self.eval_accuracy = gauge("eval_accuracy", "held-out accuracy at the last evaluation")
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ConfigError(f"--metrics-port {port}: cannot serve metrics there ({why})") from None

    def __call__(self, record: dict) -> None:
        if "loss" in record:
            self.step.set(record["step"])
            for gauge, key, scale in ((self.epoch, "epoch", 1), (self.loss, "loss", 1), (self.lr, "lr", 1),
                                      (self.images, "images_per_s", 1), (self.step_s, "step_ms", 1e-3),
                                      (self.data_s, "data_ms", 1e-3)):
                if key in record:
                    gauge.set(record[key] * scale)
            for rank, busy in enumerate(record.get("rank_busy_ms", [])):
                self.busy_s.labels(rank=str(rank)).set(busy / 1e3)
            for rank, slow in enumerate(record.get("rank_straggler", [])):
                self.straggler.labels(rank=str(rank)).set(slow)
        if "eval_accuracy" in record:
            self.eval_loss.set(record["eval_loss"])
            self.eval_accuracy.set(record["eval_accuracy"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
