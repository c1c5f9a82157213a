"""Sample packing: layouts, attention within segments, and packed == padded for the loss,
its gradients and every metric (float32, every loss type and reduction, 1 and 8 devices,
different micro-batch splits), and a bounded number of compilations across length mixes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dapo_jax.models import init_model, preset
from dapo_jax.sharding import make_mesh
from dapo_jax.train.batch import (
    bucket_count,
    bucketed_rows,
    build_rows,
    make_layout,
    packed_layout,
    place_response_values,
    response_values,
)
from dapo_jax.train.objective import LossConfig
from dapo_jax.train.step import StepSettings, TrainState, mini_batch_rows
from dapo_jax.train.update import (
    OptimizerConfig,
    init_optimizer,
    make_optimizer,
    make_train_fns,
)
from tests.compiles import counting_compiles

CFG = preset("qwen3-tiny")
P, R = 12, 20  # max prompt / response length: rows of 32 tokens


def sequences(n: int, seed: int, max_response: int = R):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, CFG.vocab_size, rng.integers(2, P + 1)).tolist()
               for _ in range(n)]
    responses = [rng.integers(1, CFG.vocab_size, rng.integers(1, max_response + 1)).tolist()
                 for _ in range(n)]
    return prompts, responses


# ----------------------------------------------------------------------------- layouts
def test_packed_layout_fills_rows_first_fit_decreasing():
    # Totals 3, 3, 4, 2, 5, 7 into rows of 8, longest first: 7 -> row 0 (1 left), 5 -> row 1
    # (3 left), 4 -> row 2 (4 left), 3 -> row 1 (0 left), 3 -> row 2 (1 left), 2 -> no room:
    # row 3. Optimal too: the 7 wastes 1, and the other 17 tokens need 3 rows of 8.
    prompt = np.array([2, 1, 1, 1, 2, 3])
    response = np.array([1, 2, 3, 1, 3, 4])
    layout = packed_layout(prompt, response, 8)
    assert layout.num_rows == 4
    rows = [sorted(int(t) for t in (prompt + response)[layout.row == r]) for r in range(4)]
    assert rows == [[7], [3, 5], [3, 4], [2]]
    for r in range(layout.num_rows):  # segments numbered 1..k left to right, no overlap
        mine = np.flatnonzero(layout.row == r)
        order = mine[np.argsort(layout.start[mine])]
        assert layout.segment[order].tolist() == list(range(1, len(mine) + 1))
        ends = layout.start[order] + (prompt + response)[order]
        assert np.all(layout.start[order][1:] >= ends[:-1]) and ends[-1] <= 8


def test_rows_restart_positions_and_round_trip_values():
    prompts, responses = sequences(9, seed=1)
    layout = make_layout(prompts, responses, max_prompt_length=P, max_response_length=R,
                         packed=True, micro_batch_rows=2)
    rows = build_rows(layout, prompts, responses, pad_id=0)
    assert layout.num_rows % 2 == 0 and layout.num_rows < 9
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        row, a = layout.row[i], layout.start[i]
        cols = slice(a, a + len(p) + len(r))
        assert rows["input_ids"][row, cols].tolist() == p + r
        assert rows["positions"][row, cols].tolist() == list(range(len(p) + len(r)))
        assert set(rows["segment_ids"][row, cols]) == {layout.segment[i]}
        assert rows["loss_mask"][row, cols].tolist() == [0] * len(p) + [1] * len(r)
    values = [np.arange(len(r), dtype=np.float32) + i for i, r in enumerate(responses)]
    back = response_values(layout, place_response_values(layout, values))
    for a, b in zip(values, back, strict=True):
        np.testing.assert_array_equal(a, b)
    assert rows["segment_ids"].sum() > 0 and (rows["loss_mask"] * (rows["segment_ids"] == 0)
                                              ).sum() == 0


def test_too_long_sequence_is_an_error_naming_the_keys():
    with pytest.raises(ValueError, match="sequence 1 has 40 tokens.*trainer.max_prompt_length"
                                         ".*max_generate_length"):
        packed_layout(np.array([3, 10]), np.array([4, 30]), 32)


def test_bucket_counts():
    assert [bucket_count(n) for n in range(1, 18)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12,
                                                         14, 14, 16, 16, 20]
    assert [bucket_count(n) for n in (33, 40, 41, 100, 129)] == [40, 40, 48, 112, 160]


# ----------------------------------------------------------------------------- model
def test_forward_rows_hold_update_layouts_padded_to_larger_micro_batches():
    # Two mini-batches of 128 short sequences, each padded to one update micro-batch of 512
    # rows (64 per device x 8), then forward micro-batches of 32 rows: 1024 rows must fit
    # (the cap by sequence count alone, 256 rows, once gave a negative pad).
    assert bucketed_rows(1024, 32, at_most=256) == 1024
    assert bucketed_rows(40, 32, at_most=256) == 64
    assert bucketed_rows(300, 32, at_most=40) == 320


def test_a_mini_batch_smaller_than_a_micro_batch_is_not_padded_to_one():
    """128 short sequences in 80 packed rows on 8 devices at 64 rows per device: one
    micro-batch of 128 rows (16 per device: a power of two, so that 9-16 rows per device
    are one shape), not 512; the rows always split over the devices; more than a
    micro-batch's rows are whole micro-batches."""
    assert bucketed_rows(80, 512, at_most=128, shards=8) == 128
    assert bucketed_rows(96, 512, at_most=128, shards=8) == 128
    assert bucketed_rows(136, 512, at_most=256, shards=8) == 256  # 17 per device -> 32
    assert bucketed_rows(5, 512, at_most=128, shards=8) == 8
    assert bucketed_rows(9, 512, at_most=9, shards=1) == 9  # never more rows than sequences
    assert bucketed_rows(512, 512, at_most=1024, shards=8) == 512
    assert bucketed_rows(513, 512, at_most=1024, shards=8) == 1024


