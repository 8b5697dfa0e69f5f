"""What the global scheduler's parts exchange: load reports, the policies' view of an instance,
the cost model's interface, and a routing decision. Plain values only (no torch, no I/O).

- Instances report ``Load`` in every heartbeat (``server.scheduler_api``).
- The router turns its instance table into ``InstanceView``s and asks a ``Policy`` for a
  ``Route``. ``queued_s`` is the router's own, immediate estimate of the prefill work it sent to
  an instance that has not produced its first token yet (it adds the predicted prefill time on
  dispatch and removes it at the first token), so a burst of requests sees its own effect
  before any heartbeat does: the term that keeps a shared-prefix flood from herding.
- ``CostModel`` (``scheduler.cost_model``) predicts execution and transfer times in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memserve.tree.global_tree import GlobalPromptTree

INSTANCE_ROLES = ("colocated", "prefill", "decode")


class NoInstanceError(RuntimeError):
    """No live instance can serve the request (the scheduler answers 503)."""


@dataclass(frozen=True)
class TierLoad:
    total: int = 0
    free: int = 0
    active: int = 0
    historical: int = 0


@dataclass(frozen=True)
class Load:
    """An instance's state at its last heartbeat."""

    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests queued, not started
    pending_prefill_tokens: int = 0  # prompt tokens admitted or queued and not yet computed
    device: TierLoad = TierLoad()
    dram: TierLoad = TierLoad()


@dataclass(frozen=True)
class InstanceView:
    """One live instance as a policy sees it."""

    instance_id: str
    role: str  # colocated | prefill | decode
    load: Load = Load()
    queued_s: float = 0.0  # predicted prefill seconds sent there by this scheduler, not started
    inflight: int = 0  # requests this scheduler has running there (any phase)


@dataclass(frozen=True)
class RouteRequest:
    tokens: Sequence[int]  # the prompt's token ids
    session: str | None = None  # OpenAI ``user`` field or ``X-Session-Id`` header
    max_tokens: int = 16


@dataclass(frozen=True)
class Route:
    """Where a request runs.

    - Colocated: ``instance_id`` is the colocated instance; ``prefill_id`` is None.
    - P/D: ``prefill_id`` prefills and ``instance_id`` (a decode instance) decodes.
    ``move_from``: before the prefill, copy the first ``move_tokens`` tokens' KV from that
    instance to the one that prefills (only chosen when the transfer costs less than the
    compute it saves). ``predicted_prefill_s``: the router adds it to the prefilling instance's
    ``queued_s`` until the first token. ``cost``: the terms behind the choice (logged).
    """

    instance_id: str
    prefill_id: str | None = None
    move_from: str | None = None
    move_tokens: int = 0
    predicted_prefill_s: float = 0.0
    cost: Mapping[str, float] = field(default_factory=dict)

    @property
    def prefilling_id(self) -> str:
        return self.prefill_id or self.instance_id


class CostModel(Protocol):
    """Predicted times in seconds, all >= 0."""

    def prefill_time(self, num_tokens: int, num_cached: int) -> float:
        """Prefill a prompt of ``num_tokens`` tokens whose first ``num_cached`` have KV already."""
        ...

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` sequences holding ``context_tokens`` tokens in total."""
        ...

    def transfer_time(self, num_tokens: int) -> float:
        """Move ``num_tokens`` tokens' KV between two instances."""
        ...


Trees = Mapping[str, GlobalPromptTree]
"""The global prompt tree of each instance role (``colocated``, ``prefill``, ``decode``)."""


def make_trees(block_size: int, ttl_s: float, max_blocks: int) -> Trees:
    """The scheduler's trees: one radix structure serves every role. Instance ids are unique
    across roles, so the per-role trees of the paper are this tree's holders filtered by role;
    sharing it means a P/D request is matched once, not once per role (policies match a tree
    shared by several roles once), and P and D holding the same conversation store it once.
    ``max_blocks`` bounds them all together."""
    tree = GlobalPromptTree(block_size, ttl_s, max_blocks)
    return dict.fromkeys(INSTANCE_ROLES, tree)


def tree_blocks(trees: Trees) -> int:
    """Blocks indexed by ``trees`` (a tree shared by several roles counted once)."""
    return sum(t.num_blocks for t in {id(t): t for t in trees.values()}.values())


class Policy(Protocol):
    name: str

    def choose(
        self, request: RouteRequest, instances: Sequence[InstanceView], trees: Trees, now: float
    ) -> Route:
        """A route over ``instances`` (all live); raises ``NoInstanceError`` when none fits."""
        ...
