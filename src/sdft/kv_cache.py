"""A KV cache for batched greedy decoding in which rows come and go.

``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which
copies the whole cache every step. At 64 rows and a few hundred positions, that
copy is a large share of a CPU decoding step. ``GrowingLayer`` keeps keys and
values in buffers with spare rows and spare positions and writes each step in
place. For continuous batching, rows leave (a row from the end moves into the
freed slot, so only that row is copied) and the rows of another cache join
after left padding to a common length.

Left padding costs attention time: a decoding step reads every cached position
of every row, padding included, and at a few hundred positions that read is a
large share of the step. ``row_span_attention`` runs attention separately on
spans of neighbouring rows, each from the first position one of its rows
attends to, so most padding is never read.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_POSITIONS = 128  # room added at each reallocation, so most steps write in place


class GrowingLayer(DynamicLayer):
    """Keys and values of one layer in buffers with spare rows and spare positions.

    A buffer is ``[row capacity, heads, position capacity, head_dim]``; the cached part is
    ``[:rows, :, :length]``, and ``keys`` and ``values`` are views of it. Set ``row_capacity``
    before the first update to reserve rows for ones that join later.
    """

    row_capacity = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: list[torch.Tensor] | None = None
        self.rows = key_states.shape[0]
        self.row_capacity = max(self.rows, self.row_capacity)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            self.reallocate(end + SPARE_POSITIONS, like=(key_states, value_states))
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[: self.rows, :, self.length : end] = states
        self.length = end
        self.refresh_views()
        return self.keys, self.values

    def reallocate(self, positions: int, like: tuple[torch.Tensor, ...], left: int = 0) -> None:
        """Move the cached part into new buffers of ``positions`` positions, after ``left`` zero positions."""
        grown = []
        for index, template in enumerate(like):
            _, heads, _, width = template.shape
            # Padding positions must be zeros (masked, but never NaN); the spare room is written before use.
            buffer = template.new_empty((self.row_capacity, heads, positions, width))
            buffer[:, :, :left] = 0
            if self.buffers is not None:
                buffer[: self.rows, :, left : left + self.length] = self.buffers[index][: self.rows, :, : self.length]
            grown.append(buffer)
        self.buffers = grown

    def refresh_views(self) -> None:
        self.keys, self.values = (buffer[: self.rows, :, : self.length] for buffer in self.buffers)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            # One copy of the selected rows, spare positions included. No spare rows are kept.
            self.buffers = [buffer[: self.rows].index_select(0, indices) for buffer in self.buffers]
            self.rows = self.row_capacity = len(indices)
            self.refresh_views()

    def move_rows(self, targets: list[int], sources: list[int], rows: int) -> None:
        """Copy rows ``sources`` into the slots ``targets``, then keep the first ``rows`` rows."""
        if targets:
            device = self.buffers[0].device
            target_rows = torch.tensor(targets, device=device)
            source_rows = torch.tensor(sources, device=device)
            for buffer in self.buffers:
                cached = buffer[:, :, : self.length]
                cached.index_copy_(0, target_rows, cached.index_select(0, source_rows))
        self.rows = rows
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
            self.buffers = [buffer[:, :, count:] for buffer in self.buffers]
            self.length -= count
            self.refresh_views()

    def append_rows(self, other: GrowingLayer) -> None:
        """Add the rows of ``other``, which has as many positions, into spare rows."""
        needed = self.rows + other.rows
        if needed > self.row_capacity:
            self.row_capacity = needed
            self.reallocate(self.buffers[0].shape[-2], like=tuple(self.buffers))
        for buffer, incoming in zip(self.buffers, (other.keys, other.values)):
            buffer[self.rows : needed, :, : self.length] = incoming
        self.rows = needed
        self.refresh_views()


def growing_cache(model, rows: int = 0) -> DynamicCache | None:
    """Return a cache of ``GrowingLayer``s with room for ``rows`` rows, or None when the model's layers are not plain.

    Sliding-window, quantized or otherwise special layers keep their own bookkeeping,
    so such models decode through ``model.generate`` instead.
    """
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer in cache.layers:
        layer.row_capacity = rows
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


def keep_rows(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[list[int], torch.Tensor]:
    """Keep the rows ``keep`` (ascending) and drop leading positions that none of them attends to.

    Kept rows past the new row count move into the slots of dropped rows, so only they
    are copied, not the whole cache. Returns the old row now in each slot, and the new mask.
    """
    count, kept_rows = len(keep), set(keep)
    targets = [row for row in range(count) if row not in kept_rows]
    sources = [row for row in keep if row >= count]
    order = list(range(count))
    for target, source in zip(targets, sources):
        order[target] = source
    for layer in cache.layers:
        layer.move_rows(targets, sources, count)
    mask = mask[order]
    unused = int(mask.any(0).int().argmax()) if count else 0
    for layer in cache.layers:
        layer.crop_left(unused)
    return order, mask[:, unused:]


ROW_SPANS = "sdft_row_spans"  # name of the attention implementation registered below
# Overhead of one more attention call, in rows x positions read. An estimate from timing SDPA
# calls on a 2-core x86 CPU; other hardware may favour another value.
SPAN_CALL_COST = 128


def row_spans(first_positions: list[int], call_cost: int = SPAN_CALL_COST) -> list[tuple[int, int, int]]:
    """Split rows into spans ``(begin, end, start)`` of neighbouring rows that read positions ``start:``.

    ``first_positions[row]`` is the first position the row attends to. The split minimizes
    the positions read plus ``call_cost`` per span (dynamic programming over span ends).
    """
    count = len(first_positions)
    best, cut = [0] + [float("inf")] * count, [0] * (count + 1)
    for end in range(1, count + 1):
        start = first_positions[end - 1]
        for begin in range(end - 1, -1, -1):
            start = min(start, first_positions[begin])
            # The cost counts skipped positions as negative, so the rows x length that every split shares drops out.
            cost = best[begin] + call_cost - (end - begin) * start
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    spans, end = [], count
    while end:
        begin = cut[end]
        spans.append((begin, end, min(first_positions[begin:end])))
        end = begin
    return spans[::-1]


def row_spans_attention(module, query, key, value, attention_mask, row_spans=None, **kwargs):
    """SDPA on each span of rows, over the positions from the span's start; any other call as plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if row_spans is None or query.shape[2] != 1 or attention_mask is None or attention_mask.ndim != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    parts = [
        sdpa_attention_forward(
            module, query[begin:end], key[begin:end, :, start:], value[begin:end, :, start:],
            attention_mask[begin:end, :, :, start:], **kwargs,
        )[0]
        for begin, end, start in row_spans
    ]
    return torch.cat(parts), None


def decoding_mask(*args, q_length: int, dtype=None, **kwargs):
    """Build transformers' SDPA mask, for one query position as the additive float mask.

    SDPA converts a boolean mask into this float one on every call, so in every layer
    and span. Building it once per step saves those conversions.
    """
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, q_length=q_length, **kwargs)
    if mask is None or q_length != 1 or mask.dtype != torch.bool or dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@contextlib.contextmanager
def row_span_attention(model):
    """Switch a model on SDPA to ``row_spans_attention`` for the block; yield whether it was switched.

    The spans reach the attention layers as the ``row_spans`` keyword of the model's forward.
    Other attention implementations (eager, flash attention) are left as they are, and so
    are models off the CPU, where the gain was not measured.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    if config._attn_implementation != "sdpa" or model.device.type != "cpu":
        yield False
        return
    AttentionInterface.register(ROW_SPANS, row_spans_attention)
    AttentionMaskInterface.register(ROW_SPANS, decoding_mask)
    config._attn_implementation = ROW_SPANS
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
