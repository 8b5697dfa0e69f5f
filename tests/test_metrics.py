"""``EngineMetrics`` on fixed snapshots, and ``GET /metrics`` over a fake engine (real HTTP)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator

import prometheus_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import NUM_DEVICE_BLOCKS, NUM_DRAM_BLOCKS, FakeEngine
from memserve.metrics import CONTENT_TYPE, EngineMetrics, EngineSnapshot, TierSnapshot
from memserve.model.tokenizer import Tokenizer
from memserve.server.openai_api import build_app

Client = TestClient[web.Request, web.Application]
SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels

# Every field a different value, so a field exposed under the wrong name or label shows.
SNAPSHOT = EngineSnapshot(
    num_running=1,
    num_waiting=2,
    device=TierSnapshot(100, 3, 4, 5, 6, 7),
    dram=TierSnapshot(200, 8, 9, 10, 11, 12),
    prefix_query_tokens=13,
    prompt_tokens_computed=14,
    swap_out_blocks=15,
    swap_in_blocks=16,
    num_preemptions=17,
)

FAMILY_TYPES = {
    "memserve_time_to_first_token_seconds": "histogram",
    "memserve_inter_token_latency_seconds": "histogram",
    "memserve_e2e_request_latency_seconds": "histogram",
    "memserve_num_requests_running": "gauge",
    "memserve_num_requests_waiting": "gauge",
    "memserve_kv_blocks": "gauge",
    "memserve_kv_blocks_total": "gauge",
    # The parser names a counter family without its samples' _total suffix.
    "memserve_prefix_cache_query_tokens": "counter",
    "memserve_prefix_cache_hit_tokens": "counter",
    "memserve_prompt_tokens_computed": "counter",
    "memserve_kv_swap_blocks": "counter",
    "memserve_kv_evicted_blocks": "counter",
    "memserve_num_preemptions": "counter",
}


def expected_samples(snap: EngineSnapshot) -> dict[SampleKey, float]:
    """What the collector must expose for ``snap``, written out by hand."""
    samples: dict[SampleKey, float] = {
        ("memserve_num_requests_running", ()): snap.num_running,
        ("memserve_num_requests_waiting", ()): snap.num_waiting,
        ("memserve_prefix_cache_query_tokens_total", ()): snap.prefix_query_tokens,
        ("memserve_prompt_tokens_computed_total", ()): snap.prompt_tokens_computed,
        ("memserve_kv_swap_blocks_total", (("direction", "out"),)): snap.swap_out_blocks,
        ("memserve_kv_swap_blocks_total", (("direction", "in"),)): snap.swap_in_blocks,
        ("memserve_num_preemptions_total", ()): snap.num_preemptions,
    }
    for name, tier in (("device", snap.device), ("dram", snap.dram)):
        by_tier = (("tier", name),)
        for state, value in (
            ("free", tier.blocks_free),
            ("active", tier.blocks_active),
            ("historical", tier.blocks_historical),
        ):
            samples["memserve_kv_blocks", (("state", state), ("tier", name))] = value
        samples["memserve_kv_blocks_total", by_tier] = tier.blocks_total
        samples["memserve_prefix_cache_hit_tokens_total", by_tier] = tier.prefix_hit_tokens
        samples["memserve_kv_evicted_blocks_total", by_tier] = tier.evicted_blocks
    return samples


def parse(text: str) -> tuple[dict[str, str], dict[SampleKey, float]]:
    """Family name -> type, and every sample's value."""
    families = list(text_string_to_metric_families(text))
    types = {f.name: f.type for f in families}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return types, samples


def assert_snapshot_exposed(text: str, snap: EngineSnapshot) -> dict[SampleKey, float]:
    types, samples = parse(text)
    assert {name: types.get(name) for name in FAMILY_TYPES} == FAMILY_TYPES
    expected = expected_samples(snap)
    assert {key: samples.get(key) for key in expected} == expected
    return samples


def histogram_count(samples: dict[SampleKey, float], name: str) -> float:
    return samples[f"{name}_count", ()]


def test_render_exposes_every_family_from_the_snapshot() -> None:
    assert_snapshot_exposed(EngineMetrics(lambda: SNAPSHOT).render().decode(), SNAPSHOT)


