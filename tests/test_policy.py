"""Routing policies on real ``GlobalPromptTree``s, a load table of ``InstanceView``s and an
analytic cost model: prefix holders win at equal load and lose to their queue, a shared-prefix
flood spreads, P/D pairs price transfer and decode load, KV moves are taken only when cheap,
and prompt_tree's choice matches a brute-force reference over every plan."""

from __future__ import annotations

import heapq
import importlib.util
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from memserve.scheduler.policy import POLICIES, SessionPolicy, make_policy
from memserve.scheduler.types import (
    InstanceView,
    Load,
    NoInstanceError,
    Route,
    RouteRequest,
    Trees,
)
from memserve.tree.global_tree import GlobalPromptTree

BS = 16
DOC = list(range(1000, 1000 + 2048))  # 128 blocks
QUESTION = list(range(9000, 9100))  # 100 tokens: the prompt is DOC + QUESTION
X = len(DOC) + len(QUESTION)


class FakeCost:
    """Seconds: prefill linear + quadratic in the new tokens plus a constant; a decode step
    affine in batch and context; transfer ``per_token_s`` a token plus a latency."""

    def __init__(self, per_token_s: float = 1e-6) -> None:
        self.per_token_s = per_token_s

    def prefill_time(self, num_tokens: int, num_cached: int) -> float:
        x, y = num_tokens, num_cached
        return 1e-4 * (x - y) + 1e-8 * (x * x - y * y) / 2 + 1e-3

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return 1e-3 + 1e-5 * batch + 1e-9 * context_tokens

    def transfer_time(self, num_tokens: int) -> float:
        return 1e-4 + self.per_token_s * num_tokens


COST = FakeCost()


def view(
    instance_id: str, queued_s: float = 0.0, inflight: int = 0, running: int = 0, pending: int = 0
) -> InstanceView:
    role = {"c": "colocated", "p": "prefill", "d": "decode"}[instance_id[0]]
    load = Load(running=running, pending_prefill_tokens=pending)
    return InstanceView(instance_id, role, load, queued_s, inflight)


def new_trees() -> dict[str, GlobalPromptTree]:
    return {role: GlobalPromptTree(BS, ttl_s=1e6) for role in ("colocated", "prefill", "decode")}


def choose(
    name: str, instances: Sequence[InstanceView], trees: Trees, tokens: Sequence[int] = (),
    cost: FakeCost = COST, session: str | None = None,
) -> Route:  # fmt: skip
    request = RouteRequest(list(tokens) or DOC + QUESTION, session=session)
    return make_policy(name, cost).choose(request, instances, trees, 1.0)


def decode_s(requests: int, x: int = X) -> float:
    """decode_s for a decoder with ``requests`` requests (the fake step is affine)."""
    return COST.decode_step_time(requests + 1, (requests + 1) * x)


# ---- prompt_tree, colocated ---------------------------------------------------------------------


def test_prompt_tree_picks_the_prefix_holder_at_equal_load() -> None:
    trees = new_trees()
    trees["colocated"].insert(DOC, "c2", 0.0)
    route = choose("prompt_tree", [view(f"c{i}") for i in range(4)], trees)
    assert (route.instance_id, route.prefill_id, route.move_from) == ("c2", None, None)
    prefill_s = COST.prefill_time(X, 2048)
    assert route.predicted_prefill_s == pytest.approx(prefill_s)
    assert route.cost["cached_tokens"] == 2048 and route.cost["queue_s"] == 0
    assert route.cost["total_s"] == pytest.approx(prefill_s + decode_s(0))


def test_prompt_tree_ties_go_to_fewer_inflight_then_lower_id() -> None:
    trees = new_trees()
    views = [view("c0", inflight=2), view("c1", running=2), view("c2", running=2)]
    assert choose("prompt_tree", views, trees).instance_id == "c1"  # same requests, 0 inflight
    assert choose("prompt_tree", views[::-1], trees).instance_id == "c1"  # order does not matter


