"""A KV cache for batched greedy decoding in which rows come and go.

``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which
copies the whole cache every step. At 64 rows and a few hundred positions, that
copy is a large share of a CPU decoding step. ``GrowingLayer`` keeps keys and
values in buffers with room to spare along the sequence axis and writes each
step in place. Rows can also be dropped, and the rows of another cache joined
after left padding to a common length, which is what continuous batching needs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_POSITIONS = 128  # room added at each reallocation, so most steps write in place


class GrowingLayer(DynamicLayer):
    """Keys and values of one layer, ``[batch, heads, positions, head_dim]``, in spare-room buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: list[torch.Tensor] | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            self.reallocate(end + SPARE_POSITIONS, like=(key_states, value_states))
        self.buffers[0][..., self.length : end, :] = key_states
        self.buffers[1][..., self.length : end, :] = value_states
        self.length = end
        self.refresh_views()
        return self.keys, self.values

    def reallocate(self, capacity: int, like: tuple[torch.Tensor, torch.Tensor], left: int = 0) -> None:
        """Move the cached positions into new buffers of ``capacity``, after ``left`` zero positions."""
        grown = []
        for index, template in enumerate(like):
            batch, heads, _, width = template.shape
            # Padding positions must be zeros (masked, but never NaN); the spare room is written before use.
            buffer = template.new_empty((batch, heads, capacity, width))
            buffer[..., :left, :] = 0
            if self.buffers is not None:
                buffer[..., left : left + self.length, :] = self.buffers[index][..., : self.length, :]
            grown.append(buffer)
        self.buffers = grown

    def refresh_views(self) -> None:
        self.keys, self.values = (buffer[..., : self.length, :] for buffer in self.buffers)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            # Only the filled positions are copied, into buffers with the same spare room.
            selected = [buffer[..., : self.length, :].index_select(0, indices) for buffer in self.buffers]
            self.buffers = None
            self.reallocate(self.length + SPARE_POSITIONS, like=tuple(selected))
            for buffer, values in zip(self.buffers, selected):
                buffer[..., : self.length, :] = values
            self.refresh_views()

    def pad_left(self, count: int) -> None:
        """Insert ``count`` zero positions before the cached ones (masked out by the caller)."""
        if count:
            self.reallocate(count + self.length + SPARE_POSITIONS, like=tuple(self.buffers), left=count)
            self.length += count
            self.refresh_views()

    def crop_left(self, count: int) -> None:
        """Drop the first ``count`` positions (padding that no row attends to any more)."""
        if count:
            self.buffers = [buffer[..., count:, :] for buffer in self.buffers]
            self.length -= count
            self.refresh_views()

    def append_rows(self, other: GrowingLayer) -> None:
        """Add the rows of ``other``; both layers have the same number of positions."""
        joined = [torch.cat(pair) for pair in ((self.keys, other.keys), (self.values, other.values))]
        self.buffers = None
        self.reallocate(self.length + SPARE_POSITIONS, like=tuple(joined))
        for buffer, values in zip(self.buffers, joined):
            buffer[..., : self.length, :] = values
        self.refresh_views()


def growing_cache(model) -> DynamicCache | None:
    """Return a cache of ``GrowingLayer``s for ``model``, or None when its layers are not plain.

    Sliding-window, quantized or otherwise special layers keep their own bookkeeping,
    so such models decode through ``model.generate`` instead.
    """
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def join_rows(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor):
    """Append ``other``'s rows to ``cache``, left-padding the shorter one; return the joined mask."""
    width = max(mask.shape[1], other_mask.shape[1])
    masks = []
    for layers, layer_mask in ((cache.layers, mask), (other.layers, other_mask)):
        missing = width - layer_mask.shape[1]
        for layer in layers:
            layer.pad_left(missing)
        masks.append(torch.nn.functional.pad(layer_mask, (missing, 0)))
    for layer, incoming in zip(cache.layers, other.layers):
        layer.append_rows(incoming)
    return torch.cat(masks)


def drop_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only the rows ``keep``, then drop leading positions that none of them attends to."""
    cache.batch_select_indices(keep)
    mask = mask[keep]
    unused = int(mask.any(0).int().argmax()) if mask.shape[0] else 0
    for layer in cache.layers:
        layer.crop_left(unused)
    return mask[:, unused:]
