"""Loading Hugging Face model directories (Llama, Mistral, Qwen2), checked against transformers
running the very same files. The checkpoints are tiny random ones written by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from pie_trio.model import ModelRunner
from pie_trio.model.calls import Forward
from pie_trio.model.tiny import default_tokenizer

transformers = pytest.importorskip("transformers")

SIZES = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SIZES, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **SIZES,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**SIZES, head_dim=32, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=False),
}
# fp32 on both sides: only the order of floating-point operations differs.
ATOL = 1e-4


def write_checkpoint(family: str, path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config.eos_token_id = 2
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random biases too, so Qwen2's q/k/v biases matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer = default_tokenizer()
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template})
    )
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_directory_matches_transformers(family, tmp_path):
    reference = write_checkpoint(family, tmp_path)
    runner = ModelRunner.load(tmp_path, device="cpu", dtype="fp32", num_pages=8)
    assert runner.info.name == tmp_path.name
    assert 2 in runner.info.stop_tokens
    text = "The quick brown fox jumps over the lazy dog, 12 times, and then 3 more times."
    ids = runner.tokenizer.encode(text)
    assert ids == default_tokenizer().encode(text)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    n = len(ids)
    assert 16 < n - 1 <= 32  # the prefill fills the first page and spills into the second
    prefill = Forward(
        owner="t",
        kv_pages=[3, 1],
        last_page_len=(n - 2) % 16 + 1,
        positions=list(range(n - 1)),
        tokens=ids[:-1],
        output_indices=list(range(n - 1)),
    )
    decode = Forward(
        owner="t",
        kv_pages=[3, 1],
        last_page_len=(n - 1) % 16 + 1,
        positions=[n - 1],
        tokens=ids[-1:],
        output_indices=[0],
    )
    for call in (prefill, decode):
        runner.check(call)
    ours = torch.cat([runner.logits([prefill]), runner.logits([decode])])
    assert (ours - expected).abs().max().item() < ATOL


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        ModelRunner.load(tmp_path / "nothing-here")