def test_prompt_tree_avoids_a_holder_whose_queue_makes_it_slower() -> None:
    trees = new_trees()
    trees["colocated"].insert(DOC, "c1", 0.0)
    # The holder saves prefill_time(X, 0) - prefill_time(X, 2048) = 0.2258 s of compute.
    saved = COST.prefill_time(X, 0) - COST.prefill_time(X, 2048)
    assert saved == pytest.approx(0.2258, abs=1e-4)
    assert choose("prompt_tree", [view("c0"), view("c1", queued_s=0.2)], trees).instance_id == "c1"
    route = choose("prompt_tree", [view("c0"), view("c1", queued_s=0.25)], trees)
    assert route.instance_id == "c0" and route.cost["cached_tokens"] == 0
    # The heartbeat's pending tokens count too: 5000 tokens at prefill_time(X, 0) / X each.
    route = choose("prompt_tree", [view("c0"), view("c1", pending=5000)], trees)
    assert route.instance_id == "c0"
    holder_queue = choose("prompt_tree", [view("c1", pending=5000)], trees).cost["queue_s"]
    assert holder_queue == pytest.approx(5000 * COST.prefill_time(X, 0) / X)


class HolderPolicy:
    """Always the instance holding most of the prompt (the herding baseline)."""

    name = "holder"

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        held = trees["colocated"].match(request.tokens, now)
        best = min(instances, key=lambda v: (-held.get(v.instance_id, 0), v.instance_id))
        return Route(best.instance_id)


def flood(
    policy_name: str, num_requests: int = 600, rate: float = 200.0
) -> tuple[dict[str, int], float]:
    """A stream sharing a 4000-token prefix (held by c0 at the start), distinct 100-token
    suffixes, arriving every 1/rate s at 4 colocated instances. As the router does: each choice
    adds its prefill time to the instance's ``queued_s``, which drains in real time; a finished
    prompt enters the instance's tree. Returns (requests per instance, summed TTFT)."""
    trees = new_trees()
    tree, prefix = trees["colocated"], list(range(100_000, 104_000))
    tree.insert(prefix, "c0", 0.0)
    policy = make_policy(policy_name, COST) if policy_name != "holder" else HolderPolicy()
    queued = {f"c{i}": 0.0 for i in range(4)}
    counts = dict.fromkeys(queued, 0)
    done: list[tuple[float, str, list[int]]] = []  # (first token at, instance, prompt)
    ttft_sum, now = 0.0, 0.0
    for i in range(num_requests):
        step, now = i / rate - now, i / rate
        queued = {k: max(0.0, q - step) for k, q in queued.items()}
        while done and done[0][0] <= now:
            at, instance_id, tokens = heapq.heappop(done)
            tree.insert(tokens, instance_id, at)
        tokens = prefix + [200_000 + 100 * i + j for j in range(100)]
        views = [InstanceView(k, "colocated", queued_s=q) for k, q in queued.items()]
        chosen = policy.choose(RouteRequest(tokens), views, trees, now).instance_id
        queued[chosen] += COST.prefill_time(len(tokens), tree.match(tokens, now).get(chosen, 0))
        counts[chosen] += 1
        ttft_sum += queued[chosen]
        heapq.heappush(done, (now + queued[chosen], chosen, tokens))
    return counts, ttft_sum


def test_a_shared_prefix_flood_spreads_instead_of_herding() -> None:
    counts, ttft = flood("prompt_tree")
    _, ttft_holder = flood("holder")
    # One holder serves ~66 requests/s (15 ms each), 200/s need all four. The others join
    # once c0's queue outweighs a full prefill (0.5 s), and hold the prefix after it: c0 takes
    # the first ~100 requests alone (got 234 of 600, the others 122 each), then all share.
    assert all(n >= 0.15 * 600 for n in counts.values()), counts
    assert max(counts.values()) <= 0.45 * 600, counts
    assert ttft < ttft_holder / 3, (ttft / 600, ttft_holder / 600)  # got 0.78 s against 3.0 s


# ---- prompt_tree, P/D and KV moves --------------------------------------------------------------


