"""The model against Hugging Face ``LlamaForCausalLM``; the loader's directory format and errors.

Our logits (paged path, any chunking, shuffled block tables) must equal HF's for the same weights,
exported by ``export_hf`` and loaded by ``from_pretrained``. Variants cover RoPE scaling beyond the
original context, tied embeddings and biases.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from memserve.model.arch import PRESETS, LlamaArch, RopeScaling
from memserve.model.llama import LlamaModel, LlamaWeights
from memserve.model.loader import LoadedModel, dummy_state_dict, export_hf, load_model
from memserve.model.ops import Rotary, unpack_weight
from memserve.model.tokenizer import Tokenizer
from model_harness import llama_model, paged_logits

CPU = torch.device("cpu")
F32 = torch.float32
TOL = 1e-4
BLOCK_SIZE = 16
PROMPT_LENGTHS = (1, 15, 16, 17, 33, 64)

# A smaller cousin of ``tiny`` for the variants: same head layout (GQA 8:2), less to compute.
SMALL = dataclasses.replace(
    PRESETS["tiny"], vocab_size=1024, num_layers=2, max_position_embeddings=256
)


def random_tokens(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n)]


def hf_logits(hf: Any, tokens: Sequence[int]) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits of HF's model for one sequence."""
    with torch.no_grad():
        logits: torch.Tensor = hf(torch.tensor([list(tokens)])).logits[0]
    return logits.float()


def load_hf(path: Path) -> Any:
    """HF's model in eval mode (``from_pretrained`` sets it), with its plain (eager) attention."""
    return LlamaForCausalLM.from_pretrained(path, dtype=F32, attn_implementation="eager")


def export_arch(arch: LlamaArch, out: Path, randomize_biases: bool = False) -> Path:
    """Write random weights for ``arch`` as a HF directory (what ``export_hf`` does for presets)."""
    tensors = dummy_state_dict(arch, 0, F32, CPU)
    if randomize_biases:  # the dummy biases are zeros, which would not test that they are added
        gen = torch.Generator().manual_seed(1)
        for name, t in tensors.items():
            if name.endswith(".bias"):
                tensors[name] = torch.randn(t.shape, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(arch.to_hf_config()))
    Tokenizer.dummy(arch.vocab_size).save_pretrained(out)
    return out


def chunkings(n: int) -> dict[str, list[int]]:
    """Ways to feed an ``n``-token prompt: each list sums to ``n``."""

    def cycle(sizes: Sequence[int]) -> list[int]:
        out: list[int] = []
        i = 0
        while sum(out) < n:
            out.append(min(sizes[i % len(sizes)], n - sum(out)))
            i += 1
        return out

    num_decodes = min(n - 1, 5)
    return {
        "prefill": [n],
        "chunked": cycle([17, 16, 5]),
        "mixed": cycle([3, 1, 13, 1]),
        "decode": [1] * n,
        "prefix_then_decode": ([n - num_decodes] if n > num_decodes else []) + [1] * num_decodes,
    }


# ---- the tiny preset against HF ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf("dummy:tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir: Path) -> Any:
    return load_hf(tiny_dir)


@pytest.fixture(scope="module")
def tiny_ours(tiny_dir: Path) -> LlamaModel:
    """Loaded from the exported directory, as a user's checkpoint would be."""
    return llama_model(load_model(str(tiny_dir), F32, CPU))


@pytest.fixture(scope="module")
def tiny_reference(tiny_hf: Any) -> tuple[list[int], torch.Tensor]:
    """64 random tokens and HF's logits for them (a prefix's logits are the first rows: causal)."""
    tokens = random_tokens(max(PROMPT_LENGTHS), PRESETS["tiny"].vocab_size)
    return tokens, hf_logits(tiny_hf, tokens)


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_logits_equal_hf_in_every_chunking(
    tiny_ours: LlamaModel, tiny_reference: tuple[list[int], torch.Tensor], n: int
) -> None:
    tokens, reference = tiny_reference
    for name, sizes in chunkings(n).items():
        ours = paged_logits(tiny_ours, tokens[:n], sizes, BLOCK_SIZE, seed=n)
        diff = (ours - reference[:n]).abs().max().item()
        assert diff <= TOL, f"{name} {sizes}: max |ours - hf| = {diff}"


