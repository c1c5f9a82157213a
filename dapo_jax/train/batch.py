"""Training rows: where each sequence (prompt + response) sits in a batch of fixed-length
rows, padded or packed.

Both layouts give the same arrays, every one [rows, L] with L = max_prompt_length +
max_generate_length:

    input_ids     token ids (pad_id where nothing is)
    segment_ids   k > 0 on the tokens of the row's k-th sequence, 0 on padding
    positions     position of each token inside its own sequence (restarts at 0)
    loss_mask     1 on response tokens (the ones the policy produced)

- padded (`padded_layout`): one sequence per row, prompt left-padded to max_prompt_length,
  response right-padded; every row has the same shape, so most of a long row is padding
  when responses are short.
- packed (`packed_layout`): whole sequences placed one after another in as few rows as
  possible (first-fit decreasing); attention never crosses a segment and positions restart
  in each, so every sequence is computed exactly as it is alone.

Per-token arrays (advantages, old/rollout log-probs) use the same positions: entry t belongs
to token t, predicted from the tokens before it. `Layout` records where each sequence went,
to place per-response values into rows and to read per-sequence values back out.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sequence i occupies row `row[i]`, columns `start[i]` .. `start[i] + prompt_len[i] +
    response_len[i]`, as segment `segment[i]` (1-based within its row)."""

    row: np.ndarray
    start: np.ndarray
    segment: np.ndarray
    prompt_len: np.ndarray
    response_len: np.ndarray
    num_rows: int
    row_length: int

    @property
    def num_sequences(self) -> int:
        return len(self.row)


def lengths(ragged: Sequence[Sequence[int]]) -> np.ndarray:
    """The length of each of a ragged batch's sequences, [N] int64."""
    return np.fromiter(map(len, ragged), np.int64, count=len(ragged))


def _lengths(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
             ) -> tuple[np.ndarray, np.ndarray]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return lengths(prompts), lengths(responses)


def padded_layout(prompt_len: np.ndarray, response_len: np.ndarray, max_prompt_length: int,
                  max_response_length: int) -> Layout:
    """One sequence per row: prompt right-aligned at max_prompt_length, response after it."""
    bad = np.flatnonzero((prompt_len <= 0) | (prompt_len > max_prompt_length))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"row {i}: prompt of {prompt_len[i]} tokens does not fit "
                         f"trainer.max_prompt_length {max_prompt_length}")
    bad = np.flatnonzero(response_len > max_response_length)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"row {i}: response of {response_len[i]} tokens exceeds "
                         f"generator.sampling_params.max_generate_length {max_response_length}")
    n = len(prompt_len)
    return Layout(row=np.arange(n), start=max_prompt_length - prompt_len,
                  segment=np.ones(n, np.int64), prompt_len=prompt_len,
                  response_len=response_len, num_rows=n,
                  row_length=max_prompt_length + max_response_length)


def packed_layout(prompt_len: np.ndarray, response_len: np.ndarray, row_length: int
                  ) -> Layout:
    """Whole sequences packed into rows of `row_length` tokens, first-fit decreasing (longest
    first, each into the first row with room). A sequence longer than a row is an error,
    never cut."""
    total = prompt_len + response_len
    too_long = np.flatnonzero(total > row_length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"sequence {i} has {total[i]} tokens (prompt {prompt_len[i]} + response "
                         f"{response_len[i]}) but a packed row holds {row_length} = "
                         "trainer.max_prompt_length + generator.sampling_params."
                         "max_generate_length: raise those limits")
    n = len(total)
    row = np.empty(n, np.int64)
    start = np.empty(n, np.int64)
    segment = np.empty(n, np.int64)
    free = np.full(max(n, 1), row_length, np.int64)  # room left in each row (n rows at most)
    count = np.zeros(max(n, 1), np.int64)  # sequences in each row
    for i in np.argsort(-total, kind="stable"):
        r = int(np.argmax(free >= total[i]))  # the first row with room (an empty one exists)
        row[i], start[i] = r, row_length - free[r]
        count[r] += 1
        segment[i] = count[r]
        free[r] -= total[i]
    used = int(np.count_nonzero(count))
    return Layout(row=row, start=start, segment=segment, prompt_len=prompt_len,
                  response_len=response_len, num_rows=max(used, 1),
                  row_length=row_length)


