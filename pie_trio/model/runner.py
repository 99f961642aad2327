"""`ModelRunner`: the model layer's `Runner` (see `interface.py` and docs/layers.md).

It owns the weights, the tokenizer and the KV pool, checks calls against them, and runs batches
of calls synchronously. The executor calls `forward`/`embed`/`copy_kv`/`mask_kv` (and the swap
calls, `swap_out_kv`/`swap_in_kv`/`drop_swapped_kv`) from its single worker thread and `check`
from the trio thread; nothing here blocks on anything but compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pie_trio.model.batch import build_batch
from pie_trio.model.calls import (
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    ForwardResult,
    MaskKv,
    SwapInKv,
    SwapOutKv,
)
from pie_trio.model.checks import ModelLimits, check_call
from pie_trio.model.config import ModelConfig
from pie_trio.model.cuda_graphs import DecodeGraphs
from pie_trio.model.hardware import (
    choose_dtype,
    choose_weights,
    dtype_for_weights,
    log_choice,
    resolve_device,
)
from pie_trio.model.interface import ModelInfo
from pie_trio.model.kv_cache import (
    DEFAULT_EMBED_SLOTS,
    KvCache,
    default_kv_budget,
    pages_for_budget,
)
from pie_trio.model.llama import LlamaModel
from pie_trio.model.quant import Weight
from pie_trio.model.sampling import results_for
from pie_trio.model.tokenizer import Tokenizer
from pie_trio.model.weights import load_model_files, projection_types


class ModelRunner:
    """Runs batches of calls on one model and its KV pool."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        tensors: Mapping[str, Weight],
        tokenizer: Tokenizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        kv_memory: int | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        num_slots: int = DEFAULT_EMBED_SLOTS,
        seed: int | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.model = LlamaModel(config, tensors, dtype, device)
        if num_pages is None:
            budget = kv_memory if kv_memory is not None else default_kv_budget(device)
            num_pages = pages_for_budget(config, budget, page_size, dtype)
        self.kv = KvCache(config, num_pages, page_size, num_slots, dtype, device)
        self.graphs = DecodeGraphs.for_device(self.model, self.kv, self.model.kernels)
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.limits = ModelLimits(
            num_pages=num_pages,
            page_size=page_size,
            num_slots=num_slots,
            vocab_size=config.vocab_size,
            max_position=config.max_position,
        )
        self.info = ModelInfo(
            name=name,
            page_size=page_size,
            vocab_size=config.vocab_size,
            stop_tokens=list(tokenizer.stop_tokens),
            chat_template=tokenizer.chat_template,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            max_position=config.max_position,
            num_pages=num_pages,
            num_slots=num_slots,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            weights=self.model.weights,
        )

    @classmethod
    def load(
        cls,
        model: str | Path = "default",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        kv_memory: int | None = None,
        page_size: int = 16,
        num_slots: int = DEFAULT_EMBED_SLOTS,
        num_pages: int | None = None,
        seed: int | None = None,
        weights: str = "auto",
    ) -> ModelRunner:
        """Load "default" (SmolLM2-135M-Instruct), a `.gguf` file or a Hugging Face directory.

        The KV pool holds `num_pages` pages if given, else as many as fit in `kv_memory` bytes
        (default: 512 MiB on CPU, half the free memory on CUDA). `weights`: "int4" keeps a GGUF
        file's Q4_0/Q4_1 projections packed (CPU only), "bf16"/"fp32" dequantises them to that
        dtype, "auto" picks (see `hardware.choose_weights`).
        """
        device = resolve_device(device)
        weights_choice = choose_weights(weights, dtype is not None, device,
                                        projection_types(model))
        choice = choose_dtype(dtype_for_weights(dtype, weights), device, weights_choice.int4)
        log_choice(device, choice, weights_choice)
        dtype = choice.dtype
        loaded = load_model_files(model, dtype, int4=weights_choice.int4)
        return cls(
            loaded.name,
            loaded.config,
            loaded.tensors,
            loaded.tokenizer,
            device=device,
            dtype=dtype,
            kv_memory=kv_memory,
            num_pages=num_pages,
            page_size=page_size,
            num_slots=num_slots,
            seed=seed,
        )

    # -- the executor's calls ------------------------------------------------------------------

    def check(self, call: object) -> None:
        """Raise `CallError` (with the reason) if `call` cannot run on this model and pool."""
        check_call(call, self.limits)

    @torch.inference_mode()
    def forward(self, calls: list[Forward]) -> list[ForwardResult]:
        """One ragged forward pass over every call's tokens; results in call order."""
        if not calls:
            return []
        logits = self.logits(calls)
        counts = [len(call.output_indices) for call in calls]
        return results_for(logits, calls, counts, self.generator)

    @torch.inference_mode()
    def logits(self, calls: list[Forward]) -> torch.Tensor:
        """The forward pass alone: raw fp32 logits `[outputs, vocab]` of every call's output
        indices, in call order (no vocabulary mask, bias or sampling applied)."""
        if self.graphs is not None:  # a plain decode batch replays its captured graph
            logits = self.graphs.logits(calls)
            if logits is not None:
                return logits
        batch = build_batch(calls, self.kv)
        return self.model.forward(batch, self.kv)

    @torch.inference_mode()
    def embed(self, calls: list[Embed]) -> None:
        """Store token embeddings into embedding slots."""
        for call in calls:
            tokens = torch.tensor(call.tokens, dtype=torch.long, device=self.device)
            slots = torch.tensor(call.slots, dtype=torch.long, device=self.device)
            self.kv.embeddings[slots] = self.model.embed(tokens)

    @torch.inference_mode()
    def clear(self, pages: list[int], slots: list[int]) -> None:
        """Wipe pages and embedding slots that just changed hands (see `KvCache.clear`)."""
        self.kv.clear(pages, slots)

    @torch.inference_mode()
    def copy_kv(self, calls: list[CopyKv]) -> None:
        """Copy KV rows (all layers, and their masked flags), in call order."""
        for call in calls:
            self.kv.copy(call.src_page, call.dst_page, call.src_offset, call.dst_offset, call.count)

    @torch.inference_mode()
    def mask_kv(self, calls: list[MaskKv]) -> None:
        """Mark slots masked (never attended) or unmasked, in call order.

        A slot stays masked until it is unmasked or a forward writes fresh K/V into it.
        """
        for call in calls:
            self.kv.set_masked(call.page, call.slots, call.masked)

    @torch.inference_mode()
    def swap_out_kv(self, calls: list[SwapOutKv]) -> list[int]:
        """Copy whole pages to host memory, in call order; the bytes each call copied."""
        return [self.kv.swap_out(call.pages, call.keys) for call in calls]

    @torch.inference_mode()
    def swap_in_kv(self, calls: list[SwapInKv]) -> list[int]:
        """Copy host copies back into pages (dropping them), in call order; bytes per call."""
        return [self.kv.swap_in(call.keys, call.pages) for call in calls]

    def drop_swapped_kv(self, calls: list[DropSwappedKv]) -> None:
        """Forget host copies that will not be swapped back in."""
        for call in calls:
            self.kv.drop_host(call.keys)