def test_attention_never_crosses_a_segment():
    """Each sequence's hidden states in a packed row equal those of the sequence alone."""
    model = init_model(CFG, seed=0)
    prompts, responses = sequences(8, seed=2, max_response=10)
    layout = packed_layout(np.array([len(p) for p in prompts]),
                           np.array([len(r) for r in responses]), P + R)
    rows = build_rows(layout, prompts, responses)
    assert layout.num_rows <= 4
    h = np.asarray(model.hidden_states(rows["input_ids"], rows["segment_ids"],
                                       rows["positions"]))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = np.asarray([p + r], np.int32)
        alone = np.asarray(model.hidden_states(ids, np.ones_like(ids)))[0]
        a = layout.start[i]
        np.testing.assert_allclose(h[layout.row[i], a:a + len(p) + len(r)], alone, rtol=1e-5,
                                   atol=1e-5)


# ----------------------------------------------------------------------------- update
def rollout_batch(seed: int, n: int = 16, max_response: int = R):
    """A kept rollout batch as the trainer holds it: ragged prompts/responses, scores,
    truncation flags and sampler log-probs."""
    prompts, responses = sequences(n, seed, max_response)
    rng = np.random.default_rng(seed + 100)
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]
    return {"prompt_ids": obj(prompts), "response_ids": obj(responses),
            "rollout_logprobs": obj([rng.normal(-6.2, 0.3, len(r)).tolist() for r in responses]),
            "score": rng.choice([-1.0, 1.0], n).astype(np.float32),
            "acc": np.zeros(n, bool),
            "truncated": rng.random(n) < 0.2,
            "group_id": np.arange(n) // 4}  # as dynamic sampling's `accumulate` sets it


def settings(packing: bool, micro_rows: int, n: int = 16, shards: int = 1, **kw
             ) -> StepSettings:
    return StepSettings(group_size=4, max_prompt_length=P, max_generate_length=R,
                        mini_batch_size=n, update_epochs=1, advantage_estimator="grpo",
                        grpo_norm_by_std=True, overlong_buffer_len=4,
                        overlong_penalty_factor=1.0, apply_overlong_filtering=True,
                        use_kl_loss=True, pad_id=0, packing=packing,
                        micro_batch_rows=micro_rows, shards=shards, **kw)


def sgd_step(loss_cfg: LossConfig, s: StepSettings, batch, mesh=None):
    """(gradient leaves, metrics) of one SGD(lr=1) update on the batch laid out per `s`,
    with old/ref log-probs from the model (perturbed, so ratios are not all 1)."""
    from dapo_jax.train.step import shaped_advantages

    graphdef, params = nnx.split(init_model(CFG, seed=0, mesh=mesh))
    before = jax.tree.map(np.asarray, params)
    opt = optax.sgd(1.0)
    fns = make_train_fns(graphdef, params, opt, loss_cfg, micro_batch_rows=s.micro_batch_rows,
                         forward_micro_batch_rows=s.micro_batch_rows, mesh=mesh)
    _, adv = shaped_advantages(batch, s)
    (layout,), (mini,) = mini_batch_rows(batch, adv, s)
    old = np.asarray(fns.logprobs(params, mini["input_ids"], mini["segment_ids"],
                                  mini["positions"]))
    rng = np.random.default_rng(0)  # the same perturbation of each response token
    noisy = [v + 0.05 * rng.normal(size=v.shape) for v in response_values(layout, old)]
    mini["old_logprobs"] = place_response_values(layout, noisy)
    mini["ref_logprobs"] = old + 0.1
    params, _, metrics = fns.update(params, init_optimizer(opt, params), mini)
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, params)
    return jax.tree.leaves(grads), {k: float(v) for k, v in metrics.items()}


