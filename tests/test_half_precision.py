"""bf16 / fp16 on CPU (upcast GEMM, fp32 attention over a half-precision cache) track fp32."""

from __future__ import annotations

import pytest
import torch

from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM
from memserve.engine.types import SamplingParams

# Long enough to cross several 16-token blocks and to batch >= 8 rows (the upcast kernel's range).
PROMPTS = [[3 + (i * 7919 + j * 104729) % 31000 for j in range(n)] for i, n in enumerate(
    (5, 17, 40, 33, 9, 12, 64, 21, 3)
)]  # fmt: skip


def first_token_logprobs(dtype: str) -> torch.Tensor:
    """Top-20 logprobs of the first sampled token of each prompt, [num_prompts, 20]."""
    config = EngineConfig(ModelConfig("dummy:tiny", dtype=dtype), CacheConfig(num_blocks=128))  # type: ignore[arg-type]
    llm = LLM(config)
    done = llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0, logprobs=20))
    llm.engine.check_integrity()
    assert llm.engine.num_active_blocks == 0
    assert llm.engine.cache.data.dtype == getattr(torch, dtype)
    return torch.tensor([[lp for _, lp in c.logprobs[0].top] for c in done])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(dtype: str) -> None:
    ref, half = first_token_logprobs("float32"), first_token_logprobs(dtype)
    assert half.shape == ref.shape
    # bf16 keeps 8 mantissa bits; the top-20 logprobs span ~0.28, so a wrong read would show.
    tolerance = 0.03 if dtype == "bfloat16" else 0.005  # measured 0.011 and 0.0012
    assert (half - ref).abs().max().item() < tolerance
    assert (half - ref).abs().max().item() > 0  # really computed in half precision
