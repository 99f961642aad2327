"""The paged, ragged forward on the tiny model (fp32): batching, paging, masks, KV operations
and embedding slots must not change what a sequence computes."""

from __future__ import annotations

import pytest
import torch

from pie_trio.model.batch import DECODE_QUERY_LIMIT, expand_brle
from pie_trio.model.calls import CopyKv, Embed, Forward, MaskKv

PAGE = 16
# fp32 throughout; batching and paging only change the order of floating-point reductions
# (different matmul shapes, padded softmax), which moves logits by ~1e-6.
ATOL = 1e-4


def tokens_of(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=gen).tolist()


def call(
    pages: list[int],
    tokens: list[int],
    context: int,
    positions: list[int] | None = None,
    **extra,
) -> Forward:
    """A forward of `tokens` as the last slots of a `context`-slot context on `pages`."""
    n = len(tokens)
    return Forward(
        owner="t",
        kv_pages=pages[: -(-context // PAGE)],
        last_page_len=(context - 1) % PAGE + 1,
        positions=positions if positions is not None else list(range(context - n, context)),
        tokens=tokens,
        output_indices=extra.pop("output_indices", list(range(n))),
        **extra,
    )


def run(runner, *calls: Forward) -> torch.Tensor:
    for c in calls:
        runner.check(c)
    return runner.logits(list(calls))


def test_ragged_batch_equals_each_sequence_alone(tiny_runner):
    from pie_trio.model.tiny import tiny_runner as fresh

    prompts = [tokens_of(n, seed=n) for n in (5, 20, 1, 33, 9)]
    pages = [[10 * i + j for j in range(4)] for i in range(len(prompts))]
    prefill = [call(p, t, len(t)) for p, t in zip(pages, prompts, strict=True)]
    together = run(tiny_runner, *prefill)
    alone_runner = fresh()
    alone = torch.cat([run(alone_runner, c) for c in prefill])
    assert torch.allclose(together, alone, atol=ATOL)

    # Next step mixes decode tokens, speculative blocks and a prefill chunk in one batch.
    steps = [tokens_of(n, seed=100 + n) for n in (1, 3, 1, DECODE_QUERY_LIMIT + 4, 2)]
    step = [call(p, s, len(t) + len(s)) for p, t, s in zip(pages, prompts, steps, strict=True)]
    together = run(tiny_runner, *step)
    alone = torch.cat([run(alone_runner, c) for c in step])
    assert torch.allclose(together, alone, atol=ATOL)


def test_scattered_pages_equal_contiguous(tiny_runner):
    prompt = tokens_of(40)
    contiguous = run(tiny_runner, call([0, 1, 2], prompt, 40))
    scattered = run(tiny_runner, call([17, 5, 11], prompt, 40))
    assert torch.allclose(contiguous, scattered, atol=ATOL)
    # and decode steps over them
    for i, token in enumerate(tokens_of(3, seed=1)):
        a = run(tiny_runner, call([0, 1, 2], [token], 41 + i))
        b = run(tiny_runner, call([17, 5, 11], [token], 41 + i))
        assert torch.allclose(a, b, atol=ATOL)


def test_chunked_prefill_equals_whole_prefill(tiny_runner):
    prompt = tokens_of(37)
    whole = run(tiny_runner, call([0, 1, 2], prompt, 37))
    chunks = [(0, 12), (12, 30), (30, 37)]
    pieces = [run(tiny_runner, call([6, 3, 9], prompt[a:b], b)) for a, b in chunks]
    assert torch.allclose(whole, torch.cat(pieces), atol=ATOL)


def skipping(i: int, skipped: set[int]) -> list[int]:
    """BRLE mask for the token at context slot i: causal, but slots in `skipped` (other than
    its own) are not attended."""
    runs, attend, run_length = [], True, 0
    for slot in range(i + 1):
        wanted = slot == i or slot not in skipped
        if wanted != attend:
            runs.append(run_length)
            attend, run_length = wanted, 0
        run_length += 1
    return [*runs, run_length]


def test_mask_removes_exactly_the_masked_token(tiny_runner):
    prompt = tokens_of(12)
    skipped = 4
    masks = [skipping(i, {skipped}) for i in range(len(prompt))]
    masked = run(tiny_runner, call([0], prompt, 12, masks=masks))
    # The same sequence without the token, every other token keeping its position.
    without = prompt[:skipped] + prompt[skipped + 1 :]
    positions = [p for p in range(12) if p != skipped]
    reference = run(tiny_runner, call([5], without, 11, positions=positions))
    kept = [i for i in range(12) if i != skipped]
    assert torch.allclose(masked[kept], reference, atol=ATOL)
    # Without the mask the later tokens do differ: the comparison has teeth.
    plain = run(tiny_runner, call([7], prompt, 12))
    assert not torch.allclose(plain[kept[skipped:]], reference[skipped:], atol=1e-2)


def test_mask_in_decode_batch(tiny_runner):
    """A masked decode token in a batch with unmasked ones (the padded decode path)."""
    prompt = tokens_of(20)
    skipped = {3, 4}
    masks = [skipping(i, skipped) for i in range(20)]
    run(tiny_runner, call([0, 1], prompt, 20, masks=masks), call([2, 3], prompt[:15], 15))
    token = tokens_of(1, seed=3)
    masked, other = run(
        tiny_runner,
        call([0, 1], token, 21, masks=[skipping(20, skipped)]),
        call([2, 3], token, 16),
    ).unbind()
    # Reference: a prompt that never had tokens 3 and 4, positions kept.
    keep = [i for i in range(20) if i not in skipped]
    ref_tokens = [prompt[i] for i in keep] + token
    reference = run(tiny_runner, call([8, 9], ref_tokens, 19, positions=[*keep, 20]))
    assert torch.allclose(masked, reference[-1], atol=ATOL)
    alone = run(tiny_runner, call([5], prompt[:15] + token, 16))
    assert torch.allclose(other, alone[-1], atol=ATOL)


def test_skipping_helper():
    assert skipping(5, {2}) == [2, 1, 3]
    assert skipping(2, {0, 1}) == [0, 2, 1]
    assert skipping(1, {1}) == [2]


def test_all_skip_mask_is_finite(tiny_runner):
    prompt = tokens_of(4)
    out = run(tiny_runner, call([0], prompt, 4, masks=[[0, 1], [0, 2], [0, 3], [0, 4]]))
    assert torch.isfinite(out).all()


def test_mask_kv_hides_slots_until_unmasked_or_rewritten(tiny_runner):
    prompt = tokens_of(6)
    token = tokens_of(1, seed=9)
    run(tiny_runner, call([3], prompt[:5], 5))
    tiny_runner.mask_kv([MaskKv(owner="t", page=3, slots=[4])])
    hidden = run(tiny_runner, call([3], token, 6))
    reference = run(tiny_runner, call([8], prompt[:4] + token, 5, positions=[0, 1, 2, 3, 5]))
    assert torch.allclose(hidden, reference[-1:], atol=ATOL)

    tiny_runner.mask_kv([MaskKv(owner="t", page=3, slots=[4], masked=False)])
    visible = run(tiny_runner, call([3], token, 6))
    assert torch.allclose(
        visible, run(tiny_runner, call([9], prompt[:5] + token, 6))[-1:], atol=ATOL
    )

    # Writing fresh K/V into a masked slot makes it visible again.
    tiny_runner.mask_kv([MaskKv(owner="t", page=3, slots=[4])])
    run(tiny_runner, call([3], prompt[4:5], 5))
    assert torch.allclose(run(tiny_runner, call([3], token, 6)), visible, atol=ATOL)


def test_copy_kv_copies_rows_of_every_layer(tiny_runner):
    prompt = tokens_of(24)
    token = tokens_of(1, seed=5)
    run(tiny_runner, call([1, 2], prompt, 24))
    tiny_runner.copy_kv(
        [
            CopyKv(owner="t", src_page=1, dst_page=5, src_offset=0, dst_offset=0, count=PAGE),
            CopyKv(owner="t", src_page=2, dst_page=6, src_offset=0, dst_offset=0, count=8),
        ]
    )
    original = run(tiny_runner, call([1, 2], token, 25))
    copied = run(tiny_runner, call([5, 6], token, 25))
    assert torch.allclose(original, copied, atol=ATOL)

    # A partial copy at offsets moves exactly those rows, masked flags included.
    kv = tiny_runner.kv
    tiny_runner.mask_kv([MaskKv(owner="t", page=1, slots=[5])])
    before = kv.k[:, :, 7 * PAGE : 8 * PAGE].clone()
    tiny_runner.copy_kv(
        [CopyKv(owner="t", src_page=1, dst_page=7, src_offset=3, dst_offset=10, count=4)]
    )
    src, dst = slice(PAGE + 3, PAGE + 7), slice(7 * PAGE + 10, 7 * PAGE + 14)
    assert torch.equal(kv.k[:, :, dst], kv.k[:, :, src])
    assert torch.equal(kv.v[:, :, dst], kv.v[:, :, src])
    assert torch.equal(kv.k[:, :, 7 * PAGE : 7 * PAGE + 10], before[:, :, :10])
    assert kv.masked[7 * PAGE + 12] and not kv.masked[7 * PAGE + 11]


def test_embed_then_forward_from_slots_equals_tokens(tiny_runner):
    prompt = tokens_of(10)
    slots = [7, 3, 12, 0, 1, 2, 30, 31, 8, 9]
    tiny_runner.embed([Embed(owner="t", tokens=prompt, slots=slots)])
    from_tokens = run(tiny_runner, call([0], prompt, 10))
    from_slots_call = call([1], prompt, 10)
    from_slots_call.tokens, from_slots_call.embed_slots = None, slots
    from_slots = run(tiny_runner, from_slots_call)
    assert torch.allclose(from_tokens, from_slots, atol=ATOL)
    # Mixed in one batch with a token call.
    mixed_call = call([2], prompt[:4], 4)
    from_slots_call.kv_pages = [3]
    mixed = run(tiny_runner, mixed_call, from_slots_call)
    assert torch.allclose(mixed[4:], from_tokens, atol=ATOL)
    assert torch.allclose(mixed[:4], from_tokens[:4], atol=ATOL)


def test_forward_results_in_call_order(tiny_runner):
    """forward() returns one result per call, with dists and tokens per output index."""
    from pie_trio.model.calls import Sampler

    prompts = [tokens_of(7, seed=1), tokens_of(3, seed=2)]
    calls = [
        call([0], prompts[0], 7, output_indices=[6, 2], top_k=4, sampler=Sampler()),
        call([1], prompts[1], 3, output_indices=[], top_k=2),
    ]
    results = tiny_runner.forward(calls)
    assert len(results) == 2
    assert results[1].dists == [] and results[1].tokens is None
    first = results[0]
    assert len(first.dists) == 2 and len(first.tokens) == 2
    logits = run(tiny_runner, call([2], prompts[0], 7, output_indices=[6, 2]))
    for (ids, probs), row, token in zip(first.dists, logits, first.tokens, strict=True):
        ref_probs, ref_ids = torch.softmax(row, -1).topk(4)
        assert ids == ref_ids.tolist()
        assert torch.allclose(torch.tensor(probs), ref_probs, atol=1e-5)
        assert token == ids[0]


def test_brle_expansion():
    assert expand_brle([2, 1, 3]).tolist() == [True, True, False, True, True, True]
    assert expand_brle([0, 2, 1]).tolist() == [False, False, True]


@pytest.mark.parametrize("dtype", ["bf16"])
def test_tiny_runner_in_bf16_is_close_to_fp32(dtype):
    from pie_trio.model.tiny import tiny_runner as fresh

    prompt = tokens_of(20)
    fp32 = run(fresh(), call([0, 1], prompt, 20))
    low = run(fresh(dtype=dtype), call([4, 2], prompt, 20))
    # bf16 keeps ~3 significant digits; over two layers the logits stay within a few percent.
    assert (fp32 - low).abs().max() < 0.05 * fp32.abs().max()
    assert (fp32.argmax(-1) == low.argmax(-1)).float().mean() > 0.9


def test_decode_batch_split_by_context_length():
    """Short and long contexts in one decode batch attend in separate padded groups."""
    from pie_trio.model.batch import build_batch
    from pie_trio.model.tiny import tiny_runner as fresh

    runner, alone_runner = fresh(num_pages=320), fresh(num_pages=320)
    lengths = [9, 900, 20, 950, 3]
    pages = [list(range(64 * i, 64 * i + 64)) for i in range(len(lengths))]
    prompts = [tokens_of(n, seed=n) for n in lengths]
    for r in (runner, alone_runner):
        run(
            r, *(call(p, t, len(t), output_indices=[]) for p, t in zip(pages, prompts, strict=True))
        )
    steps = [
        call(p, [7 + i], len(t) + 1) for i, (p, t) in enumerate(zip(pages, prompts, strict=True))
    ]
    groups = build_batch(steps, runner.kv).groups
    assert sorted(g.batch for g in groups) == [2, 3]
    together = run(runner, *steps)
    alone = torch.cat([run(alone_runner, c) for c in steps])
    assert torch.allclose(together, alone, atol=ATOL)
