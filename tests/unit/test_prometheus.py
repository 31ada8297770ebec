"""--metrics-port (observe/prometheus.py): the records of metrics.jsonl as Prometheus gauges."""
from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distributed_step.config import ConfigError
from distributed_step.observe.prometheus import PrometheusExporter
from tests.helpers import free_port


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_record_sets_its_gauges_and_an_evaluation_its_own():
    port = free_port()
    exporter = PrometheusExporter(port, addr="127.0.0.1")
    try:
        assert math.isnan(scrape(port)[("distributed_step_loss", ())])  # nothing logged yet
        exporter({"step": 10, "epoch": 0.5, "loss": 1.25, "lr": 0.1, "images_per_s": 800.0, "step_ms": 160.0,
                  "data_ms": 4.0, "rank_busy_ms": [150.0, 310.0], "rank_straggler": [0, 1]})
        exporter({"step": 10, "eval_loss": 0.75, "eval_accuracy": 0.875, "eval_samples": 360})
        exporter({"step": 10, "comm_hook": "bf16"})  # not a log point: ignored
        got = scrape(port)
        assert got[("distributed_step_step", ())] == 10 and got[("distributed_step_loss", ())] == 1.25
        assert got[("distributed_step_step_seconds", ())] == pytest.approx(0.16)
        assert got[("distributed_step_data_wait_seconds", ())] == pytest.approx(0.004)
        assert got[("distributed_step_rank_busy_seconds", (("rank", "1"),))] == pytest.approx(0.31)
        assert got[("distributed_step_rank_straggler", (("rank", "1"),))] == 1
        assert got[("distributed_step_rank_straggler", (("rank", "0"),))] == 0
        assert got[("distributed_step_eval_accuracy", ())] == 0.875
        exporter({"step": 20, "loss": 0.5})
        assert scrape(port)[("distributed_step_step", ())] == 20
    finally:
        exporter.close()


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=rf"--metrics-port {taken.getsockname()[1]}: cannot serve metrics"):
            PrometheusExporter(taken.getsockname()[1], addr="127.0.0.1")