def bucket_count(n: int) -> int:
    """n rounded up to four steps per octave: 1..8, then 10, 12, 14, 16, 20, 24, 28, 32, 40, ...
    Packed batches of a steady length mix then come in one to three shapes (compilations),
    and the rounding wastes at most a fifth of the rows (about a tenth on average)."""
    if n <= 8:
        return max(n, 1)
    step = 1 << (n.bit_length() - 3)  # a quarter of the power of two below n
    return -(-n // step) * step


def bucketed_rows(rows: int, micro_batch_rows: int, at_most: int, shards: int = 1) -> int:
    """`rows` rounded up to whole micro-batches, their number to a `bucket_count` (but never
    more micro-batches than `at_most` rows, one sequence each, would need, nor fewer than
    `rows` need: rows may already be padded to whole micro-batches of another size).

    Rows that fit in one micro-batch make one smaller micro-batch instead: the rows of each
    of the `shards` data-parallel devices rounded up to a power of two (a mini-batch of 128
    short sequences in 80 rows on 8 devices at 64 rows per device: 128 rows, not 512; the
    micro-batch size is an upper bound, as SkyRL's micro_train_batch_size_per_gpu is).
    Powers of two, not `bucket_count`: the rows of steady batches then stay in one shape
    (measured on 8 devices: 10-12 rows per device from step to step, a recompile of the
    update on most steps with four buckets per octave)."""
    if rows <= micro_batch_rows:
        per_shard = -(-max(rows, 1) // shards)
        cap = max(per_shard, -(-at_most // shards))
        return min(1 << (per_shard - 1).bit_length(), cap) * shards
    needed = -(-rows // micro_batch_rows)
    cap = max(needed, -(-at_most // micro_batch_rows))
    return min(bucket_count(needed), cap) * micro_batch_rows


def make_layout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                max_prompt_length: int, max_response_length: int, packed: bool,
                micro_batch_rows: int, shards: int = 1) -> Layout:
    """The rows of one mini-batch. Packed: as few rows as hold the sequences, in a number of
    micro-batches of `micro_batch_rows` rows rounded up by `bucket_count`, or one smaller
    micro-batch split over `shards` devices (`bucketed_rows`). Padded: one row per sequence
    (the count must split into micro-batches; the config checks that)."""
    prompt_len, response_len = _lengths(prompts, responses)
    if not packed:
        return padded_layout(prompt_len, response_len, max_prompt_length, max_response_length)
    layout = packed_layout(prompt_len, response_len, max_prompt_length + max_response_length)
    return dataclasses.replace(layout, num_rows=bucketed_rows(
        layout.num_rows, micro_batch_rows, at_most=len(prompt_len), shards=shards))


def _token_index(layout: Layout, first: np.ndarray, count: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where `count[i]` consecutive tokens of each sequence i, from column `first[i]` of its
    row, sit in the flattened [rows * L] arrays, in sequence order; with the sequence of each
    and its offset from `first`."""
    seq = np.repeat(np.arange(layout.num_sequences), count)
    offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return layout.row[seq] * layout.row_length + first[seq] + offset, seq, offset


def _check_lengths(values: Sequence[Sequence[float]], expected: np.ndarray, what: str) -> int:
    """The ragged per-sequence values match the layout's lengths; their total count."""
    got = lengths(values)
    if len(got) != len(expected):
        raise ValueError(f"{what}: {len(got)} sequences, the layout has {len(expected)}")
    bad = np.flatnonzero(got != expected)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}: sequence {i} has {got[i]}, the layout {expected[i]}")
    return int(got.sum())


def build_rows(layout: Layout, prompts: Sequence[Sequence[int]],
               responses: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """input_ids, segment_ids, positions and loss_mask (see the module docstring)."""
    _check_lengths(prompts, layout.prompt_len, "prompts")
    _check_lengths(responses, layout.response_len, "responses")
    total = layout.prompt_len + layout.response_len
    pairs = zip(prompts, responses, strict=True)  # each sequence's prompt, then its response
    tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(pairs)),
                         np.int32, count=int(total.sum()))
    flat, seq, pos = _token_index(layout, layout.start, total)
    size = layout.num_rows * layout.row_length
    ids = np.full(size, pad_id, np.int32)
    segments = np.zeros(size, np.int32)
    positions = np.zeros(size, np.int32)
    loss = np.zeros(size, np.float32)
    ids[flat] = tokens
    segments[flat] = layout.segment[seq]
    positions[flat] = pos
    loss[flat] = pos >= layout.prompt_len[seq]
    shape = (layout.num_rows, layout.row_length)
    return {"input_ids": ids.reshape(shape), "segment_ids": segments.reshape(shape),
            "positions": positions.reshape(shape), "loss_mask": loss.reshape(shape)}


def _response_index(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    flat, seq, _ = _token_index(layout, layout.start + layout.prompt_len, layout.response_len)
    return flat, seq


def place_response_values(layout: Layout, values: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-response-token values (e.g. rollout log-probs) at their [rows, L] positions."""
    out = np.zeros(layout.num_rows * layout.row_length, np.float32)
    count = _check_lengths(values, layout.response_len, "per-response-token values")
    out[_response_index(layout)[0]] = np.fromiter(itertools.chain.from_iterable(values),
                                                  np.float32, count=count)
    return out.reshape(layout.num_rows, layout.row_length)


def place_sequence_values(layout: Layout, values: np.ndarray) -> np.ndarray:
    """One value per sequence (e.g. its advantage) on each of its response tokens."""
    values = np.asarray(values, np.float32)
    if values.shape != (layout.num_sequences,):
        raise ValueError(f"{values.shape} values for {layout.num_sequences} sequences")
    out = np.zeros(layout.num_rows * layout.row_length, np.float32)
    flat, seq = _response_index(layout)
    out[flat] = values[seq]
    return out.reshape(layout.num_rows, layout.row_length)


def response_values(layout: Layout, rows: np.ndarray) -> list[np.ndarray]:
    """The inverse of `place_response_values`: each sequence's response-token values."""
    flat, _ = _response_index(layout)
    return np.split(np.asarray(rows).reshape(-1)[flat], np.cumsum(layout.response_len)[:-1])
