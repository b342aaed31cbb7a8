"""The server's Prometheus metrics (`GET /metrics`).

Counted by the server, per finished request: requests by outcome, prompt and generated tokens, and the
TTFT and TPOT histograms (from the final Output's ttft_s and tpot_s). Read from `ServingLoop.metrics()` at
each scrape: the entries of LOOP_METRICS, the one place that names that dict's keys, and under expert parallelism
DEVICE_METRICS, one series per device.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moejax.serving.requests import Output

# (Prometheus name, type, help, the key path in ServingLoop.metrics()).
LOOP_METRICS = (
    ("moejax_queue_depth", "gauge", "Requests waiting for a slot.", ("queue_depth",)),
    ("moejax_running_requests", "gauge", "Requests in the running batch.", ("running",)),
    ("moejax_expert_cache_hit_rate", "gauge", "Expert cache hits / expert activations since the server started.",
     ("engine", "hit_rate")),
    ("moejax_expert_bytes_moved", "counter", "Expert bytes copied host to device.", ("engine", "bytes_h2d")),
    ("moejax_stall_seconds", "counter", "Seconds the host waited for step results (the device computing or moving experts).",
     ("engine", "host_wait_s")),
    ("moejax_prefetch_precision", "gauge", "Prefetched experts used / prefetched (0 without prefetching).",
     ("engine", "prefetch_precision")),
    ("moejax_approximate_routing", "gauge", "1: a predictor's experts replace the routers' (--routing predicted), so "
     "outputs are approximate; 0: exact.", ("approximate_routing",)),
)
# Per device under expert parallelism, labelled by device: (Prometheus name, type, help, the key of each entry of
# ServingLoop.metrics()['engine']['per_device']).
DEVICE_METRICS = (
    ("moejax_device_expert_pairs", "counter", "(token, expert) pairs each device computed (expert parallelism).", "pairs"),
    ("moejax_device_expert_cache_hit_rate", "gauge", "Each device's expert cache hits / activations (expert parallelism).",
     "hit_rate"),
    ("moejax_device_expert_bytes_moved", "counter", "Expert bytes copied host to each device (expert parallelism).",
     "bytes_h2d"),
)
# Outcomes besides the finish reasons: refused (400), queue_full (429), shutting_down (503).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one server, in their own registry (several servers may share a process)."""

    def __init__(self, loop):
        self.registry = CollectorRegistry()
        self.requests = Counter("moejax_requests", "Requests by outcome: stop, length, cancelled, error, expired "
                                "(429, refused while queued), refused (400), queue_full (429), shutting_down (503).",
                                ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("moejax_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry)
        self.generation_tokens = Counter("moejax_generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram("moejax_time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("moejax_time_per_output_token_seconds", "Mean time per token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.registry.register(_LoopCollector(loop))

    def finished(self, output: Output) -> None:
        """Counts a request's final Output."""
        self.requests.labels(output.finish_reason).inc()
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generation_tokens.inc(output.completion_tokens)
        if output.ttft_s is not None:
            self.ttft.observe(output.ttft_s)
        if output.tpot_s is not None:
            self.tpot.observe(output.tpot_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _LoopCollector:
    """Reads the loop's metrics at each scrape."""

    def __init__(self, loop):
        self.loop = loop

    def describe(self):
        return []  # the loop is not asked at registration

    def collect(self):
        snapshot = self.loop.metrics()
        for name, kind, help_text, path in LOOP_METRICS:
            value = snapshot
            for key in path:
                if not isinstance(value, dict) or key not in value:
                    raise KeyError(f"ServingLoop.metrics() has no {'.'.join(path)} (for {name})")
                value = value[key]
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, help_text, value=value)
        devices = snapshot["engine"].get("per_device") or []
        for name, kind, help_text, key in DEVICE_METRICS if devices else ():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text, labels=["device"])
            for entry in devices:
                family.add_metric([str(entry["device"])], entry[key])
            yield family