def test_pd_prefers_the_decode_instance_holding_the_conversation() -> None:
    trees = new_trees()
    trees["decode"].insert(DOC, "d1", 0.0)
    views = [view("p0"), view("p1"), view("d0"), view("d1")]
    route = choose("prompt_tree", views, trees, cost=FakeCost(per_token_s=1e-3))  # dear transfer
    assert (route.instance_id, route.prefill_id, route.move_from) == ("d1", "p0", None)
    assert route.cost["transfer_s"] == pytest.approx(1e-4 + 1e-3 * 100)  # only what d1 lacks
    # Its decode load outweighs the transfer it saves (2.048 s) only past ~170,000 requests.
    busy = [view("p0"), view("d0"), view("d1", running=200)]
    assert choose("prompt_tree", busy, trees, cost=FakeCost(per_token_s=1e-3)).instance_id == "d1"
    busy = [view("p0"), view("d0"), view("d1", running=200_000)]
    assert choose("prompt_tree", busy, trees, cost=FakeCost(per_token_s=1e-3)).instance_id == "d0"


def test_pd_moves_kv_from_the_decode_instance_when_cheap() -> None:
    trees = new_trees()
    trees["decode"].insert(DOC, "d1", 0.0)
    route = choose("prompt_tree", [view("p0"), view("d0"), view("d1")], trees)
    assert (route.instance_id, route.prefill_id) == ("d1", "p0")
    assert (route.move_from, route.move_tokens) == ("d1", 2048)
    move_s = COST.transfer_time(2048)
    assert route.predicted_prefill_s == pytest.approx(move_s + COST.prefill_time(X, 2048))
    assert route.cost["move_s"] == pytest.approx(move_s)
    assert route.cost["transfer_s"] == pytest.approx(COST.transfer_time(100))


def test_kv_move_taken_when_cheap_refused_when_dear() -> None:
    trees = new_trees()
    trees["prefill"].insert(DOC, "p0", 0.0)
    views = [view("p0", queued_s=1.0), view("p1"), view("d0")]
    cheap = choose("prompt_tree", views, trees, cost=FakeCost(per_token_s=1e-6))
    assert (cheap.prefill_id, cheap.move_from, cheap.move_tokens) == ("p1", "p0", 2048)
    assert cheap.cost["cached_tokens"] == 2048 and cheap.cost["queue_s"] == 0
    # 2048 tokens at 0.2 ms each cost 0.41 s, more than the 0.226 s of compute they save.
    dear = choose("prompt_tree", views, trees, cost=FakeCost(per_token_s=2e-4))
    assert (dear.prefill_id, dear.move_from, dear.move_tokens) == ("p1", None, 0)
    assert dear.predicted_prefill_s == pytest.approx(COST.prefill_time(X, 0))
    # The holder itself never moves KV to itself, and colocated instances never move.
    assert choose("prompt_tree", views[:1] + views[2:], trees).move_from is None
    trees["colocated"].insert(DOC, "c0", 0.0)
    route = choose("prompt_tree", [view("c0", queued_s=1.0), view("c1")], trees)
    assert (route.instance_id, route.move_from) == ("c1", None)


def test_only_live_instances_are_kv_move_sources() -> None:
    trees = new_trees()
    trees["prefill"].insert(DOC, "p9", 0.0)  # p9 left; the tree still believes it holds DOC
    route = choose("prompt_tree", [view("p0"), view("d0")], trees)
    assert (route.prefill_id, route.move_from, route.cost["cached_tokens"]) == ("p0", None, 0)


class CountingTree(GlobalPromptTree):
    matches = 0

    def match(self, tokens: Sequence[int], now: float) -> dict[str, int]:
        CountingTree.matches += 1
        return super().match(tokens, now)


def test_each_tree_is_matched_once_per_decision() -> None:
    views = [view(f"p{i:02}") for i in range(32)] + [view(f"d{i:02}") for i in range(32)]
    separate = {role: CountingTree(BS) for role in ("colocated", "prefill", "decode")}
    CountingTree.matches = 0
    choose("prompt_tree", views, separate)
    assert CountingTree.matches == 2  # prefill and decode; no colocated instance, no match
    shared = CountingTree(BS)  # one tree for every role: instance ids are unique across roles
    shared.insert(DOC, "d05", 0.0)
    CountingTree.matches = 0
    route = choose("prompt_tree", views, dict.fromkeys(("colocated", "prefill", "decode"), shared))
    assert CountingTree.matches == 1
    assert (route.instance_id, route.move_from) == ("d05", "d05")


