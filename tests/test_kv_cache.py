"""The growing KV cache stores what transformers' dynamic cache stores, and joins and drops rows."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from sdft.kv_cache import GrowingLayer, join_rows, keep_rows


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
    order, mask = keep_rows(cache, mask, [0, 2])
    assert order == [0, 2]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert torch.equal(old.values[0], old_values[0, :, 1:])
    assert torch.equal(old.values[1, :, 2:], new_values[0])
    step_keys, step_values = states(2, 1, 2)
    old.update(step_keys, step_values)  # writes in place after a crop
    assert torch.equal(old.keys[:, :, -1:], step_keys)
    assert old.get_seq_length() == 6


def test_keep_rows_fills_free_slots():
    layer = GrowingLayer()
    keys, values = states(4, 5, 3)
    layer.update(keys, values)
    buffer = layer.buffers[0]
    order, mask = keep_rows(Cache([layer]), torch.ones(4, 5, dtype=torch.long), [1, 3])

    assert order == [3, 1]
    assert mask.shape == (2, 5)
    assert torch.equal(layer.keys, keys[[3, 1]])
    assert torch.equal(layer.values, values[[3, 1]])
    assert layer.buffers[0] is buffer, "keeping rows must not reallocate the cache"
    # The next step writes after the kept rows' positions, as a dynamic layer of those rows would.
    reference = DynamicLayer()
    reference.update(keys[[3, 1]], values[[3, 1]])
    step_keys, step_values = states(2, 1, 4)
    assert torch.equal(layer.update(step_keys, step_values)[0], reference.update(step_keys, step_values)[0])


def test_join_rows_uses_reserved_rows():
    layer, incoming = GrowingLayer(), GrowingLayer()
    layer.row_capacity = 8
    keys, values = states(2, 4, 5)
    new_keys, new_values = states(3, 4, 6)
    layer.update(keys, values)
    incoming.update(new_keys, new_values)
    buffer = layer.buffers[0]
    join_rows(Cache([layer]), torch.ones(2, 4), Cache([incoming]), torch.ones(3, 4))

    assert layer.buffers[0] is buffer
    assert torch.equal(layer.keys, torch.cat([keys, new_keys]))
    assert torch.equal(layer.values, torch.cat([values, new_values]))

    # Past the reserved rows the buffers grow, keeping every row.
    more_keys, more_values = states(4, 4, 7)
    extra = GrowingLayer()
    extra.update(more_keys, more_values)
    join_rows(Cache([layer]), torch.ones(5, 4), Cache([extra]), torch.ones(4, 4))
    assert layer.buffers[0] is not buffer
    assert torch.equal(layer.keys, torch.cat([keys, new_keys, more_keys]))


def test_batch_select_indices_keeps_rows():
    layer = GrowingLayer()
    keys, values = states(3, 4, 8)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, keys[[2, 0]])
    step_keys, step_values = states(2, 1, 9)
    assert torch.equal(layer.update(step_keys, step_values)[1], torch.cat([values[[2, 0]], step_values], dim=2))
