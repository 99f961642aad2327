"""The shape of a Llama-family model, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Hugging Face `model_type` / GGUF `general.architecture` values this model code runs.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only Llama-family transformer.

    Qwen2 differs from Llama only by biases on the q/k/v projections (`qkv_bias`); Mistral only by
    its (optional) sliding window, which this engine does not apply (see docs/model.md).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V, all layers, for one token slot."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json`."""
        model_type = hf.get("model_type", "")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        # transformers 5 writes RoPE settings as `rope_parameters`; older files as
        # `rope_theta` plus an optional `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always carries q/k/v biases; Llama may say so with `attention_bias`.
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            rope_scaling=None if scaling_type == "default" else rope,
        )