def test_mixed_colocated_and_pd() -> None:
    trees = new_trees()
    views = [view("c0"), view("p0"), view("d0")]
    route = choose("prompt_tree", views, trees)  # a pair pays the transfer on top
    assert (route.instance_id, route.prefill_id) == ("c0", None)
    busy = [view("c0", queued_s=1.0), view("p0"), view("d0")]
    route = choose("prompt_tree", busy, trees)
    assert (route.instance_id, route.prefill_id) == ("d0", "p0")
    total = COST.prefill_time(X, 0) + COST.transfer_time(X) + decode_s(0)
    assert route.cost["total_s"] == pytest.approx(total)
    assert [choose("least_load", v, trees).instance_id for v in (views, busy)] == ["c0", "c0"]
    rr = make_policy("round_robin", COST)
    picks = [rr.choose(RouteRequest(DOC), views, trees, 1.0) for _ in range(4)]
    assert [(r.instance_id, r.prefill_id) for r in picks] == [
        ("c0", None), ("d0", "p0"), ("c0", None), ("d0", "p0")
    ]  # fmt: skip


def reference_total(
    plan: tuple[str, str | None], views: list[InstanceView], held: dict[str, int]
) -> float:
    """The documented formula for one plan, computed directly (``held``: by instance id)."""
    by_id = {v.instance_id: v for v in views}
    d, p = by_id[plan[0]], by_id[plan[1] or plan[0]]

    def requests(v: InstanceView) -> int:
        return max(v.inflight, v.load.running + v.load.waiting)

    queue_s = max(p.queued_s, p.load.pending_prefill_tokens * COST.prefill_time(X, 0) / X)
    y_p = held.get(p.instance_id, 0)
    exec_s = COST.prefill_time(X, y_p)
    if p.role == "prefill":
        sources = [
            held.get(v.instance_id, 0) for v in views if v.role != "colocated" and v is not p
        ]
        y_s = max(sources, default=0)
        move_s = COST.transfer_time(y_s - y_p)
        if y_s > y_p and move_s < exec_s - COST.prefill_time(X, y_s):
            exec_s = move_s + COST.prefill_time(X, y_s)
    transfer_s = COST.transfer_time(X - held.get(d.instance_id, 0)) if d.role == "decode" else 0
    return queue_s + exec_s + transfer_s + decode_s(requests(d))


@pytest.mark.parametrize("seed", range(40))
def test_prompt_tree_matches_a_brute_force_over_every_plan(seed: int) -> None:
    rng = random.Random(seed)
    ids = [
        f"{kind}{i}"
        for kind, lo in (("c", 0), ("p", 1), ("d", 1))
        for i in range(rng.randrange(lo, 4))
    ]
    views = [
        view(i, queued_s=rng.choice([0.0, 0.1, 0.3]), inflight=rng.randrange(3),
             running=rng.randrange(3), pending=rng.choice([0, 0, 1000]))
        for i in ids
    ]  # fmt: skip
    trees, held = new_trees(), {}
    for v in views:
        if rng.random() < 0.5:
            held[v.instance_id] = rng.randrange(1, len(DOC) // BS + 1) * BS
            trees[v.role].insert(DOC[: held[v.instance_id]], v.instance_id, 0.0)
    plans: list[tuple[str, str | None]] = [(i, None) for i in ids if i[0] == "c"]
    plans += [(d, p) for d in ids if d[0] == "d" for p in ids if p[0] == "p"]
    totals = {plan: reference_total(plan, views, held) for plan in plans}
    route = choose("prompt_tree", views, trees)
    assert route.cost["total_s"] == pytest.approx(min(totals.values()), rel=1e-9)
    assert totals[(route.instance_id, route.prefill_id)] == pytest.approx(min(totals.values()))


# ---- baselines ---------------------------------------------------------------------------------


def test_round_robin_cycles_in_id_order_across_joins_and_leaves() -> None:
    trees = new_trees()
    rr = make_policy("round_robin", COST)
    views = [view("c2"), view("c0"), view("c1")]
    picks = [rr.choose(RouteRequest(DOC), views, trees, 1.0).instance_id for _ in range(4)]
    assert picks == ["c0", "c1", "c2", "c0"]
    picks = [rr.choose(RouteRequest(DOC), views[:2], trees, 1.0).instance_id for _ in range(3)]
    assert picks == ["c2", "c0", "c2"]  # c1 left: the cycle goes on after c0
    pd = [view("p0"), view("p1"), view("d0"), view("d1"), view("d2")]
    rr = make_policy("round_robin", COST)
    pairs = [rr.choose(RouteRequest(DOC), pd, trees, 1.0) for _ in range(4)]
    assert [(r.prefill_id, r.instance_id) for r in pairs] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d2"), ("p1", "d0")
    ]  # fmt: skip


