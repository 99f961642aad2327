"""Prometheus metrics for /metrics.

Latencies are observed by the front-ends as requests happen; gauges that describe the system's
state right now (running instances, KV pages in use, executor batch sizes) are read from the
components at scrape time by a collector, so nothing has to keep copies of them up to date.
Each server owns its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds: token latencies on CPU are tens of ms, on GPU a few ms.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0, 10.0, 20.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_first_token = Histogram(
            "pie_trio_time_to_first_token_seconds",
            "Time from request arrival to the first generated text (OpenAI API)",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "pie_trio_inter_token_latency_seconds",
            "Time between consecutive streamed text chunks (OpenAI API)",
            ["endpoint"], buckets=TOKEN_BUCKETS, registry=self.registry)
        self.request_latency = Histogram(
            "pie_trio_request_latency_seconds",
            "End-to-end latency of OpenAI API requests", ["endpoint"],
            buckets=REQUEST_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "pie_trio_http_requests", "HTTP requests by endpoint and status",
            ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter(
            "pie_trio_prompt_tokens", "Prompt tokens of OpenAI API requests",
            registry=self.registry)
        self.completion_tokens = Counter(
            "pie_trio_completion_tokens", "Generated tokens of OpenAI API requests",
            registry=self.registry)
        self.launches = Counter(
            "pie_trio_instance_launches", "Instances launched, by front-end", ["origin"],
            registry=self.registry)
        self.terminations = Counter(
            "pie_trio_instance_terminations", "Instances ended, by reason", ["reason"],
            registry=self.registry)
        self.protocol_errors = Counter(
            "pie_trio_protocol_errors", "Client requests refused, by error code", ["code"],
            registry=self.registry)

    def watch(self, read_state: Callable[[], Mapping[str, Any]]) -> None:
        """Publish the state returned by `read_state()` at every scrape (see StateCollector)."""
        self.registry.register(StateCollector(read_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# State key → (counter name, help). Prometheus adds `_total` to each name.
COUNTERS = {
    "ticks": ("executor_ticks", "Executor ticks (batches fired)"),
    "preemptions": ("kv_preemptions", "Instances whose KV pages were moved to host memory"),
    "restores": ("kv_restores", "Preempted instances whose KV pages were brought back"),
    "swap_bytes": ("kv_swap_bytes", "Bytes of KV moved between the pool and host memory"),
    "prefix_cache_query_tokens": ("prefix_cache_query_tokens",
                                  "Prompt tokens looked up in the automatic prefix cache"),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens",
                                "Prompt tokens whose KV the prefix cache supplied"),
}


class StateCollector(Collector):
    """Turns a snapshot dict into metrics at scrape time.

    Recognised keys: the gauges and counters below, and `forward_batch_sizes` (a {batch size:
    count} histogram).
    """

    def __init__(self, read_state: Callable[[], Mapping[str, Any]]):
        self.read_state = read_state

    def collect(self) -> Iterable[Any]:
        state = self.read_state()
        gauges = {
            "instances_running": "Inferlet instances running now",
            "sessions": "Client sessions (WebSocket and TCP) connected now",
            "instances_detached": "Instances no client is attached to: running detached, or "
                                  "ended and waiting for an attach",
            "kv_pages_in_use": "Physical KV cache pages allocated now",
            "kv_pages_total": "Physical KV cache pages in the pool",
            "kv_pages_swapped": "KV pages of preempted instances held in host memory now",
            "embed_slots_in_use": "Embedding slots allocated now",
            "trio_tasks": "Tasks of the server's trio run now",
            "prefix_cache_pages": "KV pages held by the automatic prefix cache",
        }
        for key, doc in gauges.items():
            if state.get(key) is not None:
                yield GaugeMetricFamily(f"pie_trio_{key}", doc, value=float(state[key]))
        for key, (name, doc) in COUNTERS.items():
            if state.get(key) is not None:
                yield CounterMetricFamily(f"pie_trio_{name}", doc, value=float(state[key]))
        sizes = state.get("forward_batch_sizes")
        if sizes:
            yield batch_size_histogram(sizes)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def batch_size_histogram(sizes: Mapping[int, int]) -> HistogramMetricFamily:
    """A Prometheus histogram from the executor's {batch size: count} counts."""
    cumulative = []
    for bound in BATCH_BUCKETS:
        cumulative.append((str(bound), sum(n for s, n in sizes.items() if int(s) <= bound)))
    cumulative.append(("+Inf", sum(sizes.values())))
    total = sum(int(s) * n for s, n in sizes.items())
    return HistogramMetricFamily(
        "pie_trio_forward_batch_size", "Sequences per executor forward batch",
        buckets=cumulative, sum_value=total)
