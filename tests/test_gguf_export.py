"""GGUF export (``export_gguf``) read back with ``gguf.GGUFReader``: metadata equal to the config,
every tensor present with llama.cpp's name and shape, weights equal to the loader's (Q/K after
undoing the RoPE permutation), and the permutation itself turning our rotate-half RoPE into GGML's
pair RoPE. No llama.cpp needed (``benchmarks/gguf_parity.py`` runs the real server)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from memserve.cli import main as cli_main
from memserve.model.arch import PRESETS, LlamaArch, RopeScaling
from memserve.model.gguf_export import (
    export_gguf,
    import_gguf,
    permute_for_ggml_rope,
    rope_freq_factors,
    write_gguf,
)
from memserve.model.loader import dummy_state_dict, hf_tensor_shapes
from memserve.model.ops import Rotary, apply_rotary
from memserve.model.tokenizer import Tokenizer, bytes_to_unicode

CPU = torch.device("cpu")
TINY = "dummy:tiny"
ARCH = PRESETS["tiny"]
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# A cheap arch for the variants (the dummy tokenizer needs vocab >= 259).
MINI = dataclasses.replace(ARCH, vocab_size=512, num_layers=1, intermediate_size=64)


def hf_to_gguf_names(arch: LlamaArch) -> dict[str, str]:
    """The expected name mapping, written out independently of the exporter's table."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not arch.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for n in range(arch.num_layers):
        for hf, gg in LAYER_TENSORS.items():
            names[f"model.layers.{n}.{hf}"] = f"blk.{n}.{gg}"
    return names


def unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Pair order ``(0, D/2, 1, D/2 + 1, ...)`` back to rotate-half order, per head."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def tensors_of(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


@pytest.fixture(name="state", scope="module")
def state_fixture() -> dict[str, torch.Tensor]:
    return dummy_state_dict(ARCH, 0, torch.float32, CPU)


