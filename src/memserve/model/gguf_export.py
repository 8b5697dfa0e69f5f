"""Export a ``dummy:<preset>`` model as a GGUF file, so llama.cpp's ``llama-server`` serves the same
weights as MemServe (``memserve-node export-gguf dummy:small OUT.gguf``).

What the file holds, and why:

- Architecture ``llama`` with the hyperparameters llama.cpp reads (``llama.context_length`` ...).
- Tensors under llama.cpp's names (``blk.0.attn_q.weight`` ...), shaped ``[out, in]`` as in the
  checkpoint (GGUF lists dimensions the other way round, ``{in, out}``, as llama.cpp expects).
  Norm weights are f32; matrices f16 or f32 (``dtype``).
- **Q and K rows permuted per head.** Our RoPE (``ops.apply_rotary``, as HF Llama) rotates the pair
  ``(x[j], x[j + D/2])``; GGML's llama RoPE rotates ``(x[2j], x[2j + 1])``. Reordering the output
  rows of ``q_proj`` / ``k_proj`` so that row ``j + D/2`` lands next to row ``j`` turns one into
  the other; attention scores are unchanged because q and k get the same reordering, and V / O
  are untouched.
- Tied embeddings: no ``output.weight``; llama.cpp then uses ``token_embd.weight`` for the head.
- RoPE scaling (``linear``, ``llama3``): per-frequency divisors in ``rope_freqs.weight``, which
  llama.cpp's llama graph applies to every layer.
- Tokenizer: the dummy byte-level BPE as ``tokenizer.ggml.model = "gpt2"`` with the GPT-2 split
  (``pre = "gpt-2"``, the regex of ``ByteLevel``), the same pieces by id and the same merges in rank
  order, so token ids mean the same thing on both servers.

``gguf`` is an optional dependency (``pip install 'memserve[peer]'``), imported on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from memserve.model.arch import LlamaArch, RopeScaling
from memserve.model.loader import dummy_arch, dummy_state_dict
from memserve.model.ops import Rotary
from memserve.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import gguf

GGUF_DTYPES = ("f16", "f32")
_NP_DTYPES = {"f16": np.float16, "f32": np.float32}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
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

Array = npt.NDArray[Any]


def export_gguf(model: str, out_path: str | Path, *, seed: int = 0, dtype: str = "f16") -> Path:
    """Write ``dummy:<preset>`` with weights of ``seed`` (those ``load_model`` builds) to
    ``out_path``; returns the path.

    Raises ``ValueError`` for an unknown preset or dtype, ``ImportError`` if ``gguf`` is missing.
    """
    arch = dummy_arch(model)
    tensors = dummy_state_dict(arch, seed, torch.float32, torch.device("cpu"))
    return write_gguf(
        arch, tensors, Tokenizer.dummy(arch.vocab_size), out_path, dtype=dtype, name=model
    )


def write_gguf(
    arch: LlamaArch,
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer,
    out_path: str | Path,
    *,
    dtype: str = "f16",
    name: str = "memserve",
) -> Path:
    """Write ``tensors`` (Hugging Face names, as ``hf_tensor_shapes(arch)``) and ``tokenizer`` (a
    byte-level BPE, as ``Tokenizer.dummy``) as a llama GGUF file.

    The file appears at ``out_path`` complete or not at all (written beside it, then renamed).
    Raises ``ValueError`` for a dtype outside ``GGUF_DTYPES``, an arch with biases (no preset has
    them) or a tokenizer that is not a BPE of ``arch.vocab_size`` tokens.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if arch.attention_bias or arch.mlp_bias:
        raise ValueError("GGUF export does not support attention or MLP biases")
    g = import_gguf()
    out = Path(out_path)
    partial = out.with_name(out.name + ".partial")
    writer = g.GGUFWriter(partial, "llama")
    try:
        _add_hparams(writer, g, arch, name, dtype)
        _add_tokenizer(writer, g, arch, tokenizer)
        for gguf_name, array in gguf_tensors(arch, tensors, dtype).items():
            writer.add_tensor(gguf_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, out)
    return out


