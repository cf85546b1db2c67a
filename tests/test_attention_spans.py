"""Attention on row spans reads less padding and computes what plain SDPA computes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from sdft.kv_cache import ROW_SPANS, decoding_mask, row_span_attention, row_spans, row_spans_attention
from sdft.stream import cache_keyword


def span_cost(spans, first_positions, call_cost):
    return sum(call_cost - (end - begin) * start for begin, end, start in spans)


def all_splits(count):
    """Every way to cut ``range(count)`` into spans of neighbouring rows."""
    for cuts in itertools.product([False, True], repeat=count - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [count]
        yield list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(20))
def test_row_spans_cheapest_split(seed):
    rng = random.Random(seed)
    first = [rng.randrange(0, 60) for _ in range(rng.randrange(1, 8))]
    call_cost = rng.choice([0, 16, 128, 1000])
    spans = row_spans(first, call_cost)

    assert [row for begin, end, _ in spans for row in range(begin, end)] == list(range(len(first)))
    assert all(start == min(first[begin:end]) for begin, end, start in spans)
    brute = min(
        span_cost([(b, e, min(first[b:e])) for b, e in split], first, call_cost) for split in all_splits(len(first))
    )
    assert span_cost(spans, first, call_cost) == brute


def test_row_spans_follow_the_padding():
    # Two groups of rows with very different padding, a cheap call: two spans.
    assert row_spans([0, 1, 0, 90, 95, 91], call_cost=10) == [(0, 3, 0), (3, 6, 90)]
    # A call costlier than the padding it saves: one span.
    assert row_spans([0, 1, 0, 2, 3, 1], call_cost=100) == [(0, 6, 0)]


class GroupedQueryModule(torch.nn.Module):
    """What SDPA reads from an attention layer: its query heads per key/value head."""

    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_row_spans_attention_matches_sdpa(dtype):
    generator = torch.Generator().manual_seed(0)
    rows, positions = 7, 40
    query = torch.randn(rows, 6, 1, 8, generator=generator)
    key, value = (torch.randn(rows, 2, positions, 8, generator=generator) for _ in range(2))
    first = [0, 3, 5, 20, 22, 30, 31]
    padding = torch.tensor([[column >= start for column in range(positions)] for start in first])
    mask = padding[:, None, None, :]
    if dtype is torch.float32:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    module = GroupedQueryModule()
    spans = row_spans(first, call_cost=0)
    assert len(spans) > 1

    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    got, _ = row_spans_attention(module, query, key, value, mask, row_spans=spans)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Without spans it is plain SDPA.
    assert torch.equal(row_spans_attention(module, query, key, value, mask)[0], expected)


def test_decoding_mask_is_additive():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    arguments = dict(batch_size=2, kv_length=5, attention_mask=padding, allow_is_causal_skip=False)
    boolean = sdpa_mask(q_length=1, q_offset=4, **arguments)
    additive = decoding_mask(q_length=1, q_offset=4, dtype=torch.float32, **arguments)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, boolean)
    assert torch.isinf(additive[~boolean]).all()
    # Prefill masks (several query positions) stay boolean.
    prefill = decoding_mask(q_length=5, dtype=torch.float32, **arguments)
    assert torch.equal(prefill, sdpa_mask(q_length=5, **arguments))


def test_span_attention_switch_is_scoped(tiny_llama):
    model = tiny_llama("sdpa")
    with row_span_attention(model) as switched:
        assert switched
        assert model.config._attn_implementation == ROW_SPANS
    assert model.config._attn_implementation == "sdpa"

    with pytest.raises(RuntimeError):
        with row_span_attention(model):
            raise RuntimeError("stop")
    assert model.config._attn_implementation == "sdpa"

    eager = tiny_llama("eager")
    with row_span_attention(eager) as switched:
        assert not switched
        assert eager.config._attn_implementation == "eager"


def test_spans_reach_attention_layers(tiny_llama):
    """A forward with ``row_spans`` gives the logits of a plain padded forward."""
    model = tiny_llama("sdpa")
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (4, 12), generator=generator)
    mask = torch.ones(4, 12, dtype=torch.long)
    for row, pad in enumerate([0, 2, 7, 9]):
        mask[row, :pad] = 0
    with torch.inference_mode():
        expected = model(input_ids=input_ids, attention_mask=mask).logits[:, -1]
        prefix = model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        calls = []

        def counting(*args, **kwargs):
            calls.append(kwargs.get("row_spans"))
            return row_spans_attention(*args, **kwargs)

        with row_span_attention(model):
            from transformers import AttentionInterface

            AttentionInterface.register(ROW_SPANS, counting)
            try:
                spans = row_spans(mask.int().argmax(-1).tolist(), call_cost=0)
                past = {cache_keyword(type(model)): prefix.past_key_values}
                got = model(input_ids=input_ids[:, -1:], attention_mask=mask, row_spans=spans, **past).logits[:, -1]
            finally:
                AttentionInterface.register(ROW_SPANS, row_spans_attention)
    assert calls == [spans, spans]  # One call per layer, each with the spans.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
