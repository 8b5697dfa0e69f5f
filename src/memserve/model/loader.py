"""Weight loading: a local Hugging Face directory, or ``dummy:<preset>`` random weights.

Both paths go through the same Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``
...), so ``export_hf`` of a dummy preset and loading that directory back give identical weights.
Safetensors shards are memory-mapped; each tensor is cast and fused as it is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memserve.hardware import cpu_has_native_bf16
from memserve.model.arch import PRESETS, LlamaArch
from memserve.model.llama import LayerWeights, LlamaWeights
from memserve.model.ops import pack_weight
from memserve.model.tokenizer import Tokenizer

DUMMY_PREFIX = "dummy:"
_INIT_STD = 0.02
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TensorMap = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoadedModel:
    arch: LlamaArch
    weights: LlamaWeights
    tokenizer: Tokenizer


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the hardware runs it fast (CUDA, or a CPU with bf16 matrix
    instructions), else float32."""
    if name == "auto":
        fast_bf16 = device.type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPES[name]


def load_model(model: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoadedModel:
    if model.startswith(DUMMY_PREFIX):
        arch = dummy_arch(model)
        tensors = dummy_state_dict(arch, seed, dtype, device)
        return LoadedModel(
            arch, fuse_weights(arch, tensors, dtype, device), Tokenizer.dummy(arch.vocab_size)
        )
    path = Path(model)
    arch = read_arch(path)
    weights = fuse_weights(arch, _ShardReader(path), dtype, device)
    return LoadedModel(arch, weights, Tokenizer.from_pretrained(path))


def load_tokenizer(model: str) -> tuple[LlamaArch, Tokenizer]:
    """The architecture and tokenizer of ``model`` without its weights (the global scheduler
    tokenizes for its instances)."""
    if model.startswith(DUMMY_PREFIX):
        arch = dummy_arch(model)
        return arch, Tokenizer.dummy(arch.vocab_size)
    path = Path(model)
    return read_arch(path), Tokenizer.from_pretrained(path)


def dummy_arch(model: str) -> LlamaArch:
    preset = model.removeprefix(DUMMY_PREFIX)
    if preset not in PRESETS:
        raise ValueError(f"unknown dummy preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def read_arch(path: Path) -> LlamaArch:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (or use dummy:<preset>)")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: not a Hugging Face model directory")
    return LlamaArch.from_hf_config(json.loads(config.read_text()))


def hf_tensor_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Llama checkpoint of ``arch`` holds, in a fixed order."""
    h, i = arch.hidden_size, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.q_size, h),
            p + "self_attn.k_proj.weight": (arch.kv_size, h),
            p + "self_attn.v_proj.weight": (arch.kv_size, h),
            p + "self_attn.o_proj.weight": (h, arch.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if arch.attention_bias:
            for proj, size in (
                ("q", arch.q_size),
                ("k", arch.kv_size),
                ("v", arch.kv_size),
                ("o", h),
            ):
                shapes[p + f"self_attn.{proj}_proj.bias"] = (size,)
        if arch.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (i,),
                p + "mlp.up_proj.bias": (i,),
                p + "mlp.down_proj.bias": (h,),
            }
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def dummy_state_dict(
    arch: LlamaArch, seed: int, dtype: torch.dtype, device: torch.device
) -> TensorMap:
    """Deterministic random weights: N(0, 0.02) matrices, unit norms, zero biases (per device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: TensorMap = {}
    for name, shape in hf_tensor_shapes(arch).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device) * _INIT_STD
        tensors[name] = t.to(dtype)
    return tensors


def export_hf(model: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``dummy:<preset>`` as a Hugging Face directory (fp32 safetensors, config, tokenizer)."""
    arch = dummy_arch(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dummy_state_dict(arch, seed, torch.float32, torch.device("cpu"))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", {"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    Tokenizer.dummy(arch.vocab_size).save_pretrained(out)
    return out


class _ShardReader:
    """Mapping-like access to the tensors of a directory's safetensors shards (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self._files = self._tensor_files(path)

    @staticmethod
    def _tensor_files(path: Path) -> dict[str, Path]:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            for shard_name in sorted(set(weight_map.values())):
                if not (path / shard_name).is_file():
                    raise FileNotFoundError(
                        f"shard {path / shard_name} listed in {index.name} is missing"
                    )
            return {name: path / shard_name for name, shard_name in weight_map.items()}
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        files: dict[str, Path] = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                files |= {name: shard for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        with safe_open(str(self._files[name]), framework="pt") as f:
            tensor: torch.Tensor = f.get_tensor(name)
        return tensor


class _TensorSource:
    """Reads named tensors with shape checks, cast to dtype on device."""

    def __init__(
        self,
        arch: LlamaArch,
        source: TensorMap | _ShardReader,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._shapes = hf_tensor_shapes(arch)
        self._source = source
        self._dtype = dtype
        self._device = device

    def get(self, name: str) -> torch.Tensor:
        if name not in self._source:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        t = self._source[name]
        expected = self._shapes[name]
        if tuple(t.shape) != expected:
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, config {expected}"
            )
        return t.to(device=self._device, dtype=self._dtype)

    def cat(self, *names: str) -> torch.Tensor:
        return torch.cat([self.get(n) for n in names], dim=0).contiguous()

    def packed(self, *names: str) -> torch.Tensor:
        """Matrices ``[out_i, in]`` fused along ``out``, in the model's packed layout."""
        return pack_weight(torch.cat([self.get(n) for n in names], dim=0))

    def maybe_cat(self, *names: str) -> torch.Tensor | None:
        return self.cat(*names) if names[0] in self._shapes else None


def fuse_weights(
    arch: LlamaArch, source: TensorMap | _ShardReader, dtype: torch.dtype, device: torch.device
) -> LlamaWeights:
    src = _TensorSource(arch, source, dtype, device)
    layers = list(_fused_layers(arch, src))
    embed = src.get("model.embed_tokens.weight")
    lm_head = pack_weight(embed) if arch.tie_word_embeddings else src.packed("lm_head.weight")
    return LlamaWeights(
        embed=embed, layers=layers, norm=src.get("model.norm.weight"), lm_head=lm_head
    )


def _fused_layers(arch: LlamaArch, src: _TensorSource) -> Iterator[LayerWeights]:
    for n in range(arch.num_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        yield LayerWeights(
            input_norm=src.get(f"model.layers.{n}.input_layernorm.weight"),
            qkv=src.packed(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            o=src.packed(a + "o_proj.weight"),
            post_norm=src.get(f"model.layers.{n}.post_attention_layernorm.weight"),
            gate_up=src.packed(m + "gate_proj.weight", m + "up_proj.weight"),
            down=src.packed(m + "down_proj.weight"),
            qkv_bias=src.maybe_cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            o_bias=src.maybe_cat(a + "o_proj.bias"),
            gate_up_bias=src.maybe_cat(m + "gate_proj.bias", m + "up_proj.bias"),
            down_bias=src.maybe_cat(m + "down_proj.bias"),
        )