def import_gguf() -> ModuleType:
    """The ``gguf`` package, or an ``ImportError`` that says how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "GGUF export needs the 'gguf' package: pip install 'memserve[peer]' (or gguf>=0.10)"
        ) from e
    return gguf


def gguf_tensors(
    arch: LlamaArch, tensors: Mapping[str, torch.Tensor], dtype: str
) -> dict[str, Array]:
    """The GGUF tensors in file order: renamed, Q/K permuted for GGML's RoPE, 1-D ones in f32 and
    matrices in ``dtype``."""
    out: dict[str, Array] = {}
    for hf_name, tensor in tensors.items():
        gguf_name = _gguf_name(hf_name)
        t = tensor.detach().to(device="cpu", dtype=torch.float32)
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            q = gguf_name.endswith("attn_q.weight")
            t = permute_for_ggml_rope(t, arch.num_heads if q else arch.num_kv_heads)
        np_dtype = np.float32 if t.dim() == 1 else _NP_DTYPES[dtype]
        out[gguf_name] = t.contiguous().numpy().astype(np_dtype)
    factors = rope_freq_factors(arch)
    if factors is not None:
        out["rope_freqs.weight"] = factors.numpy().astype(np.float32)
    return out


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
    if not hf_name.startswith("model.layers.") or rest not in _LAYER_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def permute_for_ggml_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``[num_heads * D, in]`` reordered per head from rotate-half order
    ``(0, 1, .., D/2 - 1 | D/2, .., D - 1)`` to pair order ``(0, D/2, 1, D/2 + 1, ...)``."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    per_head = w.reshape(num_heads, 2, head_dim // 2, cols)  # [H, half, D/2, in]
    return per_head.transpose(1, 2).reshape(rows, cols)  # [H * D, in], pairs adjacent


def rope_freq_factors(arch: LlamaArch) -> torch.Tensor | None:
    """``[head_dim / 2]`` divisors of the unscaled RoPE frequencies that give ``arch``'s scaled
    ones (llama.cpp's ``rope_freqs``), or None without RoPE scaling."""
    if arch.rope_scaling.rope_type == "default":
        return None
    cpu = torch.device("cpu")
    unscaled = Rotary(replace(arch, rope_scaling=RopeScaling()), cpu).inv_freq
    return unscaled / Rotary(arch, cpu).inv_freq


def _add_hparams(
    writer: gguf.GGUFWriter, g: ModuleType, arch: LlamaArch, name: str, dtype: str
) -> None:
    writer.add_name(name)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    file_type = g.LlamaFileType.MOSTLY_F16 if dtype == "f16" else g.LlamaFileType.ALL_F32
    writer.add_file_type(int(file_type))


def _add_tokenizer(
    writer: gguf.GGUFWriter, g: ModuleType, arch: LlamaArch, tokenizer: Tokenizer
) -> None:
    pieces, merges = _bpe_vocab(tokenizer)
    if len(pieces) != arch.vocab_size:
        raise ValueError(f"tokenizer has {len(pieces)} tokens, model vocab {arch.vocab_size}")
    control, normal = int(g.TokenType.CONTROL), int(g.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(pieces)
    writer.add_token_types(
        [control if i in tokenizer.all_special_ids else normal for i in range(len(pieces))]
    )
    writer.add_token_merges(merges)
    for add_id, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, _single_eos_id(tokenizer)),
        (writer.add_unk_token_id, _piece_id(pieces, tokenizer.unk_token)),
    ):
        if token_id is not None:
            add_id(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _bpe_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """Pieces by id (added tokens included) and merges as ``"left right"``, in rank order."""
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export needs a BPE tokenizer, got {model.get('type')!r}")
    by_id: dict[int, str] = {int(i): piece for piece, i in model["vocab"].items()}
    by_id |= {int(t["id"]): t["content"] for t in state.get("added_tokens", [])}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous from 0")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [by_id[i] for i in range(len(by_id))], merges


def _single_eos_id(tokenizer: Tokenizer) -> int | None:
    """llama.cpp names one EOS id; with several, the smallest (others end generation by text)."""
    return min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None


def _piece_id(pieces: list[str], piece: str | None) -> int | None:
    return None if piece is None or piece not in pieces else pieces.index(piece)
