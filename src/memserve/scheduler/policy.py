"""Routing policies of the global scheduler (``--policy``): where each request runs.

A *plan* is one colocated instance, or a pair (prefill instance, decode instance); pairs exist
when at least one prefill and one decode instance are live. Every policy chooses among all plans
of the live instances it is given (``NoInstanceError`` when they make none; ``ValueError`` for an
unknown role). The router calls ``choose`` once per request on its event loop; a policy keeps
only its own small state. The router logs each decision at debug level with its cost terms.

Load measures (the router's own figures are fresh, the heartbeat's also see work from
elsewhere; taking the larger counts neither twice):

- ``requests(i) = max(inflight, load.running + load.waiting)``
- ``queue_s(i) = max(queued_s, load.pending_prefill_tokens * token_s)``, ``token_s =
  cost.prefill_time(x, 0) / x`` for this request's ``x`` prompt tokens.

Policies:

- ``round_robin``: a cycle visits each colocated instance once and ``max(#prefill, #decode)``
  pairs, whose prefill and decode instances each advance in their own cycle (in id order, from
  the last id chosen, so joins and leaves do not restart it).
- ``least_load``: the colocated instance with fewest ``requests`` (then least ``queued_s``), or
  the pair of the prefill instance with least ``(queued_s, pending_prefill_tokens, requests)``
  and the decode instance with fewest ``requests``. A pair counts as its busier member; ties go
  to the colocated instance, then to the lower id.
- ``session``: the plan of the session's previous request while its instances are live (an LRU
  map of ``max_sessions`` sessions); otherwise, and without a session id, least_load's.
- ``prompt_tree`` (default, MemServe's): least predicted time. ``y_i``: the tokens of the prompt
  that ``trees[role(i)].match`` says instance ``i`` holds; ``P``, ``D``: the plan's prefilling
  and decoding instances (both the colocated instance, or the pair's members)::

      total      = queue_s(P) + exec(P) + transfer_s(D) + decode_s(D)
      exec       = cost.prefill_time(x, y_P), or, moving KV from instance s:
                   cost.transfer_time(y_s - y_P) + cost.prefill_time(x, y_s)
      transfer_s = cost.transfer_time(x - y_D) for a decode instance (it lacks only that), else 0
      decode_s   = step(1) + requests(D) * (step(2) - step(1)), step(b) =
                   cost.decode_step_time(b, b * x): one step of D's batch with this request in
                   it, each sequence guessed x tokens long (exact for a step time affine in
                   batch and context, as a memory-bound decode step is)

  KV moves: for prefill instances only (colocated ones cannot move KV yet), from the live
  prefill or decode instance holding most of the prompt (the least loaded such instance per
  role, then the lower id), when ``y_s > y_P`` and the transfer costs less than the compute it
  saves. Ties in ``total`` go to fewer ``inflight``, then the lower id (a pair: the sum, then
  the decode id). ``Route.predicted_prefill_s = exec``; ``Route.cost`` holds every term.

  Cost: one match per tree (a tree shared by several roles is matched once), a pass over the
  instances with arithmetic only, then cost-model calls for a handful of candidates.
  ``total(p, d) = f(p) + g(d)``, so the best pair is the best prefill instance with the best
  decode instance: #P + #D terms, not #P x #D.

The other policies price their choice afterwards (one match of the prefilling role's tree), so
the router's ``queued_s`` means the same under every policy.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TypeVar

from memserve.scheduler.types import (
    INSTANCE_ROLES,
    CostModel,
    InstanceView,
    NoInstanceError,
    Policy,
    Route,
    RouteRequest,
    Trees,
)
from memserve.tree.global_tree import GlobalPromptTree

POLICIES = ("round_robin", "least_load", "session", "prompt_tree")


_Plan = tuple[str, str | None]  # (instance_id, prefill_id), as in ``Route``
_Exec = tuple[float, float, int, str | None]  # (move_s, prefill_s, cached tokens, move_from)
_T = TypeVar("_T")


def make_policy(name: str, cost: CostModel) -> Policy:
    """The policy called ``name`` (one of ``POLICIES``); ``ValueError`` for another name."""
    if name == "round_robin":
        return RoundRobinPolicy(cost)
    if name == "least_load":
        return LeastLoadPolicy(cost)
    if name == "session":
        return SessionPolicy(cost)
    if name == "prompt_tree":
        return PromptTreePolicy(cost)
    raise ValueError(f"unknown policy {name!r}, expected one of {', '.join(POLICIES)}")


# ---- shared ------------------------------------------------------------------------------------


def _check_roles(roles: set[str], num_instances: int) -> None:
    if not roles <= set(INSTANCE_ROLES):
        raise ValueError(f"unknown instance roles {sorted(roles - set(INSTANCE_ROLES))}")
    if "colocated" not in roles and not {"prefill", "decode"} <= roles:
        raise NoInstanceError(f"no plan among {num_instances} instances of roles {sorted(roles)}")


class _Live:
    """The live instances by role (at least one plan among them)."""

    __slots__ = ("colocated", "decode", "prefill")

    def __init__(self, instances: Sequence[InstanceView]) -> None:
        _check_roles({v.role for v in instances}, len(instances))
        self.colocated = [v for v in instances if v.role == "colocated"]
        self.prefill = [v for v in instances if v.role == "prefill"]
        self.decode = [v for v in instances if v.role == "decode"]

    @property
    def has_pairs(self) -> bool:
        return bool(self.prefill) and bool(self.decode)

    def serves(self, plan: _Plan) -> bool:
        instance_id, prefill_id = plan
        if prefill_id is None:
            return any(v.instance_id == instance_id for v in self.colocated)
        return any(v.instance_id == prefill_id for v in self.prefill) and any(
            v.instance_id == instance_id for v in self.decode
        )


def _requests(v: InstanceView) -> int:
    return max(v.inflight, v.load.running + v.load.waiting)


def _priced_route(
    policy: str, cost: CostModel, request: RouteRequest, trees: Trees, now: float, plan: _Plan
) -> Route:
    """The route for a plan chosen without the trees, its prefill priced (one tree match)."""
    instance_id, prefill_id = plan
    tree = trees.get("colocated" if prefill_id is None else "prefill")
    cached = tree.match(request.tokens, now).get(prefill_id or instance_id, 0) if tree else 0
    prefill_s = cost.prefill_time(len(request.tokens), cached)
    terms = {"prefill_s": prefill_s, "cached_tokens": cached, "prompt_tokens": len(request.tokens)}
    route = Route(instance_id, prefill_id, predicted_prefill_s=prefill_s, cost=terms)
    return route


# ---- baselines ---------------------------------------------------------------------------------


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self._turn = 0
        self._last = {"colocated": "", "prefill": "", "decode": ""}  # "" sorts first

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        live = _Live(instances)
        num_pair_turns = max(len(live.prefill), len(live.decode)) if live.has_pairs else 0
        turn = self._turn % (len(live.colocated) + num_pair_turns)
        self._turn += 1
        if turn < len(live.colocated):
            plan: _Plan = (self._next("colocated", live.colocated), None)
        else:
            plan = (self._next("decode", live.decode), self._next("prefill", live.prefill))
        return _priced_route(self.name, self.cost, request, trees, now, plan)

    def _next(self, role: str, views: list[InstanceView]) -> str:
        ids = sorted(v.instance_id for v in views)
        chosen = ids[bisect_right(ids, self._last[role]) % len(ids)]
        self._last[role] = chosen
        return chosen


class LeastLoadPolicy:
    name = "least_load"

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        plan = self.pick(_Live(instances))
        return _priced_route(self.name, self.cost, request, trees, now, plan)

    def pick(self, live: _Live) -> _Plan:
        best: tuple[int, int, str, _Plan] | None = None  # (requests, 0 colocated / 1 pair, id)
        if live.colocated:
            c = min(live.colocated, key=lambda v: (_requests(v), v.queued_s, v.instance_id))
            best = (_requests(c), 0, c.instance_id, (c.instance_id, None))
        if live.has_pairs:
            p = min(live.prefill, key=_prefill_load)
            d = min(live.decode, key=lambda v: (_requests(v), v.instance_id))
            pair = (
                max(_requests(p), _requests(d)),
                1,
                d.instance_id,
                (d.instance_id, p.instance_id),
            )
            best = pair if best is None or pair < best else best
        assert best is not None  # _Live holds a plan
        return best[3]


def _prefill_load(v: InstanceView) -> tuple[float, int, int, str]:
    return (v.queued_s, v.load.pending_prefill_tokens, _requests(v), v.instance_id)


class SessionPolicy:
    name = "session"

    def __init__(self, cost: CostModel, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be positive")
        self.cost = cost
        self.max_sessions = max_sessions
        self._least_load = LeastLoadPolicy(cost)
        self._plans: OrderedDict[str, _Plan] = OrderedDict()  # least recently used first

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        live = _Live(instances)
        session = request.session
        known = self._plans.get(session) if session is not None else None
        plan = known if known is not None and live.serves(known) else self._least_load.pick(live)
        if session is not None:
            self._plans[session] = plan
            self._plans.move_to_end(session)
            if len(self._plans) > self.max_sessions:
                self._plans.popitem(last=False)
        return _priced_route(self.name, self.cost, request, trees, now, plan)


# ---- prompt_tree -------------------------------------------------------------------------------


class PromptTreePolicy:
    name = "prompt_tree"

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        roles = {v.role for v in instances}
        _check_roles(roles, len(instances))
        pairs = "prefill" in roles and "decode" in roles
        wanted = {"colocated": "colocated" in roles, "prefill": pairs, "decode": pairs}
        scan = _Scan(_Prices(self.cost, len(request.tokens)), _match(trees, wanted, request, now))
        scan.run(instances)
        route = scan.route()
        return route


def _match(
    trees: Trees, wanted: dict[str, bool], request: RouteRequest, now: float
) -> dict[str, dict[str, int]]:
    """Per role, what each instance of it holds of the prompt ({} where not wanted or without a
    tree). A tree shared by several roles (instance ids are unique across roles) is matched once."""
    held: dict[str, dict[str, int]] = {}
    matched: list[tuple[GlobalPromptTree, dict[str, int]]] = []
    for role, want in wanted.items():
        tree = trees.get(role) if want else None
        if tree is None:
            held[role] = {}
            continue
        same = next((h for t, h in matched if t is tree), None)
        held[role] = same if same is not None else tree.match(request.tokens, now)
        matched.append((tree, held[role]))
    return held


class _Prices:
    """The cost model's answers for one request of ``x`` tokens, each asked once: three calls,
    plus one or two per distinct number of cached tokens among the candidates."""

    __slots__ = ("_prefill", "_transfer", "cost", "decode_base_s", "decode_slope_s", "token_s", "x")

    def __init__(self, cost: CostModel, x: int) -> None:
        self.cost, self.x = cost, x
        self._prefill: dict[int, float] = {}
        self._transfer: dict[int, float] = {}
        self.token_s = self.prefill(0) / max(x, 1)
        self.decode_base_s = cost.decode_step_time(1, x)
        self.decode_slope_s = cost.decode_step_time(2, 2 * x) - self.decode_base_s

    def prefill(self, cached: int) -> float:
        s = self._prefill.get(cached)
        if s is None:
            s = self._prefill[cached] = self.cost.prefill_time(self.x, cached)
        return s

    def transfer(self, num_tokens: int) -> float:
        s = self._transfer.get(num_tokens)
        if s is None:
            s = self._transfer[num_tokens] = self.cost.transfer_time(num_tokens)
        return s

    def queue(self, v: InstanceView) -> float:
        return max(v.queued_s, v.load.pending_prefill_tokens * self.token_s)

    def decode(self, v: InstanceView) -> float:
        return self.decode_base_s + _requests(v) * self.decode_slope_s

    def exec(self, cached: int, source: tuple[int, str]) -> _Exec:
        """Prefill with ``cached`` tokens here, or after moving the KV of the ``(tokens held,
        instance id)`` source if that costs less."""
        here = self.prefill(cached)
        held, source_id = source
        if held > cached:
            move_s, there = self.transfer(held - cached), self.prefill(held)
            if move_s < here - there:
                return move_s, there, held, source_id
        return 0.0, here, cached, None


class _Scan:
    """One pass over the live instances, then a handful priced in full.

    Instances of one role holding the same number of the prompt's tokens (most hold none) share
    every term but their load terms (prefill: ``queue_s``; decode: ``decode_s``; colocated: both),
    so only the least loaded of each such group can win. The pass keeps it, with arithmetic only;
    the kept ones are priced afterwards, the prefill ones once the KV-move source is known (for
    the group holding most, no move can help, so the source never moves KV to itself).
    """

    def __init__(self, prices: _Prices, held: dict[str, dict[str, int]]) -> None:
        self.prices = prices
        self.held = held
        # role -> cached tokens -> (load terms, instance)
        self.kept: dict[str, dict[int, tuple[float, InstanceView]]] = {
            role: {} for role in INSTANCE_ROLES
        }

    def run(self, instances: Sequence[InstanceView]) -> None:
        # The hot loop: plain statements (here a builtin call like max() costs as much as the
        # rest of an iteration).
        held, kept, prices = self.held, self.kept, self.prices
        token_s, base_s, slope_s = prices.token_s, prices.decode_base_s, prices.decode_slope_s
        for v in instances:
            role, load = v.role, v.load
            t = v.queued_s  # queue_s
            pending_s = load.pending_prefill_tokens * token_s
            if pending_s > t:
                t = pending_s
            if role != "prefill":
                n = load.running + load.waiting  # requests(v)
                if v.inflight > n:
                    n = v.inflight
                t = base_s + n * slope_s + (t if role == "colocated" else 0.0)
            group = kept[role]
            cached = held[role].get(v.instance_id, 0)
            best = group.get(cached)
            if best is None or t < best[0] or (t == best[0] and _fewer(v, best[1])):
                group[cached] = (t, v)

    def route(self) -> Route:
        """The best plan: the best colocated one against the best pair."""
        prices, x, kept = self.prices, self.prices.x, self.kept
        best: tuple[float, int, str, Route] | None = None
        c = _least((t + prices.prefill(y), v, y) for y, (t, v) in kept["colocated"].items())
        if c is not None:
            c_t, c_v, c_y = c
            route = _route(prices, c_v, None, (0.0, prices.prefill(c_y), c_y, None))
            best = (c_t, c_v.inflight, c_v.instance_id, route)
        d = _least((t + prices.transfer(x - y), v, y) for y, (t, v) in kept["decode"].items())
        p = _least(self._prefill_options())
        if d is not None and p is not None:
            (d_t, d_v, d_y), (p_t, p_v, p_exec) = d, p
            key = (p_t + d_t, p_v.inflight + d_v.inflight, d_v.instance_id)
            if best is None or key < best[:3]:
                best = (*key, _route(prices, d_v, p_v, p_exec, prices.transfer(x - d_y)))
        assert best is not None  # _check_roles found a plan
        return best[3]

    def _prefill_options(self) -> list[tuple[float, InstanceView, _Exec]]:
        holders = [
            (-y, v.instance_id)
            for role in ("prefill", "decode")
            for y, (_, v) in self.kept[role].items()
            if y
        ]
        minus_held, source_id = min(holders, default=(0, ""))
        options = []
        for y, (t, v) in self.kept["prefill"].items():
            e = self.prices.exec(y, (-minus_held, source_id))
            options.append((t + e[0] + e[1], v, e))
        return options


def _least(
    options: Iterable[tuple[float, InstanceView, _T]],
) -> tuple[float, InstanceView, _T] | None:
    """The option with the least time; ties to fewer inflight, then the lower id."""
    return min(options, key=lambda o: (o[0], o[1].inflight, o[1].instance_id), default=None)


def _fewer(v: InstanceView, best: InstanceView) -> bool:
    return (v.inflight, v.instance_id) < (best.inflight, best.instance_id)


def _route(
    prices: _Prices,
    decoding: InstanceView,
    prefilling: InstanceView | None,
    execution: _Exec,
    transfer_s: float = 0.0,
) -> Route:
    """``prefilling`` is None for a colocated plan (``decoding`` prefills too)."""
    move_s, prefill_s, cached, move_from = execution
    queue_s = prices.queue(prefilling or decoding)
    decode_s = prices.decode(decoding)
    move_tokens = cached if move_from else 0
    terms = {
        "queue_s": queue_s, "move_s": move_s, "prefill_s": prefill_s, "transfer_s": transfer_s,
        "decode_s": decode_s, "total_s": queue_s + move_s + prefill_s + transfer_s + decode_s,
        "cached_tokens": cached, "move_tokens": move_tokens, "prompt_tokens": prices.x,
    }  # fmt: skip
    return Route(
        decoding.instance_id,
        prefilling.instance_id if prefilling else None,
        move_from=move_from,
        move_tokens=move_tokens,
        predicted_prefill_s=move_s + prefill_s,
        cost=terms,
    )