@pytest.fixture(name="f16", scope="module")
def f16_fixture(tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    return gguf.GGUFReader(export_gguf(TINY, tmp_path_factory.mktemp("f16") / "tiny.gguf"))


@pytest.fixture(name="f32", scope="module")
def f32_fixture(tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    out = tmp_path_factory.mktemp("f32") / "tiny.gguf"
    return gguf.GGUFReader(export_gguf(TINY, out, dtype="f32"))


def test_metadata_matches_config(f16: gguf.GGUFReader) -> None:
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.context_length": ARCH.max_position_embeddings,
        "llama.embedding_length": ARCH.hidden_size,
        "llama.block_count": ARCH.num_layers,
        "llama.feed_forward_length": ARCH.intermediate_size,
        "llama.attention.head_count": ARCH.num_heads,
        "llama.attention.head_count_kv": ARCH.num_kv_heads,
        "llama.attention.key_length": ARCH.head_dim,
        "llama.attention.value_length": ARCH.head_dim,
        "llama.rope.dimension_count": ARCH.head_dim,
        "llama.vocab_size": ARCH.vocab_size,
    }
    assert {key: field(f16, key) for key in expected} == expected
    assert field(f16, "llama.rope.freq_base") == pytest.approx(ARCH.rope_theta)
    assert field(f16, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(ARCH.rms_norm_eps)


def test_tokenizer_metadata_is_the_dummy_bpe(f16: gguf.GGUFReader) -> None:
    tokenizer = Tokenizer.dummy(ARCH.vocab_size)
    assert field(f16, "tokenizer.ggml.model") == "gpt2"
    assert field(f16, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(f16, "tokenizer.ggml.tokens")
    assert len(tokens) == ARCH.vocab_size
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    alphabet = bytes_to_unicode()
    for token_id in range(3, ARCH.vocab_size):  # same bytes per id, in byte-level spelling
        assert tokens[token_id] == "".join(alphabet[b] for b in tokenizer.token_bytes(token_id))
    types = field(f16, "tokenizer.ggml.token_type")
    assert types[:4] == [3, 3, 3, 1] and set(types[3:]) == {1}
    merges = field(f16, "tokenizer.ggml.merges")
    assert len(merges) == ARCH.vocab_size - 259
    assert all(len(m.split(" ")) == 2 for m in merges)
    assert field(f16, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == ARCH.bos_token_id
    assert field(f16, "tokenizer.ggml.eos_token_id") == ARCH.eos_token_id == 2
    assert tokenizer.eos_token_ids == frozenset({2})
    assert field(f16, "tokenizer.ggml.unknown_token_id") == 0
    assert field(f16, "tokenizer.ggml.add_bos_token") is True
    assert field(f16, "tokenizer.chat_template") == tokenizer.chat_template


def test_every_tensor_present_with_llama_cpp_shapes(f16: gguf.GGUFReader) -> None:
    names = hf_to_gguf_names(ARCH)
    shapes = hf_tensor_shapes(ARCH)
    tensors = tensors_of(f16)
    assert set(tensors) == set(names.values())
    for hf, gg in names.items():
        t = tensors[gg]
        assert tuple(int(d) for d in t.shape) == shapes[hf][::-1], gg  # GGUF: {in, out}
        assert t.data.shape == shapes[hf], gg
        one_d = len(shapes[hf]) == 1
        want = gguf.GGMLQuantizationType.F32 if one_d else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want, gg


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_weights_equal_the_loaders(
    dtype: str, f16: gguf.GGUFReader, f32: gguf.GGUFReader, state: dict[str, torch.Tensor]
) -> None:
    """Q/K unpermuted and every other tensor equal ours exactly after rounding to ``dtype``."""
    reader = f16 if dtype == "f16" else f32
    tensors = tensors_of(reader)
    for hf, gg in hf_to_gguf_names(ARCH).items():
        ours = state[hf]
        if ours.dim() == 2 and dtype == "f16":
            ours = ours.half()
        theirs = torch.from_numpy(np.array(tensors[gg].data))
        if gg.endswith("attn_q.weight"):
            theirs = unpermute(theirs, ARCH.num_heads)
        elif gg.endswith("attn_k.weight"):
            theirs = unpermute(theirs, ARCH.num_kv_heads)
        assert theirs.dtype == ours.dtype, gg
        assert torch.equal(theirs, ours), gg


def test_f16_rounding_is_small(f16: gguf.GGUFReader, state: dict[str, torch.Tensor]) -> None:
    theirs = torch.from_numpy(np.array(tensors_of(f16)["blk.0.ffn_up.weight"].data)).float()
    ours = state["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(theirs, ours, rtol=2**-11, atol=2**-24)
    assert not torch.equal(theirs, ours)


def ggml_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """GGML's llama RoPE (``LLAMA_ROPE_TYPE_NORM``): rotates adjacent pairs ``(x[2j], x[2j+1])``.

    x [N, H, D], positions [N], inv_freq [D/2] fp32; angles in fp32, as ``Rotary`` computes them.
    """
    angle = positions.float()[:, None, None] * inv_freq  # [N, 1, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # [N, H, D/2] each
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos))
    return out.permute(1, 2, 3, 0).reshape(x.shape)  # pairs interleaved again


def test_permutation_turns_rotate_half_rope_into_pair_rope() -> None:
    """Projecting with permuted rows then pair-RoPE = our RoPE then the same reordering of dims, so
    q·k (both reordered alike) is unchanged."""
    gen = torch.Generator().manual_seed(0)
    heads, dim, hidden, n = ARCH.num_kv_heads, ARCH.head_dim, ARCH.hidden_size, 5
    w = torch.randn(heads * dim, hidden, generator=gen, dtype=torch.float64)  # [H * D, in]
    x = torch.randn(n, hidden, generator=gen, dtype=torch.float64)  # [N, in]
    positions = torch.tensor([0, 1, 7, 100, 4000])
    rotary = Rotary(ARCH, CPU)
    cos, sin = rotary.cos_sin(positions, torch.float64)
    ours = apply_rotary((x @ w.T).view(n, heads, dim), cos, sin)  # [N, H, D]
    theirs = ggml_rope((x @ permute_for_ggml_rope(w, heads).T).view(n, heads, dim), positions,
                       rotary.inv_freq)  # fmt: skip
    assert torch.allclose(unpermute(theirs.reshape(n, -1).T, heads).T.reshape(n, heads, dim), ours)
    assert torch.allclose(torch.einsum("nhd,mhd->hnm", theirs, theirs),
                          torch.einsum("nhd,mhd->hnm", ours, ours))  # fmt: skip


def test_tied_embeddings_omit_output_weight(tmp_path: Path) -> None:
    """llama.cpp falls back to ``token_embd.weight`` when ``output.weight`` is absent."""
    arch = dataclasses.replace(MINI, tie_word_embeddings=True)
    state = dummy_state_dict(arch, 0, torch.float32, CPU)
    path = write_gguf(arch, state, Tokenizer.dummy(arch.vocab_size), tmp_path / "tied.gguf")
    names = set(tensors_of(gguf.GGUFReader(path)))
    assert names == set(hf_to_gguf_names(arch).values())
    assert "output.weight" not in names and "token_embd.weight" in names


@pytest.mark.parametrize(
    "scaling", [RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)]
)
def test_rope_scaling_as_freq_factors(scaling: RopeScaling, tmp_path: Path) -> None:
    arch = dataclasses.replace(MINI, rope_scaling=scaling)
    state = dummy_state_dict(arch, 0, torch.float32, CPU)
    path = write_gguf(arch, state, Tokenizer.dummy(arch.vocab_size), tmp_path / "rope.gguf")
    factors = np.array(tensors_of(gguf.GGUFReader(path))["rope_freqs.weight"].data)
    assert factors.shape == (arch.head_dim // 2,) and factors.dtype == np.float32
    unscaled = Rotary(MINI, CPU).inv_freq
    assert torch.allclose(unscaled / torch.from_numpy(factors), Rotary(arch, CPU).inv_freq)
    if scaling.rope_type == "linear":
        assert np.allclose(factors, 4.0)
    else:  # llama3: high frequencies kept, low ones divided by the factor
        assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert rope_freq_factors(MINI) is None


def test_cli_export_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mini.gguf"
    assert cli_main(["export-gguf", TINY, str(out), "--seed", "3", "--dtype", "f32"]) == 0
    assert f"wrote {TINY} to {out}" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    embed = np.array(tensors_of(reader)["token_embd.weight"].data)
    seeded = dummy_state_dict(ARCH, 3, torch.float32, CPU)["model.embed_tokens.weight"]
    assert torch.equal(torch.from_numpy(embed), seeded)
    assert not list(tmp_path.glob("*.partial"))


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.gguf"
    assert cli_main(["export-gguf", "dummy:huge", str(out)]) == 2
    assert "unknown dummy preset 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export-gguf", TINY, str(out), "--dtype", "q8_0"])
    with pytest.raises(ValueError, match="dtype must be one of f16, f32"):
        export_gguf(TINY, out, dtype="bf16")
    assert not out.exists()


def test_missing_gguf_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes ``import gguf`` raise ImportError
    with pytest.raises(ImportError, match=r"memserve\[peer\]"):
        import_gguf()
    out = tmp_path / "x.gguf"
    arch = MINI
    state = dummy_state_dict(arch, 0, torch.float32, CPU)
    with pytest.raises(ImportError):
        write_gguf(arch, state, Tokenizer.dummy(arch.vocab_size), out)
    assert cli_main(["export-gguf", TINY, str(out)]) == 2
    assert "pip install 'memserve[peer]'" in capsys.readouterr().err
    assert not out.exists()


def test_failed_write_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = dummy_state_dict(MINI, 0, torch.float32, CPU)
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="tokenizer has 600 tokens, model vocab 512"):
        write_gguf(MINI, state, Tokenizer.dummy(600), out)

    def disk_full(self: gguf.GGUFWriter, *, progress: bool = False) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(MINI, state, Tokenizer.dummy(MINI.vocab_size), out)
    assert list(tmp_path.iterdir()) == []
