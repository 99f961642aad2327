"""One rank of a tensor-parallel model: its shard of the weights and of the KV cache.

`TensorParallelRunner` (`tensor_parallel.py`) starts N of these as
`python -m pie_trio.model.tensor_shard FD`. Each answers the very requests a `--model-process`
child answers, with the same loop (`remote.serve_child`); only the runner it builds differs.

Megatron-style sharding, rank r of N:
- attention by KV-head groups: KV heads [r*kv/N, (r+1)*kv/N) and the query heads that share
  them (rows of q, k, v and their biases), and the matching input columns of o_proj;
- the MLP by columns: rows [r*ffn/N, (r+1)*ffn/N) of gate and up, those input columns of down;
- embeddings, norms and the LM head whole on every rank.

A rank's o_proj and down projections therefore give partial sums; `LlamaModel.reduce` is set
to an all-reduce, so every rank carries the whole hidden state from layer to layer and ends
with the same logits. Its KV cache holds its own KV heads only, under the same page ids as
every other rank, so page ids and the call records do not change. Rank 0's answers are the
runner's; the others compute the same sampling and their answers are dropped.

Weights are dense: packed int4 blocks would have to be split along their 32-input groups, and
torch's int4 kernel has no sharded form here, so `weights="int4"` is refused and "auto" loads
the compute dtype. CUDA graphs are off: a captured step would have to capture the collective.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pie_trio.model import remote
from pie_trio.model.config import ModelConfig
from pie_trio.model.hardware import (
    WeightsChoice,
    choose_dtype,
    dtype_for_weights,
    log_choice,
    resolve_device,
)
from pie_trio.model.kv_cache import (
    DEFAULT_CUDA_KV_SHARE,
    DEFAULT_EMBED_SLOTS,
    default_kv_budget,
    pages_for_budget,
)
from pie_trio.model.quant import Weight
from pie_trio.model.runner import ModelRunner
from pie_trio.model.tiny import TINY_NAME, default_tokenizer, tiny_config, tiny_tensors
from pie_trio.model.tokenizer import Tokenizer
from pie_trio.model.weights import DEFAULT_MODEL_NAME, load_model_files

# How long a collective (the rendezvous included) waits for the other ranks before it fails.
GROUP_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Shard:
    """Which rank this process is, of how many, and where the ranks meet."""

    rank: int
    world: int
    address: str  # host:port of the rendezvous


@dataclass
class Source:
    """The whole model as loaded, before sharding."""

    name: str
    config: ModelConfig
    tensors: Mapping[str, Weight]
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype


def check_divisible(config: ModelConfig, world: int) -> None:
    """Raise `ValueError` unless heads, KV heads and MLP columns split evenly over `world`."""
    if config.num_kv_heads % world or config.intermediate_size % world:
        raise ValueError(
            f"tensor parallelism {world} needs the KV heads and MLP columns to divide by it; "
            f"this model has {config.num_heads} heads over {config.num_kv_heads} KV heads and "
            f"{config.intermediate_size} MLP columns"
        )


def shard_config(config: ModelConfig, world: int) -> ModelConfig:
    """The shape one rank runs: a 1/world share of the heads and MLP columns."""
    check_divisible(config, world)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // world,
        num_kv_heads=config.num_kv_heads // world,
        intermediate_size=config.intermediate_size // world,
    )


def shard_tensors(
    tensors: Mapping[str, Weight], config: ModelConfig, rank: int, world: int
) -> dict[str, Weight]:
    """Rank `rank`'s weights (see the module docstring); copies, so the whole ones can go."""
    q = config.num_heads // world * config.head_dim
    kv = config.num_kv_heads // world * config.head_dim
    ffn = config.intermediate_size // world
    split: dict[str, tuple[int, int]] = {}  # name -> (dimension, size of one rank's part)
    for i in range(config.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            split |= {attn + f"q_proj.{kind}": (0, q), attn + f"k_proj.{kind}": (0, kv),
                      attn + f"v_proj.{kind}": (0, kv)}
        split |= {attn + "o_proj.weight": (1, q), mlp + "gate_proj.weight": (0, ffn),
                  mlp + "up_proj.weight": (0, ffn), mlp + "down_proj.weight": (1, ffn)}
    shard: dict[str, Weight] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} is int4; tensor parallelism shards dense weights only")
        if name in split:
            dim, size = split[name]
            tensor = tensor.narrow(dim, rank * size, size).clone()
        shard[name] = tensor
    return shard


