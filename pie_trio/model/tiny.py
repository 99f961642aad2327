"""A tiny random-weight model on the real tokenizer, for fast tests of everything above the model.

It runs the very same model code as the real one (2 layers, hidden 64, 4 heads over 2 KV heads:
grouped-query attention included), with seeded weights, so results are reproducible and a test
of the paged cache, masks or sampling finishes in milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pie_trio.model.config import ModelConfig
from pie_trio.model.hardware import choose_dtype
from pie_trio.model.runner import ModelRunner
from pie_trio.model.tokenizer import Tokenizer
from pie_trio.model.weights import DEFAULT_MODEL_NAME, default_model_path, read_gguf_metadata

TINY_NAME = "tiny-random-llama"


def tiny_config(architecture: str = "llama", vocab_size: int = 49152) -> ModelConfig:
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position=2048,
        tie_embeddings=architecture != "qwen2",
        qkv_bias=architecture == "qwen2",
    )


def tiny_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights, named as in Hugging Face checkpoints.

    Scales keep activations of order one, so masking or moving a token changes the logits far
    beyond rounding noise.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out: int, inp: int) -> torch.Tensor:
        return normal(out, inp, std=inp**-0.5)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.1)

    hidden, heads, kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
    q_size, kv_size = heads * config.head_dim, kv_heads * config.head_dim
    tensors = {
        "model.embed_tokens.weight": normal(config.vocab_size, hidden, std=1.0),
        "model.norm.weight": norm(hidden),
    }
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = linear(config.vocab_size, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": norm(hidden),
            p + "post_attention_layernorm.weight": norm(hidden),
            p + "self_attn.q_proj.weight": linear(q_size, hidden),
            p + "self_attn.k_proj.weight": linear(kv_size, hidden),
            p + "self_attn.v_proj.weight": linear(kv_size, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, q_size),
            p + "mlp.gate_proj.weight": linear(config.intermediate_size, hidden),
            p + "mlp.up_proj.weight": linear(config.intermediate_size, hidden),
            p + "mlp.down_proj.weight": linear(hidden, config.intermediate_size),
        }
        if config.qkv_bias:
            tensors |= {
                p + "self_attn.q_proj.bias": normal(q_size, std=0.1),
                p + "self_attn.k_proj.bias": normal(kv_size, std=0.1),
                p + "self_attn.v_proj.bias": normal(kv_size, std=0.1),
            }
    return tensors


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2's byte-level BPE), built once per process."""
    meta = read_gguf_metadata(default_model_path())
    return Tokenizer.from_gguf_metadata(meta, vocab_size=49152)


def tiny_runner(
    dtype: str | torch.dtype = "fp32",
    num_pages: int = 64,
    page_size: int = 16,
    num_slots: int = 64,
    seed: int = 0,
    architecture: str = "llama",
    device: str | torch.device = "cpu",
) -> ModelRunner:
    """A fresh runner (own KV pool) on the tiny model; fp32 by default for exact comparisons."""
    config = tiny_config(architecture)
    device = torch.device(device)
    return ModelRunner(
        f"{TINY_NAME} ({DEFAULT_MODEL_NAME} tokenizer)",
        config,
        tiny_tensors(config, seed),
        default_tokenizer(),
        device=device,
        dtype=choose_dtype(dtype, device).dtype,
        num_pages=num_pages,
        page_size=page_size,
        num_slots=num_slots,
        seed=seed,
    )
