"""The model layer: Llama-family forward over a paged KV cache, tokenizer, weights, sampling.

`Runner` (in `interface.py`) is the Protocol the executor types against and `ModelRunner` (in
`runner.py`) the runner that satisfies it; see docs/model.md.
"""

from pie_trio.model.interface import ModelInfo, Runner
from pie_trio.model.runner import ModelRunner

__all__ = ["ModelInfo", "ModelRunner", "Runner"]
