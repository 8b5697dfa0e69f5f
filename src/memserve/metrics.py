"""Engine metrics: what ``GET /metrics`` exposes, in Prometheus text format.

``EngineSnapshot`` is the contract between the engine and the metrics layer: plain ints, read by
the engine's owner on demand (``LLMEngine.snapshot()``), never a tensor. Counters in it only grow
over the engine's lifetime. ``EngineMetrics`` turns snapshots (pulled at scrape time) and latency
observations (pushed by the engine) into Prometheus metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class TierSnapshot:
    """One memory tier (``device`` or ``dram``) of the MemPool."""

    blocks_total: int
    blocks_free: int
    blocks_active: int  # held by at least one running request
    blocks_historical: int  # only in the prompt tree (cached, evictable unless locked)
    prefix_hit_tokens: int  # counter: prompt tokens served from this tier's cache
    evicted_blocks: int  # counter: historical blocks dropped from this tier


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    device: TierSnapshot
    dram: TierSnapshot  # all zeros when the node has no DRAM tier
    prefix_query_tokens: int  # counter: prompt tokens looked up in the prefix cache
    prompt_tokens_computed: int  # counter: prompt tokens actually prefilled
    swap_out_blocks: int  # counter: blocks moved device -> DRAM
    swap_in_blocks: int  # counter: blocks moved DRAM -> device
    num_preemptions: int  # counter


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
"""The ``Content-Type`` of ``EngineMetrics.render()`` (the Prometheus text format)."""

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0
)  # fmt: skip
"""Histogram bucket upper bounds in seconds: 1 ms to 100 s, three per decade (+Inf is implied)."""


class EngineMetrics:
    """The Prometheus metrics of one engine, in a registry of its own (never the global one, so that
    many engines can live in one process, as in tests).

    Two sources:

    - Latency histograms, in seconds, pushed by the engine as events happen: ``observe_ttft``
      (once per request, at its first output token), ``observe_itl`` (once per later output
      token: the gap since the previous one), ``observe_e2e`` (once per finished request,
      from arrival to its final output).
    - Everything else is pulled at scrape time: ``render`` calls ``snapshot()`` once and
      exposes its gauges and counters.

    Threading: ``observe_*`` may be called from the engine's worker thread while ``render`` runs
    in the event loop (prometheus_client's histograms take a lock per observation). ``snapshot``
    is called in the thread that calls ``render``, possibly during an engine step: it must not
    raise and must not block on the step.
    """

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self._ttft = self._histogram(
            "memserve_time_to_first_token_seconds", "Time from arrival to the first output token."
        )
        self._itl = self._histogram(
            "memserve_inter_token_latency_seconds", "Time between consecutive output tokens."
        )
        self._e2e = self._histogram(
            "memserve_e2e_request_latency_seconds", "Time from arrival to the final output."
        )
        self.registry.register(_SnapshotCollector(snapshot))

    def add_transfer_counters(self, counters: Callable[[], Any]) -> None:
        """Expose a ``TransferCounters`` (read at scrape time) as ``memserve_kv_transfer_*``."""
        self.registry.register(_TransferCollector(counters))

    def _histogram(self, name: str, documentation: str) -> prometheus_client.Histogram:
        return prometheus_client.Histogram(
            name, documentation, registry=self.registry, buckets=LATENCY_BUCKETS_S
        )

    def observe_ttft(self, s: float) -> None:
        self._ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        self._itl.observe(s)

    def observe_e2e(self, s: float) -> None:
        self._e2e.observe(s)

    def render(self) -> bytes:
        """All metrics in Prometheus text format (serve with ``CONTENT_TYPE``)."""
        return prometheus_client.generate_latest(self.registry)


class _SnapshotCollector(Collector):
    """Turns one ``EngineSnapshot`` per scrape into metric families."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        tiers = {"device": snap.device, "dram": snap.dram}
        yield GaugeMetricFamily(
            "memserve_num_requests_running", "Requests being scheduled.", snap.num_running
        )
        yield GaugeMetricFamily(
            "memserve_num_requests_waiting", "Requests queued, not yet running.", snap.num_waiting
        )
        blocks = GaugeMetricFamily(
            "memserve_kv_blocks", "KV blocks by tier and state.", labels=["tier", "state"]
        )
        blocks_total = GaugeMetricFamily(
            "memserve_kv_blocks_total", "KV blocks in the tier.", labels=["tier"]
        )
        hits = _counter("memserve_prefix_cache_hit_tokens", "Prompt tokens served from the cache.")
        evicted = _counter("memserve_kv_evicted_blocks", "Cached blocks dropped from the tier.")
        for name, tier in tiers.items():
            blocks.add_metric([name, "free"], tier.blocks_free)
            blocks.add_metric([name, "active"], tier.blocks_active)
            blocks.add_metric([name, "historical"], tier.blocks_historical)
            blocks_total.add_metric([name], tier.blocks_total)
            hits.add_metric([name], tier.prefix_hit_tokens)
            evicted.add_metric([name], tier.evicted_blocks)
        yield from (blocks, blocks_total, hits, evicted)
        yield CounterMetricFamily(
            "memserve_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache.",
            snap.prefix_query_tokens,
        )
        yield CounterMetricFamily(
            "memserve_prompt_tokens_computed",
            "Prompt tokens prefilled (not served from the cache).",
            snap.prompt_tokens_computed,
        )
        swaps = CounterMetricFamily(
            "memserve_kv_swap_blocks", "KV blocks moved between tiers.", labels=["direction"]
        )
        swaps.add_metric(["out"], snap.swap_out_blocks)  # device -> DRAM
        swaps.add_metric(["in"], snap.swap_in_blocks)  # DRAM -> device
        yield swaps
        yield CounterMetricFamily(
            "memserve_num_preemptions",
            "Requests preempted for lack of blocks.",
            snap.num_preemptions,
        )


class _TransferCollector(Collector):
    """KV transfers between instances: blocks, bytes and send calls (a ``TransferCounters``)."""

    def __init__(self, counters: Callable[[], Any]) -> None:
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        c = self._counters()
        blocks = CounterMetricFamily(
            "memserve_kv_transfer_blocks", "KV blocks moved to or from peers.", labels=["direction"]
        )
        blocks.add_metric(["sent"], c.sent_blocks)
        blocks.add_metric(["received"], c.received_blocks)
        num_bytes = CounterMetricFamily(
            "memserve_kv_transfer_bytes", "KV bytes moved to or from peers.", labels=["direction"]
        )
        num_bytes.add_metric(["sent"], c.sent_bytes)
        num_bytes.add_metric(["received"], c.received_bytes)
        yield from (blocks, num_bytes)
        yield CounterMetricFamily(
            "memserve_kv_transfer_send_calls", "Point-to-point send calls.", c.send_calls
        )
        yield CounterMetricFamily(
            "memserve_kv_transfer_failures", "Transfers that failed.", c.failed
        )
        yield CounterMetricFamily(
            "memserve_kv_transfer_exposed_seconds",
            "Prefill side: time from the end of a prefill to its KV being delivered.",
            c.exposed_seconds,
        )
        yield CounterMetricFamily(
            "memserve_kv_transfer_exposed_transfers",
            "Prefill side: transfers timed in memserve_kv_transfer_exposed_seconds.",
            c.exposed_transfers,
        )


def _counter(name: str, documentation: str) -> CounterMetricFamily:
    """A counter family labelled by tier (exposed as ``<name>_total``)."""
    return CounterMetricFamily(name, documentation, labels=["tier"])
