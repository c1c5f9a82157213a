"""Dynamic sampling: filter and replace over prompt groups, state, limits and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from dapo_jax.train.dynamic_sampling import (
    DynamicSamplingError,
    DynamicSamplingState,
    accumulate,
    informative_groups,
)

G = 4


def gen_batch(group_scores: list[list[float]], offset: int):
    """A generation batch whose `prompt` field says which group each row came from."""
    scores = np.array(group_scores, np.float64).ravel()
    n = len(group_scores)
    batch = {"prompt": np.repeat(np.arange(n) + offset, G),
             "tokens": np.arange(n * G)[:, None] + np.zeros((1, 3), int)}
    return batch, scores


MIXED, RIGHT, WRONG = [1, -1, 1, 1], [1, 1, 1, 1], [-1, -1, -1, -1]


def test_informative_groups():
    scores = np.array(MIXED + RIGHT + WRONG + [0, 0, 0, 1], np.float64)
    np.testing.assert_array_equal(informative_groups(scores, G), [True, False, False, True])
    assert informative_groups(np.array([1.0, 1.0]), 1).all()  # groups of one are kept


def test_filter_accumulates_then_truncates():
    kw = dict(kind="filter", group_size=G, train_batch_size=3, max_sample_batches=10)
    state = DynamicSamplingState()
    b1, s1 = gen_batch([MIXED, RIGHT, WRONG, MIXED], offset=0)
    state, out = accumulate(state, b1, s1, **kw)
    assert out is None and state.num_kept_groups == 2
    b2, s2 = gen_batch([WRONG, MIXED, MIXED, MIXED], offset=10)
    state, out = accumulate(state, b2, s2, **kw)
    assert out is not None
    # exactly 3 groups, whole, in order: 0, 3 from the first batch, then 11.
    np.testing.assert_array_equal(out["prompt"], np.repeat([0, 3, 11], G))
    assert out["tokens"].shape == (3 * G, 3)
    m = state.metrics()
    assert m["dynamic_sampling/batches_drawn"] == 2
    assert m["dynamic_sampling/all_correct_groups"] == 1
    assert m["dynamic_sampling/all_wrong_groups"] == 2
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(5 / 8)
    assert state.kept is None


def test_max_sample_batches_error_names_the_problem():
    kw = dict(kind="filter", group_size=G, train_batch_size=2, max_sample_batches=3)
    state = DynamicSamplingState()
    for i in range(2):
        state, out = accumulate(state, *gen_batch([RIGHT, WRONG], i), **kw)
        assert out is None
    with pytest.raises(DynamicSamplingError, match=r"drew 3 generation batches.*too hard or too"
                                                   r" easy"):
        accumulate(state, *gen_batch([RIGHT, WRONG], 9), **kw)


def test_unbounded_when_max_sample_batches_not_positive():
    kw = dict(kind="filter", group_size=G, train_batch_size=1, max_sample_batches=0)
    state = DynamicSamplingState()
    for i in range(50):
        state, out = accumulate(state, *gen_batch([WRONG], i), **kw)
        assert out is None
    state, out = accumulate(state, *gen_batch([MIXED], 99), **kw)
    np.testing.assert_array_equal(out["prompt"], [99] * G)


def test_replace_copies_good_groups_over_bad_ones():
    kw = dict(kind="replace", group_size=G, train_batch_size=4, max_sample_batches=5,
              min_replace_ratio=0.3, rng=np.random.default_rng(0))
    batch, scores = gen_batch([MIXED, RIGHT, MIXED, WRONG], 0)
    _, out = accumulate(DynamicSamplingState(), batch, scores, **kw)
    prompts = out["prompt"].reshape(4, G)
    assert (prompts == prompts[:, :1]).all()  # groups stay whole
    np.testing.assert_array_equal(prompts[[0, 2], 0], [0, 2])  # good groups stay in place
    assert set(prompts[[1, 3], 0]) <= {0, 2}  # bad ones become copies of good ones


def test_replace_draws_without_repetition_when_enough_good_groups():
    """SkyRL: with at least as many good groups as bad, each good group is copied at most
    once (50 seeds); with fewer, copies repeat. Copies keep their source's group id."""
    kw = dict(kind="replace", group_size=G, train_batch_size=6, max_sample_batches=5,
              min_replace_ratio=0.3)
    for seed in range(50):
        batch, scores = gen_batch([MIXED, RIGHT, MIXED, WRONG, MIXED, WRONG], 0)
        _, out = accumulate(DynamicSamplingState(), batch, scores,
                            rng=np.random.default_rng(seed), **kw)
        sources = out["prompt"].reshape(6, G)[[1, 3, 5], 0]
        assert len(set(sources)) == 3 and set(sources) <= {0, 2, 4}, sources
        np.testing.assert_array_equal(out["group_id"], out["prompt"])  # prompt i is group i
    batch, scores = gen_batch([MIXED, RIGHT, MIXED, WRONG, WRONG, RIGHT], 0)  # 2 good, 4 bad
    _, out = accumulate(DynamicSamplingState(), batch, scores, rng=np.random.default_rng(0),
                        **kw)
    assert set(out["prompt"].reshape(6, G)[:, 0]) <= {0, 2}


def test_replace_resamples_when_too_few_good_groups():
    kw = dict(kind="replace", group_size=G, train_batch_size=4, max_sample_batches=2,
              min_replace_ratio=0.3)
    state, out = accumulate(DynamicSamplingState(),
                            *gen_batch([MIXED, RIGHT, WRONG, WRONG], 0), **kw)  # 25% good
    assert out is None
    with pytest.raises(DynamicSamplingError, match="drew 2"):
        accumulate(state, *gen_batch([MIXED, RIGHT, WRONG, RIGHT], 0), **kw)


def test_off_passes_the_batch_through():
    batch, scores = gen_batch([RIGHT, MIXED], 0)
    _, out = accumulate(DynamicSamplingState(), batch, scores, kind=None, group_size=G,
                        train_batch_size=2, max_sample_batches=0)
    np.testing.assert_array_equal(out["prompt"], batch["prompt"])


def test_bad_type_is_an_error():
    with pytest.raises(ValueError, match="dynamic_sampling.type"):
        accumulate(DynamicSamplingState(), *gen_batch([MIXED], 0), kind="drop", group_size=G,
                   train_batch_size=1, max_sample_batches=0)