def test_logits_independent_of_block_size_and_table(
    tiny_ours: LlamaModel, tiny_reference: tuple[list[int], torch.Tensor]
) -> None:
    tokens, reference = tiny_reference
    for block_size, seed in ((1, 1), (4, 2), (8, 3), (32, 4)):
        ours = paged_logits(tiny_ours, tokens[:40], [7, 20, 1, 12], block_size, seed)
        assert (ours - reference[:40]).abs().max().item() <= TOL, block_size


# ---- variants: RoPE scaling, tied embeddings, biases -------------------------------------------


def compare_variant(
    arch: LlamaArch, out: Path, num_tokens: int, randomize_biases: bool = False
) -> LlamaModel:
    """Export ``arch``, load it with both loaders, assert equal logits; return our model."""
    export_arch(arch, out, randomize_biases)
    loaded = load_model(str(out), F32, CPU)
    assert loaded.arch == arch  # config.json round trip
    ours = llama_model(loaded)
    tokens = random_tokens(num_tokens, arch.vocab_size, seed=7)
    reference = hf_logits(load_hf(out), tokens)
    for sizes in ([num_tokens], [40, 1, 1, num_tokens - 42]):
        logits = paged_logits(ours, tokens, sizes, BLOCK_SIZE, seed=len(sizes))
        assert (logits - reference).abs().max().item() <= TOL, sizes
    return ours


ROPE_VARIANTS = {
    "llama3": RopeScaling("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    "linear": RopeScaling("linear", factor=4.0),
}  # fmt: skip


def inv_freq(arch: LlamaArch) -> torch.Tensor:
    return Rotary(arch, CPU).inv_freq


@pytest.mark.parametrize("kind", sorted(ROPE_VARIANTS))
def test_rope_scaling_equals_hf_beyond_original_context(tmp_path: Path, kind: str) -> None:
    num_tokens = 96  # three times the llama3 variant's original context of 32
    arch = dataclasses.replace(SMALL, rope_scaling=ROPE_VARIANTS[kind])
    scaled = compare_variant(arch, tmp_path / kind, num_tokens)
    # Teeth: the same weights without scaling give different logits, so HF really scaled too.
    unscaled = LlamaModel(dataclasses.replace(arch, rope_scaling=RopeScaling()),
                          scaled.weights, scaled.backend)  # fmt: skip
    tokens = random_tokens(num_tokens, arch.vocab_size, seed=7)
    diff = (paged_logits(scaled, tokens) - paged_logits(unscaled, tokens)).abs()
    assert diff[0].max().item() <= TOL  # position 0 is not rotated
    assert diff[32:].max().item() > 1e-2


def test_llama3_rope_settings_cover_all_three_bands() -> None:
    """All three llama3 bands occur for the test's settings: kept, scaled by 1/factor, blended."""
    arch = dataclasses.replace(SMALL, rope_scaling=ROPE_VARIANTS["llama3"])
    scaled = inv_freq(arch)
    plain = inv_freq(dataclasses.replace(arch, rope_scaling=RopeScaling()))
    ratio = scaled / plain
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(0.25)).any()
    assert ((ratio > 0.26) & (ratio < 0.99)).any()


def test_tied_embeddings_equal_hf(tmp_path: Path) -> None:
    arch = dataclasses.replace(SMALL, tie_word_embeddings=True)
    ours = compare_variant(arch, tmp_path / "tied", 48)
    assert torch.equal(unpack_weight(ours.weights.lm_head), ours.weights.embed.t())
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))


def test_attention_and_mlp_biases_equal_hf(tmp_path: Path) -> None:
    arch = dataclasses.replace(SMALL, attention_bias=True, mlp_bias=True)
    ours = compare_variant(arch, tmp_path / "bias", 48, randomize_biases=True)
    assert ours.weights.layers[0].qkv_bias is not None
    assert ours.weights.layers[0].down_bias is not None


# ---- the directory format ----------------------------------------------------------------------


