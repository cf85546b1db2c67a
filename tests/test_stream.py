"""Prefill with a shared prefix: the prefix runs once and the rows continue from its keys and values."""

from __future__ import annotations

import pytest
import torch

from sdft.data import load_dataset_records
from sdft.models import load_model
from sdft.prompts import get_template, render_prompt
from sdft.stream import MIN_SHARED_PREFIX, SharedPrefixes, prefill, shared_prefix_length


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert shared_prefix_length([[4, 5], [6, 5]]) == 0
    # Each prompt keeps a token of its own, so identical prompts and a prompt that
    # begins another still get logits from their own last token.
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3, 4]]) == 1
    assert shared_prefix_length([[7]]) == 0
    assert shared_prefix_length([[1, 2, 3, 4]]) == 3


def test_stored_prefixes_reused_and_bounded(tiny_llama):
    model = tiny_llama()
    prefixes = SharedPrefixes(model, limit=2)
    template = list(range(1, MIN_SHARED_PREFIX + 4))
    with torch.inference_mode():
        length, states = prefixes.lookup([template + [40, 41], template + [42]])
        assert length == len(template)
        assert states[0][0].shape[:3] == (1, 2, len(template))

        # A group sharing a few more tokens reuses the stored prefix.
        reused, again = prefixes.lookup([template + [40, 41, 50], template + [40, 41, 51]])
        assert (reused, again) == (len(template), states)
        assert len(prefixes.entries) == 1

        # A group sharing much more gets its own, and only ``limit`` prefixes stay.
        longer = template + list(range(30, 30 + MIN_SHARED_PREFIX + 1))
        assert prefixes.lookup([longer + [1], longer + [2]])[0] == len(longer)
        other = list(range(50, 50 + MIN_SHARED_PREFIX))
        assert prefixes.lookup([other + [1], other + [2]])[0] == len(other)
        assert len(prefixes.entries) == 2
        assert tuple(template) not in prefixes.entries

        # Too little in common: no prefix.
        assert prefixes.lookup([template[:5] + [9], template[:5] + [8]]) == (0, None)


@pytest.mark.slow
def test_prefix_prefill_matches_full_prefill(data_path):
    loaded = load_model("embedded")
    tokenizer = loaded.tokenizer
    records = load_dataset_records("gsm8k_test", data_dir=data_path, limit=3)
    prompts = [render_prompt(get_template("gsm8k_infer"), r, tokenizer, "chat") for r in records]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    shared = shared_prefix_length(ids)
    assert shared >= MIN_SHARED_PREFIX, "the template's system prompt should be shared"

    with torch.inference_mode():
        plain_cache, plain_mask, plain_logits = prefill(loaded.model, ids, tokenizer.pad_token_id)
        prefixes = SharedPrefixes(loaded.model)
        cache, mask, logits = prefill(loaded.model, ids, tokenizer.pad_token_id, prefixes)

    assert list(prefixes.entries) == [tuple(ids[0][:shared])]
    # Same tokens seen by every row; the padding sits after the prefix instead of before it.
    assert mask.sum(-1).tolist() == [len(p) for p in ids] == plain_mask.sum(-1).tolist()
    assert mask[:, :shared].all()
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(-1), plain_logits.argmax(-1))
    # The cached keys of each row's real tokens agree too.
    for row, length in enumerate(len(p) for p in ids):
        got = cache.layers[-1].keys[row][:, mask[row].bool()]
        expected = plain_cache.layers[-1].keys[row][:, plain_mask[row].bool()]
        assert got.shape[1] == length
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
