"""GPU checks of the foundation (marker ``cuda``): the CUDA engine agrees with the CPU reference.

Skipped where torch sees no CUDA device; the CPU suite covers the same code paths.
"""

from __future__ import annotations

import pytest
import torch

from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM
from memserve.engine.types import SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [
    [3 + (i * 7919 + j * 104729) % 31000 for j in range(n)] for i, n in enumerate((5, 17, 40))
]


def _run(device: str, dtype: str) -> list[list[float]]:
    model = ModelConfig("dummy:tiny", dtype=dtype, device=device)  # type: ignore[arg-type]
    config = EngineConfig(model, CacheConfig(num_blocks=64))
    llm = LLM(config)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    done = llm.generate(PROMPTS, params)
    llm.engine.check_integrity()
    assert llm.engine.num_active_blocks == 0
    return [[lp.logprob for lp in c.logprobs] for c in done]


def test_cuda_float32_matches_cpu() -> None:
    cpu, gpu = _run("cpu", "float32"), _run("cuda:0", "float32")
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-3)


def test_cuda_bfloat16_close_to_float32() -> None:
    ref, bf16 = _run("cuda:0", "float32"), _run("cuda:0", "bfloat16")
    for a, b in zip(ref, bf16, strict=True):
        assert abs(b[0] - a[0]) < 0.1  # first token's logprob: same prompt, bf16 rounding only
