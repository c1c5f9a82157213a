"""Dynamic sampling (DAPO_FACTS section 2): host-side, pure functions over prompt groups.

A generation batch is a dict of numpy arrays whose leading dimension is num_groups * G, the
G responses of a prompt contiguous. `scores` is the correctness signal per response (rewards
BEFORE soft overlong punishment).

- `filter`: keep groups whose scores are not all equal (0 < #correct < G; a group of one is
  kept), accumulate over generation batches until `train_batch_size` groups are kept, then
  truncate to exactly that many.
- `replace` (POLARIS): if more than `min_replace_ratio` of a batch's groups are good,
  overwrite each bad group with a copy of a randomly chosen good group (without repetition
  when there are at least as many good groups as bad ones, as SkyRL); otherwise draw again.
  A copy keeps its source's group id (SkyRL keeps the source's uid), so its advantages are
  normalised over the source and its copies together.

The training batch carries `group_id` per row: the group its advantages are normalised in.

The accumulator state (`DynamicSamplingState`) lives for one training step and is not
checkpointed: checkpoints are written between steps, and the generation seeds depend only on
(seed, step, batch number), so a run resumed after a kill during sampling draws that step's
batches again and keeps exactly the groups the uninterrupted run kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Batch = dict[str, np.ndarray]
TYPES = (None, "filter", "replace")


class DynamicSamplingError(RuntimeError):
    pass


def group_scores(scores: np.ndarray, group_size: int) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores must be [num_groups * {group_size}], got {scores.shape}")
    return scores.reshape(-1, group_size)


def informative_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """bool [num_groups]: the group's scores are not all equal (std > 0), or G == 1."""
    g = group_scores(scores, group_size)
    if group_size == 1:
        return np.ones(g.shape[0], bool)
    return g.std(axis=1) > 0


def select_groups(batch: Batch, groups: np.ndarray, group_size: int) -> Batch:
    """The rows of the given groups (indices into the batch's groups), groups kept whole."""
    rows = (np.asarray(groups, np.int64)[:, None] * group_size + np.arange(group_size)).ravel()
    return {k: v[rows] for k, v in batch.items()}


def concat(a: Batch | None, b: Batch) -> Batch:
    if a is None:
        return b
    if a.keys() != b.keys():
        raise ValueError(f"generation batches have different fields: {sorted(a)} vs {sorted(b)}")
    return {k: np.concatenate([a[k], b[k]]) for k in a}


@dataclasses.dataclass
class DynamicSamplingState:
    """Kept groups so far in this step, and counters for this step's metrics."""

    kept: Batch | None = None
    num_kept_groups: int = 0
    batches_drawn: int = 0
    groups_drawn: int = 0
    all_correct_groups: int = 0
    all_wrong_groups: int = 0

    def metrics(self) -> dict[str, float]:
        drawn = max(self.groups_drawn, 1)
        return {
            "dynamic_sampling/batches_drawn": float(self.batches_drawn),
            "dynamic_sampling/kept_frac": (self.groups_drawn - self.all_correct_groups
                                           - self.all_wrong_groups) / drawn,
            "dynamic_sampling/all_correct_groups": float(self.all_correct_groups),
            "dynamic_sampling/all_wrong_groups": float(self.all_wrong_groups),
        }


def accumulate(
    state: DynamicSamplingState,
    batch: Batch,
    scores: np.ndarray,
    *,
    kind: str | None,
    group_size: int,
    train_batch_size: int,
    max_sample_batches: int,
    min_replace_ratio: float = 0.3,
    rng: np.random.Generator | None = None,
) -> tuple[DynamicSamplingState, Batch | None]:
    """Adds one generation batch to this step's state (start each step from a fresh
    `DynamicSamplingState()`). Returns the new state and, once enough groups are kept, the
    training batch of exactly `train_batch_size` groups; the returned state then holds no
    kept groups, only this step's counters for `metrics()`.

    Uniform groups count as all-correct when their score is > 0, else all-wrong (exact for
    DAPO's +1/-1 and for 0/1 rewards). `max_sample_batches` > 0: raise once that many
    batches were drawn without filling the batch; <= 0: draw until full.
    """
    if kind not in TYPES:
        raise ValueError(f"dynamic_sampling.type {kind!r} is not one of {TYPES}")
    g = group_scores(scores, group_size)
    good = informative_groups(scores, group_size)
    uniform = ~good if group_size > 1 else np.zeros_like(good)
    state = dataclasses.replace(
        state,
        batches_drawn=state.batches_drawn + 1,
        groups_drawn=state.groups_drawn + g.shape[0],
        all_correct_groups=state.all_correct_groups + int(np.sum(uniform & (g[:, 0] > 0))),
        all_wrong_groups=state.all_wrong_groups + int(np.sum(uniform & (g[:, 0] <= 0))),
    )
    if kind is None:
        return _finish(state, batch, group_size)
    if kind == "replace":
        if g.shape[0] != train_batch_size:
            raise ValueError(f"replace needs generation batches of train_batch_size="
                             f"{train_batch_size} groups, got {g.shape[0]}")
        if good.mean() > min_replace_ratio:
            rng = rng if rng is not None else np.random.default_rng()
            good_idx, bad_idx = np.flatnonzero(good), np.flatnonzero(~good)
            source = np.arange(g.shape[0])
            source[bad_idx] = rng.choice(good_idx, size=len(bad_idx),
                                         replace=len(good_idx) < len(bad_idx))
            out = select_groups(batch, source, group_size)
            return _finish(state, {**out, "group_id": np.repeat(source, group_size)},
                           group_size)
    else:  # filter
        kept = select_groups(batch, np.flatnonzero(good), group_size)
        state = dataclasses.replace(state, kept=concat(state.kept, kept),
                                    num_kept_groups=state.num_kept_groups + int(good.sum()))
        if state.num_kept_groups >= train_batch_size:
            out = select_groups(state.kept, np.arange(train_batch_size), group_size)
            return _finish(state, out, group_size)
    if 0 < max_sample_batches <= state.batches_drawn:
        raise DynamicSamplingError(
            f"dynamic sampling ({kind}) drew {state.batches_drawn} generation batches "
            f"(max_sample_batches={max_sample_batches}) and kept {state.num_kept_groups} of the "
            f"{train_batch_size} prompt groups it needs: {state.all_correct_groups} groups were "
            f"all correct and {state.all_wrong_groups} all wrong. The data is too hard or too "
            "easy for this model; raise max_sample_batches (<= 0 means unbounded), change the "
            "data, or turn dynamic sampling off.")
    return state, None


def _finish(state: DynamicSamplingState, batch: Batch, group_size: int
            ) -> tuple[DynamicSamplingState, Batch]:
    if "group_id" not in batch:  # every group its own
        rows = len(next(iter(batch.values())))
        batch = {**batch, "group_id": np.arange(rows) // group_size}
    return dataclasses.replace(state, kept=None, num_kept_groups=0), batch
