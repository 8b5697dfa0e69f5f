"""The scheduler's ``/metrics``: routing decisions, prefix hits per instance type, transfers, and
each instance's last reported load (Prometheus text format, a registry of its own).

- ``memserve_router_decisions_total{policy, plan}``: ``plan`` is ``colocated``, ``pd`` or
  ``pd_move`` / ``colocated_move`` (a KV move was chosen before the prefill).
- ``memserve_router_prompt_tokens_total{role}`` / ``memserve_router_cached_prompt_tokens_total
  {role}`` and the gauge ``memserve_router_prefix_hit_rate{role}`` (their ratio): prompt tokens
  routed to prefilling instances of ``role`` (``colocated`` or ``prefill``), and of those, the
  ones whose prefill was skipped (the instance's ``cached_tokens``).
- ``memserve_router_kv_moved_tokens_total``: tokens of KV moved on the scheduler's order;
  ``memserve_instance_kv_transfer_bytes{instance}``: each instance's own transfer volume (sent +
  received, from its heartbeats); ``memserve_cluster_kv_transfer_bytes``: their sum.
- ``memserve_router_redispatched_total``, ``memserve_router_failed_requests_total{reason}``,
  ``memserve_router_instances_dropped_total``, ``memserve_router_requests_total{finish_reason}``.
- Per instance (last heartbeat): ``memserve_instance_{running,waiting,pending_prefill_tokens,
  inflight,queued_seconds}`` and ``memserve_instance_kv_blocks{instance, tier, state}``.
"""

from __future__ import annotations

from collections.abc import Iterable

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memserve.engine.types import RequestOutput
from memserve.scheduler.registry import InstanceTable
from memserve.scheduler.types import Route


class RouterMetrics:
    def __init__(self, table: InstanceTable) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.decisions = prometheus_client.Counter(
            "memserve_router_decisions", "Routing decisions.", ["policy", "plan"], registry=r
        )
        self.prompt_tokens = prometheus_client.Counter(
            "memserve_router_prompt_tokens",
            "Prompt tokens routed to prefilling instances, by their role.",
            ["role"],
            registry=r,
        )
        self.cached_tokens = prometheus_client.Counter(
            "memserve_router_cached_prompt_tokens",
            "Routed prompt tokens whose prefill was skipped (cache hits), by instance role.",
            ["role"],
            registry=r,
        )
        self.moved_tokens = prometheus_client.Counter(
            "memserve_router_kv_moved_tokens",
            "Tokens of KV moved on the router's order.",
            registry=r,
        )
        self.failed_moves = prometheus_client.Counter(
            "memserve_router_kv_move_failures", "KV moves that failed (recomputed).", registry=r
        )
        self.redispatched = prometheus_client.Counter(
            "memserve_router_redispatched", "Requests offered to another instance.", registry=r
        )
        self.failed = prometheus_client.Counter(
            "memserve_router_failed_requests", "Requests that failed.", ["reason"], registry=r
        )
        self.dropped = prometheus_client.Counter(
            "memserve_router_instances_dropped",
            "Instances dropped (silent or restarted).",
            registry=r,
        )
        self.requests = prometheus_client.Counter(
            "memserve_router_requests", "Finished requests.", ["finish_reason"], registry=r
        )
        self._hits: dict[str, list[int]] = {}  # role -> [prompt tokens, cached tokens]
        r.register(_TableCollector(table, self._hits))

    def decision(self, policy: str, route: Route) -> None:
        plan = "colocated" if route.prefill_id is None else "pd"
        if route.move_from is not None:
            plan += "_move"
        self.decisions.labels(policy, plan).inc()

    def prompt(self, role: str, num_prompt: int, num_cached: int) -> None:
        self.prompt_tokens.labels(role).inc(num_prompt)
        self.cached_tokens.labels(role).inc(num_cached)
        totals = self._hits.setdefault(role, [0, 0])
        totals[0] += num_prompt
        totals[1] += num_cached

    def finished(self, out: RequestOutput) -> None:
        self.requests.labels(out.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _TableCollector(Collector):
    def __init__(self, table: InstanceTable, hits: dict[str, list[int]]) -> None:
        self._table = table
        self._hits = hits

    def collect(self) -> Iterable[Metric]:
        labels = ["instance", "role"]
        gauges = {
            name: GaugeMetricFamily(f"memserve_instance_{name}", doc, labels=labels)
            for name, doc in (
                ("running", "Running requests (last heartbeat)."),
                ("waiting", "Waiting requests (last heartbeat)."),
                ("pending_prefill_tokens", "Prompt tokens not yet computed (last heartbeat)."),
                ("inflight", "Requests the scheduler has in flight there."),
                ("queued_seconds", "Predicted prefill seconds dispatched there, not started."),
                ("kv_transfer_bytes", "KV bytes the instance sent and received."),
            )
        }
        blocks = GaugeMetricFamily(
            "memserve_instance_kv_blocks",
            "KV blocks by tier and state (last heartbeat).",
            labels=["instance", "tier", "state"],
        )
        total_bytes = 0
        for i in self._table.instances.values():
            key = [i.instance_id, i.role]
            gauges["running"].add_metric(key, i.load.running)
            gauges["waiting"].add_metric(key, i.load.waiting)
            gauges["pending_prefill_tokens"].add_metric(key, i.load.pending_prefill_tokens)
            gauges["inflight"].add_metric(key, i.inflight)
            gauges["queued_seconds"].add_metric(key, max(0.0, i.queued_s))
            gauges["kv_transfer_bytes"].add_metric(key, i.transfer_bytes)
            total_bytes += i.transfer_bytes
            for tier_name, tier in (("device", i.load.device), ("dram", i.load.dram)):
                for state in ("free", "active", "historical"):
                    blocks.add_metric([i.instance_id, tier_name, state], getattr(tier, state))
        yield from gauges.values()
        yield blocks
        yield GaugeMetricFamily(
            "memserve_cluster_kv_transfer_bytes",
            "KV bytes moved between instances (sum of the instances' own counters).",
            total_bytes,
        )
        rate = GaugeMetricFamily(
            "memserve_router_prefix_hit_rate",
            "Cached / routed prompt tokens, by prefilling instance role.",
            labels=["role"],
        )
        for role, (num_prompt, num_cached) in self._hits.items():
            rate.add_metric([role], num_cached / num_prompt if num_prompt else 0.0)
        yield rate