# -- loading -----------------------------------------------------------------------------------


def load_tiny(options: dict[str, Any]) -> Source:
    """The random-weight test model, as `tiny.tiny_runner` builds it (CPU)."""
    config = tiny_config(options.pop("architecture", "llama"))
    device = torch.device(options.pop("device", "cpu"))
    dtype = choose_dtype(options.pop("dtype", "fp32"), device).dtype
    options.setdefault("seed", 0)  # tiny_runner's defaults
    options.setdefault("num_slots", 64)
    tensors = tiny_tensors(config, options["seed"])
    return Source(f"{TINY_NAME} ({DEFAULT_MODEL_NAME} tokenizer)", config, tensors,
                  default_tokenizer(), device, dtype)


def load_source(options: dict[str, Any], shard: Shard) -> Source:
    """`ModelRunner.load`'s choices, dense weights, on this rank's device (cuda:rank on CUDA)."""
    device = resolve_device(options.pop("device", None))
    if device.type == "cuda":
        if shard.world > torch.cuda.device_count():
            raise ValueError(f"tensor parallelism {shard.world} needs as many GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        device = torch.device("cuda", shard.rank)
    dtype, weights = options.pop("dtype", None), options.pop("weights", "auto")
    if weights == "int4":
        raise ValueError("tensor parallelism shards dense weights: use --weights auto, bf16 "
                         "or fp32, not int4")
    choice = choose_dtype(dtype_for_weights(dtype, weights), device)
    if shard.rank == 0:
        log_choice(device, choice, WeightsChoice(False, "tensor parallelism shards dense weights"))
    loaded = load_model_files(options.pop("model", "default"), choice.dtype, int4=False)
    return Source(loaded.name, loaded.config, loaded.tensors, loaded.tokenizer, device,
                  choice.dtype)


# -- the group ---------------------------------------------------------------------------------


def join_group(shard: Shard, device: torch.device) -> None:
    """Meet the other ranks: NCCL between GPUs, gloo on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://{shard.address}", rank=shard.rank,
                            world_size=shard.world, timeout=GROUP_TIMEOUT)


def all_reduce(partial: torch.Tensor) -> torch.Tensor:
    """Sum a projection's partial outputs over the ranks, in place."""
    dist.all_reduce(partial)
    return partial


def agreed_pages(source: Source, config: ModelConfig, options: dict[str, Any]) -> int:
    """KV pages every rank can hold: what the budget gives this rank, the least over ranks
    (GPUs may have different free memory; page ids must mean the same on all)."""
    if options.get("num_pages") is not None:
        return int(options["num_pages"])
    budget = options.get("kv_memory")
    if budget is None:
        budget = default_kv_budget(source.device)
        if source.device.type == "cuda":  # half the free memory left once the weights arrive
            weight_bytes = sum(t.numel() for t in source.tensors.values()
                               if isinstance(t, torch.Tensor)) * source.dtype.itemsize
            budget -= int(weight_bytes * DEFAULT_CUDA_KV_SHARE)
    pages = torch.tensor([pages_for_budget(config, budget, options.get("page_size", 16),
                                           source.dtype)], device=source.device)
    dist.all_reduce(pages, op=dist.ReduceOp.MIN)
    return int(pages.item())


def build_shard(factory: str, options: dict[str, Any], threads: int | None) -> ModelRunner:
    """`remote.serve_child`'s runner factory: load, keep this rank's shard, join the group."""
    options = dict(options)
    shard = Shard(**options.pop("shard"))
    if threads is not None:
        torch.set_num_threads(threads)
    source = load_tiny(options) if factory == "tiny" else load_source(options, shard)
    config = shard_config(source.config, shard.world)  # every rank refuses alike, before joining
    tensors = shard_tensors(source.tensors, source.config, shard.rank, shard.world)
    source.tensors = tensors
    join_group(shard, source.device)
    runner = ModelRunner(source.name, config, tensors, source.tokenizer, device=source.device,
                         dtype=source.dtype, num_pages=agreed_pages(source, config, options),
                         page_size=options.get("page_size", 16),
                         num_slots=options.get("num_slots", DEFAULT_EMBED_SLOTS),
                         seed=options.get("seed"))
    runner.model.reduce = all_reduce
    runner.graphs = None
    return runner


if __name__ == "__main__":
    sys.exit(remote.main(sys.argv, build_shard))
