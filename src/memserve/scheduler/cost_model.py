"""Operator-level cost model: predicted prefill, decode-step and KV-transfer times in seconds.

As in the paper, a step's time is the sum of its operators' times: matrix products scale with the
tokens computed, attention is a polynomial in the chunks' positions, and the rest is constant per
step, per prefill chunk (its attention calls) or per decode. With ``StepSample``'s features::

    step_s = step                                      sampling, launches, building the batch
           + prefill_token * prefill_tokens            matrix products
           + prefill_chunk * prefill_chunks            one attention call per layer each
           + attn_fresh * sum, chunks [0, n):          n^2 / 2      causal self-attention
           + attn_context * sum, chunks [s, s+n), s>0: n * (s + n)  against earlier context
           + decode_seq * decode_seqs                  matrix products of one row, sampling
           + decode_key * decode_context               keys read by decode attention

Why more terms than the paper's three: with matrix products per token (decodes included), one
attention term and a per-step constant, the fit missed ``dummy:tiny`` and ``dummy:small`` (torch
backend, CPU) by up to 25 % on prefills. Chunks after earlier context run a masked kernel over
their whole ``n x (s + n)`` rectangle where fresh ones skip the masked half; a step of many short
chunks (a batch joining at once) pays per chunk; a decode costs more than a prefill token.

The coefficients are fitted by non-negative least squares on relative error, so short steps
weigh as much as long ones. ``memserve-node profile`` (``scheduler.profile``) writes a fitted
model to a JSON file; the scheduler loads it, and ``observe`` refines it online from the step
samples instances send in their heartbeats. Plain numbers and numpy only (no torch).
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memserve.engine.types import StepSample

FORMAT_VERSION = 1
DEFAULT_TRANSFER_LATENCY_S = 1e-3  # a control round trip and the transfer's setup
DEFAULT_BANDWIDTH_BYTES_PER_S = 5e9  # gloo over loopback, measured on the 2-core dev VM

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StepCoefficients:
    """Seconds per unit of each term of a step (all >= 0), in the order of ``features``."""

    step_s: float
    prefill_token_s: float
    prefill_chunk_s: float
    attn_fresh_s: float  # per pair of ``prefill_attn_fresh``
    attn_context_s: float  # per pair of ``prefill_attn_context``
    decode_seq_s: float
    decode_key_s: float

    def __post_init__(self) -> None:
        if min(astuple(self)) < 0:
            raise ValueError(f"cost coefficients must be >= 0, got {self}")

    def predict(self, step: StepSample) -> float:
        """The time of ``step`` (its ``seconds`` unused); 0 for a step that computes nothing."""
        if step.prefill_tokens + step.decode_seqs == 0:
            return 0.0
        return (  # plain arithmetic: the router prices a few plans per request (~1 µs here)
            self.step_s
            + self.prefill_token_s * step.prefill_tokens
            + self.prefill_chunk_s * step.prefill_chunks
            + self.attn_fresh_s * step.prefill_attn_fresh
            + self.attn_context_s * step.prefill_attn_context
            + self.decode_seq_s * step.decode_seqs
            + self.decode_key_s * step.decode_context
        )


def features(step: StepSample) -> Array:
    """The terms the coefficients multiply, in ``StepCoefficients`` order."""
    return np.array(
        [
            1.0,
            step.prefill_tokens,
            step.prefill_chunks,
            step.prefill_attn_fresh,
            step.prefill_attn_context,
            step.decode_seqs,
            step.decode_context,
        ]
    )


def prefill_step(start: int, num_tokens: int) -> StepSample:
    """A step that computes one prefill chunk, positions ``[start, start + num_tokens)``."""
    return StepSample.of_chunks([(start, num_tokens, False)])


def decode_step(batch: int, context_tokens: int) -> StepSample:
    """A step of ``batch`` decodes reading ``context_tokens`` keys in total."""
    return StepSample(0, 0, 0.0, 0.0, batch, context_tokens, 0.0)


# ---- step samples as JSON rows ------------------------------------------------------------------

ROW_FIELDS = tuple(f.name for f in fields(StepSample))


def sample_to_row(sample: StepSample) -> list[float]:
    """The sample's fields as a list, in ``ROW_FIELDS`` order."""
    return list(astuple(sample))


def sample_from_row(row: Sequence[float]) -> StepSample:
    """The inverse of ``sample_to_row``; ``ValueError`` if the row is malformed."""
    if len(row) != len(ROW_FIELDS) or not all(isinstance(v, int | float) and v >= 0 for v in row):
        raise ValueError(f"a step sample row is {len(ROW_FIELDS)} numbers >= 0, got {row!r}")
    tokens, chunks, fresh, context, seqs, keys, seconds = row
    return StepSample(
        int(tokens), int(chunks), float(fresh), float(context), int(seqs), int(keys), seconds
    )


def samples_to_rows(samples: Iterable[StepSample]) -> list[list[float]]:
    return [sample_to_row(s) for s in samples]


