"""Distributions, sampling, vocabulary masks and logit bias, through `ModelRunner.forward`."""

from __future__ import annotations

import math

import pytest
import torch

from pie_trio.model.calls import Forward, Sampler
from pie_trio.model.sampling import sample

PROMPT = [504, 3458, 282, 4649, 314, 1345, 28, 17, 4102, 5]


def forward(runner, sampler=None, top_k=0, outputs=None, **extra) -> tuple:
    n = len(PROMPT)
    call = Forward(
        owner="t",
        kv_pages=[0],
        last_page_len=n,
        positions=list(range(n)),
        tokens=PROMPT,
        output_indices=outputs if outputs is not None else list(range(n)),
        top_k=top_k,
        sampler=sampler,
        **extra,
    )
    runner.check(call)
    (result,) = runner.forward([call])
    logits = runner.logits([call])
    return result, logits


def packed_mask(allowed: set[int], vocab: int) -> bytes:
    bits = bytearray((vocab + 7) // 8)
    for token in allowed:
        bits[token // 8] |= 1 << (token % 8)
    return bytes(bits)


def test_greedy_is_argmax(tiny_runner):
    result, logits = forward(tiny_runner, Sampler())
    assert result.tokens == logits.argmax(-1).tolist()


def test_top_k_distribution_is_softmax_head(tiny_runner):
    result, logits = forward(tiny_runner, top_k=7)
    assert result.tokens is None
    for (ids, probs), row in zip(result.dists, logits, strict=True):
        ref_probs, ref_ids = torch.softmax(row, -1).topk(7)
        assert ids == ref_ids.tolist()
        assert probs == sorted(probs, reverse=True)
        assert torch.allclose(torch.tensor(probs), ref_probs, atol=1e-6)


def test_seed_makes_sampling_reproducible(tiny_runner):
    hot = dict(temperature=2.0)
    a, _ = forward(tiny_runner, Sampler(seed=7, **hot))
    b, _ = forward(tiny_runner, Sampler(seed=7, **hot))
    c, _ = forward(tiny_runner, Sampler(seed=8, **hot))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens  # 10 draws at temperature 2 over 49k tokens
    unseeded, _ = forward(tiny_runner, Sampler(**hot))
    assert len(unseeded.tokens) == len(PROMPT)


@pytest.mark.parametrize(
    "sampler",
    [
        Sampler(temperature=1.0, top_k=1, seed=1),
        Sampler(temperature=1.0, top_p=1e-6, seed=1),
        Sampler(temperature=1.0, min_p=0.999, seed=1),
    ],
    ids=["top_k=1", "top_p~0", "min_p~1"],
)
def test_degenerate_filters_are_greedy(tiny_runner, sampler):
    result, logits = forward(tiny_runner, sampler)
    assert result.tokens == logits.argmax(-1).tolist()


def test_top_k_sampling_stays_in_top_k(tiny_runner):
    _, logits = forward(tiny_runner)
    top = logits.topk(3, dim=-1).indices
    for seed in range(5):
        result, _ = forward(tiny_runner, Sampler(temperature=5.0, top_k=3, seed=seed))
        for token, allowed in zip(result.tokens, top.tolist(), strict=True):
            assert token in allowed


def test_vocab_mask_constrains_tokens_and_distribution(tiny_runner):
    allowed = {17, 4242, 30000}
    mask = packed_mask(allowed, tiny_runner.info.vocab_size)
    greedy, logits = forward(tiny_runner, Sampler(), top_k=5, vocab_mask=mask)
    best = [max(allowed, key=lambda t, r=row: r[t].item()) for row in logits]
    assert greedy.tokens == best
    for ids, probs in greedy.dists:
        assert set(ids[:3]) == allowed and probs[3:] == [0.0, 0.0]
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    hot, _ = forward(tiny_runner, Sampler(temperature=10.0, seed=3), vocab_mask=mask)
    assert set(hot.tokens) <= allowed


def test_logit_bias_shifts_logits(tiny_runner):
    _, logits = forward(tiny_runner)
    forced = 12345
    result, _ = forward(tiny_runner, Sampler(), logit_bias={forced: 1000.0})
    assert result.tokens == [forced] * len(PROMPT)
    first = logits.argmax(-1)[0].item()
    banned, _ = forward(tiny_runner, Sampler(), outputs=[0], logit_bias={first: -1e9})
    assert banned.tokens[0] == logits[0].topk(2).indices[1].item()


def test_sample_frequencies_follow_filters():
    """The sampler's filters on a known distribution, over many draws."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    gen = torch.Generator().manual_seed(0)

    def freqs(sampler: Sampler) -> torch.Tensor:
        tokens = sample(logits, sampler, gen)
        return torch.bincount(tokens, minlength=4).float() / len(tokens)

    assert torch.allclose(freqs(Sampler(temperature=1.0)), probs, atol=0.02)
    # top_p 0.7: the smallest head reaching 0.7 is {0, 1}, renormalised to 5/8, 3/8
    assert torch.allclose(
        freqs(Sampler(temperature=1.0, top_p=0.7)), torch.tensor([0.625, 0.375, 0, 0]), atol=0.02
    )
    # min_p 0.4: keep tokens with p >= 0.4 * 0.5 = 0.2
    assert torch.allclose(
        freqs(Sampler(temperature=1.0, min_p=0.4)), torch.tensor([0.625, 0.375, 0, 0]), atol=0.02
    )
    # top_k 3 keeps 0.5, 0.3, 0.15
    assert torch.allclose(
        freqs(Sampler(temperature=1.0, top_k=3)),
        torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95,
        atol=0.02,
    )
    # temperature 0.5 squares and renormalises the probabilities
    squared = probs**2 / (probs**2).sum()
    assert torch.allclose(freqs(Sampler(temperature=0.5)), squared, atol=0.02)