def test_snapshot_is_taken_at_each_scrape_only() -> None:
    snapshots = [SNAPSHOT, dataclasses.replace(SNAPSHOT, num_preemptions=99)]
    calls: list[int] = []

    def snapshot() -> EngineSnapshot:
        calls.append(1)
        return snapshots[len(calls) - 1]

    metrics = EngineMetrics(snapshot)
    assert calls == []  # not at construction: the engine may build it before its state exists
    first = assert_snapshot_exposed(metrics.render().decode(), snapshots[0])
    second = assert_snapshot_exposed(metrics.render().decode(), snapshots[1])
    assert len(calls) == 2
    key: SampleKey = ("memserve_num_preemptions_total", ())
    assert (first[key], second[key]) == (17, 99)


def test_histograms_count_observations_in_seconds() -> None:
    metrics = EngineMetrics(lambda: SNAPSHOT)
    for seconds in (0.0005, 0.002, 3.0):
        metrics.observe_ttft(seconds)
    metrics.observe_itl(0.02)
    _, samples = parse(metrics.render().decode())
    ttft = "memserve_time_to_first_token_seconds"
    assert histogram_count(samples, ttft) == 3
    assert samples[f"{ttft}_sum", ()] == pytest.approx(3.0025)
    assert samples[f"{ttft}_bucket", (("le", "0.001"),)] == 1
    assert samples[f"{ttft}_bucket", (("le", "0.005"),)] == 2
    assert samples[f"{ttft}_bucket", (("le", "100.0"),)] == 3
    assert histogram_count(samples, "memserve_inter_token_latency_seconds") == 1
    assert histogram_count(samples, "memserve_e2e_request_latency_seconds") == 0


def test_observations_from_other_threads_while_rendering() -> None:
    metrics = EngineMetrics(lambda: SNAPSHOT)

    def observe() -> None:
        for _ in range(2000):
            metrics.observe_itl(0.01)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        parse(metrics.render().decode())  # must parse mid-update
    for thread in threads:
        thread.join()
    _, samples = parse(metrics.render().decode())
    assert histogram_count(samples, "memserve_inter_token_latency_seconds") == 8000


def test_each_engine_has_its_own_registry() -> None:
    first, second = EngineMetrics(lambda: SNAPSHOT), EngineMetrics(lambda: SNAPSHOT)
    first.observe_e2e(1.0)
    _, samples = parse(second.render().decode())
    assert histogram_count(samples, "memserve_e2e_request_latency_seconds") == 0
    assert b"memserve_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# --- GET /metrics -------------------------------------------------------------------------------


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(Tokenizer.dummy(), model_name="fake-model", max_model_len=64)


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(engine))) as test_client:
        yield test_client


async def scrape(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE
    return await response.text()


async def test_metrics_endpoint_serves_the_engine_snapshot(
    client: Client, engine: FakeEngine
) -> None:
    engine.num_cached_tokens, engine.num_cached_tokens_dram = 3, 1
    body = {"model": "fake-model", "prompt": [[100, 101, 102, 103], [200] * 6], "max_tokens": 5}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 200
    samples = assert_snapshot_exposed(await scrape(client), engine.snapshot())
    assert samples["memserve_prefix_cache_query_tokens_total", ()] == 10
    assert samples["memserve_prefix_cache_hit_tokens_total", (("tier", "device"),)] == 4
    assert samples["memserve_prefix_cache_hit_tokens_total", (("tier", "dram"),)] == 2
    assert samples["memserve_prompt_tokens_computed_total", ()] == 4
    assert samples["memserve_kv_blocks_total", (("tier", "device"),)] == NUM_DEVICE_BLOCKS
    assert samples["memserve_kv_blocks_total", (("tier", "dram"),)] == NUM_DRAM_BLOCKS
    assert histogram_count(samples, "memserve_time_to_first_token_seconds") == 2
    assert histogram_count(samples, "memserve_inter_token_latency_seconds") == 8
    assert histogram_count(samples, "memserve_e2e_request_latency_seconds") == 2


async def test_metrics_endpoint_counts_running_requests(client: Client, engine: FakeEngine) -> None:
    engine.token_delay_s = 0.01
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 20, "stream": True}
    running: SampleKey = ("memserve_num_requests_running", ())
    async with client.post("/v1/completions", json=body) as response:
        assert (await response.content.readline()).startswith(b"data: ")
        assert parse(await scrape(client))[1][running] == 1
        await response.read()
    assert parse(await scrape(client))[1][running] == 0
