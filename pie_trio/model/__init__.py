"""The model layer: Llama-family forward over a paged KV cache, tokenizer, weights, sampling.

`ModelRunner` (in `runner.py`) is its interface to the executor; see docs/model.md.
"""

from pie_trio.model.runner import ModelInfo, ModelRunner

__all__ = ["ModelInfo", "ModelRunner"]