# Every loss type and every reduction once (a Latin square; the objective's float64 tests
# cover all nine pairs): packing changes how rows are cut into sequences, which the
# reductions (per-sequence sums and counts) and GSPO's sequence-level ratio read.
COMBOS = [("regular", "token_mean"), ("dual_clip", "sequence_mean"),
          ("gspo", "seq_mean_token_sum_norm")]


@pytest.mark.slow
@pytest.mark.parametrize("loss,reduction", COMBOS)
def test_packed_equals_padded(loss, reduction):
    """Same loss, gradients and metrics from padded rows (one micro-batch of 16 rows, 1
    device) as from packed rows on 1 device (micro-batches of 2 rows) and on 8 devices
    (micro-batches of 8 rows); KL, TIS and entropy terms on, overlong filtering on."""
    eps = (3e-4, 4e-4) if loss == "gspo" else (0.2, 0.28)
    cfg = LossConfig(policy_loss_type=loss, loss_reduction=reduction, eps_clip_low=eps[0],
                     eps_clip_high=eps[1], clip_ratio_c=3.0, max_seq_len=P + R,
                     use_kl_loss=True, kl_loss_coef=0.1, use_entropy_loss=True,
                     entropy_loss_coef=0.01, use_tis=True, tis_imp_ratio_cap=2.0)
    batch = rollout_batch(seed=3)
    g_pad, m_pad = sgd_step(cfg, settings(packing=False, micro_rows=16), batch)
    for micro_rows, mesh, shards in ((2, None, 1), (8, make_mesh((2, 2, 2)), 4)):
        g, m = sgd_step(cfg, settings(packing=True, micro_rows=micro_rows, shards=shards),
                        batch, mesh)
        for a, b in zip(g_pad, g, strict=True):
            # Gradients are read off as w_before - w_after; for the norm scales (w = 1.0)
            # that difference is only resolved to float32's step at 1.0, 1.2e-7.
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=2.4e-7)
        assert m.keys() == m_pad.keys()
        for k in m_pad:
            # approx_kl and the ratio are means of differences of log-probs of size ~6,
            # whose float32 rounding differs with the split over devices (~7e-7).
            np.testing.assert_allclose(m[k], m_pad[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_compiles_once_per_bucket_across_length_mixes():
    """Steps with different length mixes reuse the compiled update: packed mini-batches
    come in bucketed row counts, each compiled once. (At this size, 3-7 micro-batches, the
    buckets are exact: the short and long mixes give 6-8 and 8-14 rows.)"""
    graphdef, params = nnx.split(init_model(CFG, seed=0))
    opt = optax.sgd(1e-3)
    cfg = LossConfig()
    s = settings(packing=True, micro_rows=2)
    fns = make_train_fns(graphdef, params, opt, cfg, micro_batch_rows=2,
                         forward_micro_batch_rows=2)
    opt_state = init_optimizer(opt, params)
    rows_seen, new_programs = set(), []
    for seed in range(10):  # short and long responses alternate
        batch = rollout_batch(seed, max_response=R if seed % 2 else 6)
        (layout,), (mini,) = mini_batch_rows(batch, np.ones(16, np.float32), s)
        new_bucket = layout.num_rows not in rows_seen
        rows_seen.add(layout.num_rows)
        mini = fns.put(mini)
        with counting_compiles() as compiled:
            mini["old_logprobs"] = fns.logprobs(params, mini["input_ids"],
                                                mini["segment_ids"], mini["positions"])
            params, opt_state, _ = fns.update(params, opt_state, mini)
        new_programs.append((new_bucket, compiled[0]))
    assert len(rows_seen) >= 2  # the mixes did change the packed shapes
    assert len(rows_seen) <= 5
    # A new bucket compiles the log-prob pass and the update once each; a seen one nothing.
    assert new_programs == [(new, 2 if new else 0) for new, _ in new_programs]


def test_step_moves_rows_once_and_fetches_metrics_once(monkeypatch):
    """One `train_step` on 8 devices (2 mini-batches x 2 epochs, KL and TIS on) sends every
    row to the devices in one transfer, keeps the old and reference log-probs there, fetches
    the metrics of all four updates in one transfer back, and waits on the devices three
    times (after the transfer, the log-prob pass, the updates: the phase timings). Implicit
    transfers (a float() of a device value, numpy rows handed to jit, jnp on host arrays)
    are disallowed, so none can creep back unnoticed."""
    from dapo_jax.train.step import train_step

    mesh = make_mesh((2, 2, 2))
    graphdef, params = nnx.split(init_model(CFG, seed=0, mesh=mesh))
    ref_params = nnx.split(init_model(CFG, seed=0, mesh=mesh))[1]
    opt = make_optimizer(OptimizerConfig(lr=1e-3))  # the trainer's (its lr is a metric)
    cfg = LossConfig(use_kl_loss=True, kl_loss_coef=0.1, use_tis=True)
    fns = make_train_fns(graphdef, params, opt, cfg, micro_batch_rows=8,
                         forward_micro_batch_rows=8, mesh=mesh)
    s = dataclasses.replace(settings(packing=True, micro_rows=8, n=8, shards=4),
                            update_epochs=2)
    batch = rollout_batch(seed=5, n=16)
    state, _ = train_step(batch, TrainState(params, init_optimizer(opt, params), 0, 0),
                          ref_params=ref_params, fns=fns, settings=s, timings={})  # compiles

    counts: dict[str, int] = {"put": 0, "get": 0, "wait": 0, "implicit_get": 0}
    inside_get = [False]

    def counted(name, real, host_only=False):
        def call(*args, **kwargs):
            # A put of arrays already on the devices moves nothing: only host data counts.
            if not host_only or any(isinstance(x, np.ndarray) for x in jax.tree.leaves(args[0])):
                counts[name] += 1
            inside_get[0] = name == "get"
            try:
                return real(*args, **kwargs)
            finally:
                inside_get[0] = False
        return call

    # Every read of a device value on the host (float(), np.asarray, .item(), device_get)
    # goes through ArrayImpl._value; outside device_get it is an implicit fetch. (The
    # transfer guard alone does not catch a float() of a replicated scalar.)
    from jax._src.array import ArrayImpl

    value = ArrayImpl._value

    def read(self):
        counts["implicit_get"] += not inside_get[0]
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(read))
    monkeypatch.setattr(jax, "device_put", counted("put", jax.device_put, host_only=True))
    monkeypatch.setattr(jax, "device_get", counted("get", jax.device_get))
    monkeypatch.setattr(jax, "block_until_ready", counted("wait", jax.block_until_ready))
    timings: dict[str, float] = {}
    with jax.transfer_guard("disallow"), counting_compiles() as compiled:
        after, metrics = train_step(batch, state, ref_params=ref_params, fns=fns, settings=s,
                                    timings=timings)
    assert counts == {"put": 1, "get": 1, "wait": 3, "implicit_get": 0}
    assert set(timings) == {"layout", "transfer", "logprobs", "update", "metrics"}
    assert all(np.isfinite(v) for v in metrics.values()) and "policy/kl_loss" in metrics
    assert (after.step, after.version) == (state.step + 1, state.version + 1)
    assert compiled[0] == 0  # the second step reuses the first's programs