def test_baselines_price_their_choice_with_the_tree() -> None:
    trees = new_trees()
    trees["colocated"].insert(DOC, "c0", 0.0)
    route = choose("round_robin", [view("c0"), view("c1")], trees)
    assert route.instance_id == "c0" and route.cost["cached_tokens"] == 2048
    assert route.predicted_prefill_s == pytest.approx(COST.prefill_time(X, 2048))


def test_least_load_picks_the_least_loaded() -> None:
    trees = new_trees()
    views = [view("c0", running=3), view("c1", inflight=2), view("c2", running=1, inflight=2)]
    assert choose("least_load", views, trees).instance_id == "c1"  # 2 requests, less queued_s
    views[1] = view("c1", inflight=2, queued_s=0.5)
    assert choose("least_load", views, trees).instance_id == "c2"
    pd = [view("p0", queued_s=0.2), view("p1", queued_s=0.1, running=5), view("d0", running=4),
          view("d1", running=2, inflight=3)]  # fmt: skip
    route = choose("least_load", pd, trees)
    assert (route.prefill_id, route.instance_id) == ("p1", "d1")


def test_session_sticks_while_its_instances_live_then_falls_back() -> None:
    trees = new_trees()
    policy = SessionPolicy(COST, max_sessions=2)

    def pick(session: str | None, views: list[InstanceView]) -> str:
        return policy.choose(RouteRequest(DOC, session=session), views, trees, 1.0).instance_id

    assert pick("a", [view("c0", running=5), view("c1"), view("c2", running=1)]) == "c1"
    assert pick("a", [view("c0"), view("c1", running=9), view("c2")]) == "c1"  # sticky
    assert pick("a", [view("c0", running=2), view("c2")]) == "c2"  # c1 died: least load
    assert pick("a", [view("c0"), view("c1"), view("c2", running=9)]) == "c2"  # and sticks
    assert pick(None, [view("c0", running=1), view("c1"), view("c2")]) == "c1"  # no session
    assert pick("b", [view("c0"), view("c1", running=1), view("c2", running=1)]) == "c0"
    assert pick("c", [view("c0", running=1), view("c1"), view("c2", running=1)]) == "c1"
    # Three sessions in a map of two: "a", the least recently used, was forgotten.
    assert pick("a", [view("c0", running=1), view("c1"), view("c2")]) == "c1"
    route = policy.choose(RouteRequest(DOC, session="p"), [view("p0"), view("d0")], trees, 1.0)
    assert (route.instance_id, route.prefill_id) == ("d0", "p0")
    route = policy.choose(RouteRequest(DOC, session="p"), [view("p1"), view("d0")], trees, 1.0)
    assert (route.instance_id, route.prefill_id) == ("d0", "p1")  # p0 died


@pytest.mark.parametrize("name", POLICIES)
def test_no_plan_raises(name: str) -> None:
    trees = new_trees()
    for views in ([], [view("p0")], [view("d0"), view("d1")]):
        with pytest.raises(NoInstanceError):
            choose(name, views, trees)
    with pytest.raises(ValueError, match="role"):
        choose(name, [view("c0"), InstanceView("x0", "router")], trees)
    assert make_policy(name, COST).name == name


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random", COST)


def test_routing_latency_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "routing_latency.py"
    spec = importlib.util.spec_from_file_location("routing_latency", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    rows = module.main(["--quick", "--json", str(out)])
    assert {(r.cluster, r.policy) for r in rows} == {
        (c, p) for c in ("colocated-64", "32P+32D", "mixed") for p in (*POLICIES, "match only")
    }
    assert all(0 < r.p50_us <= r.p99_us <= r.max_us for r in rows)
    assert all(r.cached_tokens >= 50_000 for r in rows) and out.exists()
