"""`ModelRunner.check` rejects every malformed call with a CallError that names the problem."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pie_trio.model.calls import CallError, CopyKv, Embed, Forward, MaskKv, Sampler
from pie_trio.model.tiny import tiny_config, tiny_runner

VOCAB = tiny_config().vocab_size
GOOD = Forward(
    owner="t",
    kv_pages=[0, 1],
    last_page_len=4,
    positions=[17, 18, 19],
    tokens=[10, 11, 12],
    output_indices=[2],
    top_k=3,
    sampler=Sampler(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1),
    vocab_mask=b"\xff" * ((VOCAB + 7) // 8),
    logit_bias={5: 1.5},
    masks=[[18], [19], [15, 4, 1]],
)


def forward(**changes) -> Forward:
    return dataclasses.replace(GOOD, **changes)


def sampler(**changes) -> Sampler:
    return dataclasses.replace(GOOD.sampler, **changes)


BAD_CALLS = {
    "page out of range": (forward(kv_pages=[0, 8]), "kv_pages [8] out of range"),
    "negative page": (forward(kv_pages=[-1, 1]), "kv_pages [-1] out of range"),
    "no pages": (forward(kv_pages=[]), "at least one KV page"),
    "last_page_len zero": (forward(last_page_len=0), "last_page_len 0"),
    "last_page_len past page": (forward(last_page_len=17), "last_page_len 17"),
    "context shorter than input": (
        forward(kv_pages=[0], last_page_len=2, positions=[0, 1, 2], masks=None),
        "shorter than the 3 input tokens",
    ),
    "empty input": (
        forward(tokens=[], positions=[], masks=None, output_indices=[]),
        "no input tokens",
    ),
    "tokens and slots": (forward(embed_slots=[0, 1, 2]), "exactly one of tokens or embed_slots"),
    "neither tokens nor slots": (forward(tokens=None), "exactly one of tokens or embed_slots"),
    "token out of vocab": (forward(tokens=[10, VOCAB, 12]), f"tokens [{VOCAB}] out of range"),
    "negative token": (forward(tokens=[10, -3, 12]), "tokens [-3] out of range"),
    "token not an int": (forward(tokens=[10, "a", 12]), "tokens must be a list of integers"),
    "embed slot out of range": (
        forward(tokens=None, embed_slots=[0, 1, 4]),
        "embed_slots [4] out of range",
    ),
    "position at max": (forward(positions=[17, 18, 2048]), "positions [2048] out of range"),
    "negative position": (forward(positions=[-1, 18, 19]), "positions [-1] out of range"),
    "positions count": (forward(positions=[18, 19]), "2 positions for 3 input tokens"),
    "mask count": (forward(masks=[[18], [19]]), "one BRLE mask per input token"),
    "mask length": (forward(masks=[[18], [19], [15, 4]]), "masks[2] covers 19 slots"),
    "mask negative run": (forward(masks=[[18], [19], [21, -1]]), "negative run length"),
    "output index out of range": (forward(output_indices=[3]), "output_indices [3]"),
    "negative top_k": (forward(top_k=-1), "top_k must be a non-negative integer"),
    "negative temperature": (forward(sampler=sampler(temperature=-0.1)), "temperature"),
    "nan temperature": (forward(sampler=sampler(temperature=float("nan"))), "temperature"),
    "top_p zero": (forward(sampler=sampler(top_p=0.0)), "top_p must be in (0, 1]"),
    "top_p above one": (forward(sampler=sampler(top_p=1.5)), "top_p must be in (0, 1]"),
    "min_p one": (forward(sampler=sampler(min_p=1.0)), "min_p must be in [0, 1)"),
    "negative min_p": (forward(sampler=sampler(min_p=-0.1)), "min_p must be in [0, 1)"),
    "negative sampler top_k": (forward(sampler=sampler(top_k=-2)), "sampler top_k"),
    "seed not an int": (forward(sampler=sampler(seed="x")), "seed must be an integer"),
    "vocab_mask size": (forward(vocab_mask=b"\xff" * 10), "vocab_mask must be"),
    "vocab_mask empty": (forward(vocab_mask=bytes((VOCAB + 7) // 8)), "allows no token"),
    "logit_bias id": (forward(logit_bias={VOCAB: 1.0}), "logit_bias token ids"),
    "embed length mismatch": (
        Embed(owner="t", tokens=[1, 2], slots=[0]),
        "2 tokens for 1 slots",
    ),
    "embed into slot out of range": (Embed(owner="t", tokens=[1], slots=[4]), "slots [4]"),
    "embed token out of vocab": (Embed(owner="t", tokens=[VOCAB], slots=[0]), "tokens"),
    "embed nothing": (Embed(owner="t", tokens=[], slots=[]), "no tokens"),
    "copy page out of range": (
        CopyKv(owner="t", src_page=0, dst_page=9, src_offset=0, dst_offset=0, count=1),
        "pages [9] out of range",
    ),
    "copy past page end": (
        CopyKv(owner="t", src_page=0, dst_page=1, src_offset=10, dst_offset=0, count=7),
        "runs past the end",
    ),
    "copy negative count": (
        CopyKv(owner="t", src_page=0, dst_page=1, src_offset=0, dst_offset=0, count=-1),
        ">= 0",
    ),
    "mask_kv page": (MaskKv(owner="t", page=8, slots=[0]), "page [8] out of range"),
    "mask_kv slot": (MaskKv(owner="t", page=0, slots=[16]), "slots [16] out of range"),
}


@pytest.fixture(scope="module")
def runner():
    return tiny_runner(num_pages=8, num_slots=4)  # 8 pages of 16 slots, 4 embedding slots


def test_good_calls_pass(runner):
    runner.check(GOOD)
    runner.check(forward(sampler=None, vocab_mask=None, logit_bias=None, masks=None))
    runner.check(Embed(owner="t", tokens=[1, 2], slots=[3, 0]))
    runner.check(CopyKv(owner="t", src_page=0, dst_page=7, src_offset=0, dst_offset=0, count=16))
    runner.check(MaskKv(owner="t", page=7, slots=[0, 15]))


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_is_rejected_with_reason(runner, case):
    bad, reason = BAD_CALLS[case]
    with pytest.raises(CallError, match=re.escape(reason)):
        runner.check(bad)


def test_good_call_runs(runner):
    """The call every bad case is derived from really runs, so the cases test one fault each."""
    (result,) = runner.forward([GOOD])
    assert len(result.dists) == 1 and len(result.tokens) == 1