def assert_weights_equal(a: LlamaWeights, b: LlamaWeights) -> None:
    assert torch.equal(a.embed, b.embed)
    assert torch.equal(a.norm, b.norm)
    assert torch.equal(a.lm_head, b.lm_head)
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for f in dataclasses.fields(la):
            ta, tb = getattr(la, f.name), getattr(lb, f.name)
            assert (ta is None) == (tb is None), f.name
            if ta is not None:
                assert torch.equal(ta, tb), f.name


def test_exported_directory_loads_identical_weights(tiny_dir: Path) -> None:
    from_dir = load_model(str(tiny_dir), F32, CPU)
    dummy = load_model("dummy:tiny", F32, CPU)
    assert from_dir.arch == dummy.arch
    assert_weights_equal(from_dir.weights, dummy.weights)
    assert from_dir.tokenizer.eos_token_ids == dummy.tokenizer.eos_token_ids == frozenset({2})


def test_export_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = export_hf("dummy:tiny", tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tiny_dir / name, again / name, shallow=False), name
    other_seed = export_hf("dummy:tiny", tmp_path / "seed1", seed=1)
    assert not filecmp.cmp(
        tiny_dir / "model.safetensors", other_seed / "model.safetensors", shallow=False
    )


def test_sharded_checkpoint_with_index_loads(tmp_path: Path) -> None:
    src = export_arch(SMALL, tmp_path / "single")
    sharded = shard(src, tmp_path / "sharded")
    assert_weights_equal(
        load_model(str(sharded), F32, CPU).weights, load_model(str(src), F32, CPU).weights
    )


def shard(src: Path, out: Path) -> Path:
    """Rewrite ``src``'s single file as two shards plus ``model.safetensors.index.json``."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map: dict[str, str] = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, out / file, {"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


# ---- loader errors -----------------------------------------------------------------------------


def linked_copy(
    src: Path, out: Path, edit_config: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """``src`` with its weights symlinked (cheap) and ``edit_config`` applied to ``config.json``."""
    out.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        else:
            shutil.copy(f, out / f.name)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def load(path: Path) -> LoadedModel:
    return load_model(str(path), F32, CPU)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model directory not found.*nowhere"):
        load(tmp_path / "nowhere")


def test_missing_config(tiny_dir: Path, tmp_path: Path) -> None:
    d = linked_copy(tiny_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load(d)


def test_unsupported_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    def mistral(c: dict[str, Any]) -> None:
        c |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}

    with pytest.raises(ValueError, match=r"unsupported architecture.*MistralForCausalLM"):
        load(linked_copy(tiny_dir, tmp_path / "m", mistral))


def test_unsupported_rope_type(tiny_dir: Path, tmp_path: Path) -> None:
    def yarn(c: dict[str, Any]) -> None:
        c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}

    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        load(linked_copy(tiny_dir, tmp_path / "m", yarn))


def test_missing_config_key(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing required key 'vocab_size'"):
        load(linked_copy(tiny_dir, tmp_path / "m", lambda c: c.pop("vocab_size")))


def test_missing_shard_listed_in_index(tmp_path: Path) -> None:
    sharded = shard(export_arch(SMALL, tmp_path / "single"), tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*index"):
        load(sharded)


def test_no_weight_files(tiny_dir: Path, tmp_path: Path) -> None:
    d = linked_copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load(d)


def test_shape_mismatch_names_tensor_and_shapes(tiny_dir: Path, tmp_path: Path) -> None:
    def narrower(c: dict[str, Any]) -> None:
        c["hidden_size"] = 128  # the checkpoint's tensors are 256 wide

    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\..*\(256,?.*128"):
        load(linked_copy(tiny_dir, tmp_path / "m", narrower))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    src = export_arch(SMALL, tmp_path / "full")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.norm\.weight'"):
        load(src)


def test_unknown_dummy_preset() -> None:
    with pytest.raises(ValueError, match=r"unknown dummy preset 'huge'.*tiny"):
        load_model("dummy:huge", F32, CPU)
    with pytest.raises(ValueError, match="unknown dummy preset"):
        export_hf("dummy:huge", "/nonexistent-never-written")