def samples_from_rows(rows: Iterable[Sequence[float]]) -> list[StepSample]:
    return [sample_from_row(r) for r in rows]


# ---- fitting ------------------------------------------------------------------------------------


def nnls(a: Array, b: Array, max_iter: int = 100) -> Array:
    """``argmin ||a x - b||`` subject to ``x >= 0`` (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)  # the passive set: variables not pinned at 0
    tol = 10 * np.finfo(np.float64).eps * max(a.shape) * max(1.0, float(np.abs(a).sum(0).max()))
    for _ in range(max_iter):
        gradient = a.T @ (b - a @ x)
        if free.all() or gradient[~free].max() <= tol:
            break
        free[int(np.argmax(np.where(free, -np.inf, gradient)))] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if z[free].min() > 0:
                x = z
                break
            # Move from x towards z until the first free variable reaches 0; pin it there.
            hit = free & (z <= 0)
            alpha = np.min(x[hit] / np.maximum(x[hit] - z[hit], np.finfo(np.float64).tiny))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return x


def fit_coefficients(
    samples: Sequence[StepSample], weights: Sequence[float] | None = None
) -> StepCoefficients:
    """Non-negative least squares on relative error, each sample's squared error times its
    weight. A term no sample exercises (say, no decodes) gets coefficient 0."""
    pairs = zip(samples, weights or [1.0] * len(samples), strict=True)
    rows = [(s, w) for s, w in pairs if s.seconds > 0 and w > 0]
    if not rows:
        raise ValueError("fitting needs at least one sample with seconds > 0")
    a = np.array([features(s) for s, _ in rows])
    b = np.array([s.seconds for s, _ in rows])
    scale = np.sqrt([w for _, w in rows]) / b  # each row's residual becomes a relative error
    a, b = a * scale[:, None], b * scale
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0  # an unexercised term: its column is 0, its coefficient stays 0
    x = nnls(a / norms, b) / norms
    return StepCoefficients(*(float(v) for v in x))


def relative_errors(coefficients: StepCoefficients, samples: Iterable[StepSample]) -> list[float]:
    """``|predicted - measured| / measured`` per sample with ``seconds > 0``."""
    return [abs(coefficients.predict(s) - s.seconds) / s.seconds for s in samples if s.seconds > 0]


def synthetic_samples(coefficients: StepCoefficients, budget: int) -> list[StepSample]:
    """Exact samples of ``coefficients`` over prefill chunks (up to ``budget`` tokens) and decode
    steps of a few sizes: a prior for a model without a profile, so that refits keep the terms
    the traffic does not exercise."""
    steps = [prefill_step(s, n) for n in (16, 256, budget) for s in (0, 4 * n)]
    steps += [decode_step(b, b * ctx) for b in (1, 8, 32) for ctx in (256, 2048)]
    return [replace(s, seconds=coefficients.predict(s)) for s in steps]


# ---- the model ----------------------------------------------------------------------------------


class OperatorCostModel:
    """``CostModel`` (``scheduler.types``) of one instance kind, refined online.

    ``prior``: the profile's samples. ``observe`` keeps the latest ``window`` samples an instance
    reports and, every ``refit_every`` of them, refits on prior and recent samples together:
    first the prior's times are scaled by the median ratio of measured to predicted time over
    the recent samples (a machine uniformly slower or faster than the profiled one), then each
    recent sample weighs ``recent_weight`` times a prior one. The prior keeps the terms the recent
    traffic does not exercise (say, long prefills on a decode instance) where the profile had them.
    A refit costs a few milliseconds (NNLS over a few hundred rows of 7 columns).
    """

    def __init__(
        self,
        coefficients: StepCoefficients,
        *,
        max_num_batched_tokens: int,
        bytes_per_token: int,
        bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S,
        transfer_latency_s: float = DEFAULT_TRANSFER_LATENCY_S,
        prior: Sequence[StepSample] = (),
        window: int = 256,
        refit_every: int = 32,
        recent_weight: float = 4.0,
    ) -> None:
        if max_num_batched_tokens < 1 or bytes_per_token < 0:
            raise ValueError("max_num_batched_tokens must be >= 1 and bytes_per_token >= 0")
        if bandwidth_bytes_per_s <= 0 or transfer_latency_s < 0:
            raise ValueError("bandwidth must be > 0 and transfer latency >= 0")
        if window < 1 or refit_every < 1 or recent_weight <= 0:
            raise ValueError("window and refit_every must be >= 1, recent_weight > 0")
        self.coefficients = coefficients
        self.profiled = coefficients  # what the prior was fitted to; recent samples scale it
        self.max_num_batched_tokens = max_num_batched_tokens
        self.bytes_per_token = bytes_per_token
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.transfer_latency_s = transfer_latency_s
        self.prior = tuple(prior)
        self.recent: deque[StepSample] = deque(maxlen=window)
        self.refit_every = refit_every
        self.recent_weight = recent_weight
        self._unfitted = 0  # samples observed since the last refit

    @classmethod
    def fit(
        cls,
        samples: Sequence[StepSample],
        *,
        max_num_batched_tokens: int,
        bytes_per_token: int,
        bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S,
        transfer_latency_s: float = DEFAULT_TRANSFER_LATENCY_S,
    ) -> OperatorCostModel:
        """A model fitted on ``samples``, which it keeps as its prior."""
        return cls(
            fit_coefficients(samples),
            max_num_batched_tokens=max_num_batched_tokens,
            bytes_per_token=bytes_per_token,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            transfer_latency_s=transfer_latency_s,
            prior=samples,
        )

    @classmethod
    def default(cls, bytes_per_token: int) -> OperatorCostModel:
        """Rough numbers for when no profile is given: ``memserve-node profile --model
        dummy:small`` (bf16, 2 threads, ``--max-num-batched-tokens 2048``) on the 2-core
        AVX512-BF16 dev VM, rounded, and the gloo loopback bandwidth measured there. Only the
        ratios between terms mean much elsewhere; ``observe`` rescales them to the machine from
        the first heartbeats."""
        coefficients = StepCoefficients(
            step_s=1.2e-2,
            prefill_token_s=5.5e-4,
            prefill_chunk_s=2e-3,
            attn_fresh_s=2.6e-7,
            attn_context_s=2.1e-7,
            decode_seq_s=9.4e-4,
            decode_key_s=1.1e-6,
        )
        return cls(
            coefficients,
            max_num_batched_tokens=2048,
            bytes_per_token=bytes_per_token,
            prior=synthetic_samples(coefficients, 2048),
        )

    # ---- predictions --------------------------------------------------------------------------

    def prefill_time(self, num_tokens: int, num_cached: int) -> float:
        """The uncached tokens run in chunks of ``max_num_batched_tokens``, one step each (as if
        alone on the instance). At least one token is computed, as the engine does, even when
        ``num_cached >= num_tokens``."""
        if num_tokens <= 0:
            return 0.0
        start = min(max(num_cached, 0), num_tokens - 1)
        total = 0.0
        while start < num_tokens:
            n = min(self.max_num_batched_tokens, num_tokens - start)
            total += self.coefficients.predict(prefill_step(start, n))
            start += n
        return total

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return self.coefficients.predict(decode_step(max(batch, 0), max(context_tokens, 0)))

    def transfer_time(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        return (
            self.transfer_latency_s + num_tokens * self.bytes_per_token / self.bandwidth_bytes_per_s
        )

    def step_time(self, step: StepSample) -> float:
        """The predicted time of ``step`` (its ``seconds`` unused)."""
        return self.coefficients.predict(step)

    def prediction_error(self, samples: Iterable[StepSample]) -> float:
        """Median relative error of the current coefficients on ``samples`` (0 if none)."""
        errors = relative_errors(self.coefficients, samples)
        return statistics.median(errors) if errors else 0.0

    # ---- online refinement --------------------------------------------------------------------

    def observe(self, samples: Iterable[StepSample]) -> bool:
        """Add an instance's measured steps; refit once ``refit_every`` arrived since the last
        refit. Returns whether it refit."""
        for s in samples:
            if s.seconds > 0:
                self.recent.append(s)
                self._unfitted += 1
        if self._unfitted < self.refit_every:
            return False
        self.refit()
        return True

    def refit(self) -> None:
        """Refit on the prior, rescaled to the recent samples, and the recent samples."""
        self._unfitted = 0
        if not self.recent:
            return
        scale = statistics.median(
            s.seconds / max(self.profiled.predict(s), 1e-12) for s in self.recent
        )
        prior = [replace(s, seconds=s.seconds * scale) for s in self.prior]
        weights = [1.0] * len(prior) + [self.recent_weight] * len(self.recent)
        self.coefficients = fit_coefficients([*prior, *self.recent], weights)

    # ---- files --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "coefficients": asdict(self.coefficients),
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "bytes_per_token": self.bytes_per_token,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "transfer_latency_s": self.transfer_latency_s,
            "samples": samples_to_rows(self.prior),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OperatorCostModel:
        """The model ``to_json`` wrote; other top-level keys (a profile's report) are ignored.
        ``ValueError`` on a missing key, a wrong version or a bad value."""
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"cost model version {data.get('version')!r}, want {FORMAT_VERSION}")
        try:
            return cls(
                StepCoefficients(**data["coefficients"]),
                max_num_batched_tokens=int(data["max_num_batched_tokens"]),
                bytes_per_token=int(data["bytes_per_token"]),
                bandwidth_bytes_per_s=float(data["bandwidth_bytes_per_s"]),
                transfer_latency_s=float(data["transfer_latency_s"]),
                prior=samples_from_rows(data["samples"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed cost model: {e!r}") from e

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
        """Write ``to_json()`` (plus the top-level keys of ``extra``) to ``path``."""
        data = self.to_json()
        if extra and data.keys() & extra.keys():
            raise ValueError(f"extra keys {sorted(data.keys() & extra.keys())} are the model's")
        data.update(extra or {})
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OperatorCostModel:
        return cls.from_json(json.loads(Path(path).read_text()))
