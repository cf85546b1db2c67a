"""The growing KV cache stores what transformers' dynamic cache stores, and joins and drops rows."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from sdft.kv_cache import GrowingLayer, drop_rows, join_rows


class Cache:
    """The part of ``DynamicCache`` the helpers use: a list of layers and row selection."""

    def __init__(self, layers):
        self.layers = layers

    def batch_select_indices(self, indices):
        for layer in self.layers:
            layer.batch_select_indices(indices)


def states(batch: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, positions, 4, generator=generator) for _ in range(2))


def test_updates_match_dynamic_layer_across_reallocations():
    growing, dynamic = GrowingLayer(), DynamicLayer()
    for seed, positions in enumerate([5] + [1] * 200):  # more steps than the spare room
        keys, values = states(3, positions, seed)
        mine = growing.update(keys, values)
        theirs = dynamic.update(keys, values)
        assert torch.equal(mine[0], theirs[0])
        assert torch.equal(mine[1], theirs[1])
    assert growing.get_seq_length() == 205


def test_join_and_drop_rows():
    """Joining left-pads the shorter cache; dropping rows crops positions no row attends to."""
    old, new = GrowingLayer(), GrowingLayer()
    old_keys, old_values = states(2, 6, 0)
    new_keys, new_values = states(1, 3, 1)
    old.update(old_keys, old_values)
    new.update(new_keys, new_values)
    old_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache = Cache([old])
    mask = join_rows(cache, old_mask, Cache([new]), torch.ones(1, 3, dtype=torch.long))

    assert mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert torch.equal(old.keys[:2], old_keys)
    assert torch.equal(old.keys[2, :, 3:], new_keys[0])
    assert torch.equal(old.keys[2, :, :3], torch.zeros(2, 3, 4))

    # Without row 1, position 0 is padding for every row left, so it goes.
    mask = drop_rows(cache, mask, torch.tensor([0, 2]))
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert torch.equal(old.values[0], old_values[0, :, 1:])
    assert torch.equal(old.values[1, :, 2:], new_values[0])
    step_keys, step_values = states(2, 1, 2)
    old.update(step_keys, step_values)  # writes in place after a crop
    assert torch.equal(old.keys[:, :, -1:], step_keys)
    assert old.get_seq_length() == 6
