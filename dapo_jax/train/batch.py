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

    def response_slices(self) -> list[tuple[int, slice]]:
        """(row, columns) of each sequence's response tokens."""
        first = self.start + self.prompt_len
        return [(int(r), slice(int(a), int(a + n)))
                for r, a, n in zip(self.row, first, self.response_len, strict=True)]


def _lengths(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
             ) -> tuple[np.ndarray, np.ndarray]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return (np.array([len(p) for p in prompts], np.int64),
            np.array([len(r) for r in responses], np.int64))


def padded_layout(prompt_len: np.ndarray, response_len: np.ndarray, max_prompt_length: int,
                  max_response_length: int) -> Layout:
    """One sequence per row: prompt right-aligned at max_prompt_length, response after it."""
    for i, (p, r) in enumerate(zip(prompt_len, response_len, strict=True)):
        if not 0 < p <= max_prompt_length:
            raise ValueError(f"row {i}: prompt of {p} tokens does not fit "
                             f"trainer.max_prompt_length {max_prompt_length}")
        if r > max_response_length:
            raise ValueError(f"row {i}: response of {r} tokens exceeds "
                             f"generator.sampling_params.max_generate_length "
                             f"{max_response_length}")
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
    row = np.empty(len(total), np.int64)
    start = np.empty(len(total), np.int64)
    segment = np.empty(len(total), np.int64)
    free: list[int] = []  # room left in each row
    count: list[int] = []  # sequences in each row
    for i in np.argsort(-total, kind="stable"):
        r = next((j for j, room in enumerate(free) if room >= total[i]), len(free))
        if r == len(free):
            free.append(row_length)
            count.append(0)
        row[i], start[i] = r, row_length - free[r]
        count[r] += 1
        segment[i] = count[r]
        free[r] -= int(total[i])
    return Layout(row=row, start=start, segment=segment, prompt_len=prompt_len,
                  response_len=response_len, num_rows=max(len(free), 1),
                  row_length=row_length)


def bucket_count(n: int) -> int:
    """n rounded up to four steps per octave: 1..8, then 10, 12, 14, 16, 20, 24, 28, 32, 40, ...
    Packed batches of a steady length mix then come in one to three shapes (compilations),
    and the rounding wastes at most a fifth of the rows (about a tenth on average)."""
    if n <= 8:
        return max(n, 1)
    step = 1 << (n.bit_length() - 3)  # a quarter of the power of two below n
    return -(-n // step) * step


def bucketed_rows(rows: int, micro_batch_rows: int, at_most: int) -> int:
    """`rows` rounded up to whole micro-batches, their number to a `bucket_count` (but never
    more micro-batches than `at_most` rows, one sequence each, would need, nor fewer than
    `rows` need: rows may already be padded to whole micro-batches of another size)."""
    needed = -(-rows // micro_batch_rows)
    cap = max(needed, -(-at_most // micro_batch_rows))
    return min(bucket_count(needed), cap) * micro_batch_rows


def make_layout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                max_prompt_length: int, max_response_length: int, packed: bool,
                micro_batch_rows: int) -> Layout:
    """The rows of one mini-batch. Packed: as few rows as hold the sequences, in a number of
    micro-batches of `micro_batch_rows` rows rounded up by `bucket_count`. Padded: one row per
    sequence (the count must split into micro-batches; the config checks that)."""
    prompt_len, response_len = _lengths(prompts, responses)
    if not packed:
        return padded_layout(prompt_len, response_len, max_prompt_length, max_response_length)
    layout = packed_layout(prompt_len, response_len, max_prompt_length + max_response_length)
    return dataclasses.replace(layout, num_rows=bucketed_rows(
        layout.num_rows, micro_batch_rows, at_most=len(prompt_len)))


def build_rows(layout: Layout, prompts: Sequence[Sequence[int]],
               responses: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """input_ids, segment_ids, positions and loss_mask (see the module docstring)."""
    shape = (layout.num_rows, layout.row_length)
    ids = np.full(shape, pad_id, np.int32)
    segments = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    loss = np.zeros(shape, np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        row, a = int(layout.row[i]), int(layout.start[i])
        n, m = len(p), len(r)
        ids[row, a:a + n] = p
        ids[row, a + n:a + n + m] = r
        segments[row, a:a + n + m] = layout.segment[i]
        positions[row, a:a + n + m] = np.arange(n + m)
        loss[row, a + n:a + n + m] = 1.0
    return {"input_ids": ids, "segment_ids": segments, "positions": positions,
            "loss_mask": loss}


def place_response_values(layout: Layout, values: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-response-token values (e.g. rollout log-probs) at their [rows, L] positions."""
    out = np.zeros((layout.num_rows, layout.row_length), np.float32)
    for (row, cols), v in zip(layout.response_slices(), values, strict=True):
        out[row, cols] = v
    return out


def place_sequence_values(layout: Layout, values: np.ndarray) -> np.ndarray:
    """One value per sequence (e.g. its advantage) on each of its response tokens."""
    return place_response_values(layout, [np.full(n, v, np.float32) for n, v in
                                          zip(layout.response_len, values, strict=True)])


def response_values(layout: Layout, rows: np.ndarray) -> list[np.ndarray]:
    """The inverse of `place_response_values`: each sequence's response-token values."""
    return [np.asarray(rows[row, cols]) for row, cols in layout.response_slices()]
