"""Every DAPO formula against a float64 NumPy reference on fresh random inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.train import objective
from dapo_jax.train.advantages import grpo_advantages, rloo_advantages, token_advantages
from dapo_jax.train.objective import LossConfig, kl_penalty, policy_loss, tis_weights
from dapo_jax.train.shaping import overlong_filter, soft_overlong_penalty


# ----------------------------------------------------------------------------- references
def ref_per_token(logp, old, adv, mask, kind, lo, hi, c):
    logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
    if kind == "gspo":
        m = np.asarray(mask, np.float64)
        seq = (np.clip(logp - old, -20, 20) * m).sum(-1) / np.maximum(m.sum(-1), 1)
        ratio = np.exp(np.clip(np.broadcast_to(seq[:, None], logp.shape), -20, 20))
    else:
        ratio = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi))
    if kind == "dual_clip":
        loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
    return loss, ratio


def ref_reduce(values, mask, reduction, max_seq_len=None):
    m = np.asarray(mask, np.float64)
    if reduction == "token_mean":
        return (values * m).sum() / max(m.sum(), 1)
    if reduction == "sequence_mean":  # SkyRL: every row counts, all-masked ones add 0
        rows = m.sum(-1) > 0
        per_seq = (values * m).sum(-1)[rows] / m.sum(-1)[rows]
        return per_seq.sum() / m.shape[0]
    return (values * m).sum() / (m.shape[0] * max_seq_len)


def random_inputs(seed, B=6, T=9, spread=0.5):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2, 1, (B, T)).astype(np.float32)
    logp = (old + rng.normal(0, spread, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, (B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0] = 0.0  # an all-masked row
    return logp, old, adv, mask


# ----------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("kind", ["regular", "dual_clip", "gspo"])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_reference(kind, reduction, seed):
    # spread 2.0 puts many ratios far outside the clip range (and past the dual clip).
    logp, old, adv, mask = random_inputs(seed, spread=2.0)
    kw = dict(policy_loss_type=kind, eps_clip_low=0.2, eps_clip_high=0.28, clip_ratio_c=3.0,
              loss_reduction=reduction, max_seq_len=32)
    loss, metrics = jax.jit(lambda *a: policy_loss(*a, LossConfig(**kw)))(logp, old, adv, mask)
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    per_token, ratio = ref_per_token(logp, old, adv, mask, kind, 0.2, 0.28, 3.0)
    np.testing.assert_allclose(loss, ref_reduce(per_token, mask, reduction, 32), rtol=1e-5,
                               atol=1e-6)
    m = mask.astype(bool)
    np.testing.assert_allclose(metrics["clip_frac_high"],
                               ((ratio > 1.28) & (adv > 0))[m].mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"],
                               ((ratio < 0.8) & (adv < 0))[m].mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], (old - logp)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio"], ratio[m].mean(), rtol=1e-5)
    assert 0 < float(metrics["clip_frac_high"]) < 1


def test_sequence_mean_counts_masked_sequences_and_kl_is_a_sequence_mean():
    """Hand case, ratio 1 (logp = old) so the regular loss is -A per token. Two sequences:
    row 0 has tokens A = 1, 1, 3 (mean loss -5/3), row 1 is overlong-filtered (mask 0).
    SkyRL's sequence_mean: (-5/3 + 0) / 2 rows = -5/6 (counting only trainable rows would
    give -5/3). KL (k1 = logp - ref = 0.3 on row 0's tokens) under token_mean is still a
    sequence mean: (0.3 + 0) / 2 = 0.15, not the token mean 0.3."""
    logp = jnp.zeros((2, 3))
    adv = jnp.array([[1.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    kw = dict(policy_loss_type="regular", eps_clip_low=0.2, eps_clip_high=0.28,
              clip_ratio_c=3.0, max_seq_len=None)
    den = objective.reduction_denominator(mask, "sequence_mean")
    assert float(den) == 2.0
    loss, _ = objective.policy_loss(logp, logp, adv, mask,
                                    LossConfig(loss_reduction="sequence_mean", **kw),
                                    denominator=den)
    np.testing.assert_allclose(loss, -5 / 6, rtol=1e-6)
    batch = {"old_logprobs": logp, "advantages": adv, "loss_mask": mask,
             "ref_logprobs": logp - 0.3}
    den_tok = objective.reduction_denominator(mask, "token_mean")
    total, metrics = objective.total_loss(
        logp, jnp.zeros((2, 3)), batch,
        LossConfig(loss_reduction="token_mean", use_kl_loss=True, kl_loss_coef=1.0,
                   kl_estimator_type="k1", **kw), denominator=den_tok)
    np.testing.assert_allclose(metrics["kl_loss"], 0.15, rtol=1e-6)
    np.testing.assert_allclose(total, -5 / 3 + 0.15, rtol=1e-6)  # token mean: -5/3


def test_dual_clip_bounds_negative_advantages():
    """A < 0 and a huge ratio: regular loss is -A r (unbounded); dual clip caps it at -A c."""
    logp = np.array([[0.0, 0.0, 0.0]], np.float32)
    old = np.array([[-5.0, -5.0, -0.1]], np.float32)  # r = e^5 = 148, 148, 1.105
    adv = np.array([[-1.0, 2.0, -1.0]], np.float32)
    mask = np.ones_like(adv)
    kw = dict(eps_clip_low=0.2, eps_clip_high=0.28, clip_ratio_c=3.0, loss_reduction="token_mean")
    reg, _ = policy_loss(logp, old, adv, mask, LossConfig(policy_loss_type="regular", **kw))
    dual, metrics = policy_loss(logp, old, adv, mask,
                                LossConfig(policy_loss_type="dual_clip", **kw))
    r = np.exp(5.0)
    # token 0: max(r, 1.28) = r -> dual min(r, 3) = 3; token 1: A>0, max(-2r, -2*1.28) = -2.56;
    # token 2: max(1.105, 1.105) = 1.105 (within bounds; dual inactive).
    np.testing.assert_allclose(reg, (r - 2.56 + np.exp(0.1)) / 3, rtol=1e-5)
    np.testing.assert_allclose(dual, (3.0 - 2.56 + np.exp(0.1)) / 3, rtol=1e-5)
    np.testing.assert_allclose(metrics["dual_clip_frac"], 1 / 3, rtol=1e-6)


def test_all_masked_batch_gives_zero_not_nan():
    logp, old, adv, _ = random_inputs(3)
    for reduction in ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"]:
        loss, metrics = policy_loss(logp, old, adv, np.zeros_like(adv),
                                    LossConfig(loss_reduction=reduction, max_seq_len=16))
        assert float(loss) == 0.0
        assert all(np.isfinite(np.asarray(v)) for v in metrics.values())


def test_global_denominator_makes_split_exact():
    """Sum of micro-batch losses with the full batch's denominator == full-batch loss."""
    logp, old, adv, mask = random_inputs(4, B=8)
    for reduction in ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"]:
        kw = dict(loss_reduction=reduction, max_seq_len=20)
        full, _ = policy_loss(logp, old, adv, mask, LossConfig(**kw))
        denom = objective.reduction_denominator(jnp.asarray(mask), reduction, 20)
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                                LossConfig(**kw), denominator=denom)[0] for i in range(0, 8, 2))
        np.testing.assert_allclose(parts, full, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy_loss_type="ppo2"), "^policy_loss_type: 'ppo2' is not one of"),
    (dict(loss_reduction="mean"), "^loss_reduction: "),
    (dict(eps_clip_low=-0.1), "^eps_clip_low: must be >= 0"),
    (dict(eps_clip_high=-0.1), "^eps_clip_high: must be >= 0"),
    (dict(policy_loss_type="dual_clip", clip_ratio_c=1.0), "^clip_ratio_c: must be > 1"),
    (dict(loss_reduction="seq_mean_token_sum_norm"), "^max_seq_len: "),
    (dict(kl_estimator_type="k4"), "^kl_estimator_type: "),
    (dict(use_tis=True, tis_imp_ratio_cap=0.0), "^tis_imp_ratio_cap: must be > 0"),
])
def test_invalid_settings_are_refused_when_built_naming_the_key(kwargs, match):
    """The loss's settings are checked once, when built (never at trace time, never as a
    NaN), and each error starts with the key (the trainer prefixes trainer.algorithm.)."""
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_shape_mismatch_raises():
    logp, old, adv, mask = random_inputs(0)
    with pytest.raises(ValueError, match="equal"):
        policy_loss(logp, old[:, :-1], adv, mask, LossConfig())


def test_registry_accepts_a_new_loss():
    @objective.register_policy_loss("test_plain_pg")
    def plain(logprobs, old_logprobs, advantages, loss_mask, **_):
        return -advantages * logprobs, {}

    try:
        logp, old, adv, mask = random_inputs(5)
        loss, _ = policy_loss(logp, old, adv, mask, LossConfig(policy_loss_type="test_plain_pg"))
        np.testing.assert_allclose(loss, ref_reduce(-adv.astype(np.float64) * logp, mask,
                                                    "token_mean"), rtol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            objective.register_policy_loss("test_plain_pg")(plain)
    finally:
        objective.POLICY_LOSSES.pop("test_plain_pg")


def test_policy_gradient_sign_and_clip_zeroes_gradient():
    """d loss / d logp = -A r inside the clip range, 0 where the clip is active."""
    logp = np.array([[0.0, 0.0]], np.float32)
    old = np.array([[0.0, -1.0]], np.float32)  # r = 1 and e = 2.72 (> 1.28, clipped)
    adv = np.array([[1.0, 1.0]], np.float32)
    g = jax.grad(lambda lp: policy_loss(lp, old, adv, np.ones_like(adv), LossConfig())[0])(
        jnp.asarray(logp))
    np.testing.assert_allclose(g, [[-0.5, 0.0]], atol=1e-6)


# ----------------------------------------------------------------------------- KL, TIS
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_estimators(estimator):
    rng = np.random.default_rng(7)
    logp = rng.normal(-2, 1, (4, 5)).astype(np.float32)
    ref = (logp + rng.normal(0, 1.5, (4, 5))).astype(np.float32)
    d = ref.astype(np.float64) - logp
    expected = {"k1": -d, "abs": np.abs(d), "k2": d * d / 2,
                "k3": np.clip(np.exp(np.clip(d, -20, 20)) - d - 1, -10, 10)}[estimator]
    out = kl_penalty(jnp.asarray(logp), jnp.asarray(ref), estimator)
    chex.assert_shape(out, (4, 5))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, jnp.asarray(ref), estimator)))(
        jnp.asarray(logp))
    assert float(jnp.abs(grad).sum()) > 0  # the KL term carries a gradient


def test_tis_weights_are_capped_and_constant():
    old = jnp.array([[0.0, 0.0, 0.0]])
    rollout = jnp.array([[0.0, -0.5, -3.0]])
    w = tis_weights(old, rollout, 2.0)
    np.testing.assert_allclose(w, [[1.0, np.exp(0.5), 2.0]], rtol=1e-6)
    assert float(jnp.sum(jax.grad(lambda o: jnp.sum(tis_weights(o, rollout, 2.0)))(old))) == 0


def test_decoupled_ppo_with_capped_behaviour_weight_matches_float64():
    """The asynchronous objective: proximal old log-probs, behaviour (rollout) log-probs
    weighting each token by min(pi_prox / pi_behav, cap), token-mean over the mask."""
    rng = np.random.default_rng(3)
    shape = (4, 9)
    logp, old = rng.normal(-1.5, 0.3, shape), rng.normal(-1.5, 0.3, shape)
    behav = old + rng.normal(0, 0.8, shape)  # a few steps older weights
    adv = rng.normal(0, 1, shape)
    mask = rng.random(shape) < 0.8
    cap, lo, hi = 2.0, 0.2, 0.28
    r = np.exp(logp - old)
    w = np.minimum(np.exp(old - behav), cap)
    per_token = -w * np.minimum(r * adv, np.clip(r, 1 - lo, 1 + hi) * adv)
    want = (per_token * mask).sum() / mask.sum()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, metrics = objective.total_loss(
        f32(logp), jnp.zeros(shape, jnp.float32),
        {"old_logprobs": f32(old), "rollout_logprobs": f32(behav), "advantages": f32(adv),
         "loss_mask": jnp.asarray(mask, jnp.float32)},
        LossConfig(eps_clip_low=lo, eps_clip_high=hi, use_tis=True, tis_imp_ratio_cap=cap),
        denominator=jnp.float32(mask.sum()))
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["tis_weight"]), (w * mask).sum() / mask.sum(),
                               rtol=1e-5)
    assert (w == cap).any() and (w < 1).any()  # the cap and the down-weighting both occur


# ----------------------------------------------------------------------------- advantages
def ref_grpo(rewards, groups, norm_by_std):
    out = np.zeros(len(rewards))
    for g in np.unique(groups):
        idx = groups == g
        r = rewards[idx].astype(np.float64)
        if len(r) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = r.mean(), r.std(ddof=1)
        out[idx] = (r - mean) / (std + 1e-6) if norm_by_std else r - mean
    return out


def ref_rloo(rewards, groups):
    out = np.zeros(len(rewards))
    for g in np.unique(groups):
        idx = groups == g
        r, n = rewards[idx].astype(np.float64), idx.sum()
        out[idx] = 0.0 if n == 1 else (r - r.mean()) * n / (n - 1)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantages(norm_by_std):
    rng = np.random.default_rng(11)
    # groups of 4, 3, 1 (a group of one) and 2 equal rewards (std 0), shuffled order
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
    rewards = rng.choice([-1.0, 1.0], size=10).astype(np.float32)
    rewards[8:] = 1.0
    perm = rng.permutation(10)
    groups, rewards = groups[perm], rewards[perm]
    # In JAX (jitted) and in numpy on the host (the trainer's step), the same numbers.
    on_device = jax.jit(grpo_advantages, static_argnums=2)(rewards, groups, norm_by_std)
    on_host = grpo_advantages(rewards, groups, norm_by_std)
    assert isinstance(on_device, jax.Array) and isinstance(on_host, np.ndarray)
    for adv in (on_device, on_host):
        chex.assert_shape(adv, (10,))
        chex.assert_type(adv, jnp.float32)
        np.testing.assert_allclose(adv, ref_grpo(rewards, groups, norm_by_std), rtol=1e-5,
                                   atol=1e-6)
        # The equal-reward group gets 0, not a NaN.
        assert np.all(np.asarray(adv)[groups == 3] == 0)


def test_uniform_group_of_inexact_floats_gets_exactly_zero():
    """Five equal shaped rewards of 1 - 0.1 x 7/12: their float32 mean is not exactly
    the reward (the sum rounds), so (r - mean) / (std + 1e-6) is the residue over ~1e-6
    instead of 0. Exact zeros for GRPO (with and without std), RLOO; a mixed group is
    untouched."""
    r = np.float32(1.0) - np.float32(0.1) * np.float32(7 / 12)
    rewards = np.array([r] * 5 + [1.0, -1.0], np.float32)
    groups = np.array([0] * 5 + [1, 1])
    mean = np.float32(rewards[:5].sum(dtype=np.float32) / np.float32(5))
    assert abs((r - mean) / np.float32(1e-6)) > 0.01  # what the plain formula gives
    for adv in (grpo_advantages(rewards, groups), grpo_advantages(rewards, groups, False),
                rloo_advantages(rewards, groups)):
        assert np.all(np.asarray(adv)[:5] == 0.0), adv
        assert np.all(np.asarray(adv)[5:] != 0.0)


def test_grpo_continuous_rewards():
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(5), 8)
    rewards = rng.normal(size=40).astype(np.float32)
    np.testing.assert_allclose(grpo_advantages(rewards, groups), ref_grpo(rewards, groups, True),
                               rtol=1e-5, atol=1e-6)


def test_rloo_advantages():
    rng = np.random.default_rng(13)
    groups = np.array([0, 0, 0, 1, 2, 2, 2, 2])
    rewards = rng.normal(size=8).astype(np.float32)
    for r, g in ((rewards, groups), (jnp.asarray(rewards), jnp.asarray(groups))):
        adv = rloo_advantages(r, g)
        chex.assert_type(adv, jnp.float32)
        np.testing.assert_allclose(adv, ref_rloo(rewards, groups), rtol=1e-5, atol=1e-6)


def test_token_advantages_broadcast():
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[0, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(token_advantages(adv, mask), [[0, 1, 1], [-2, -2, 0]])


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="rewards and group_ids"):
        grpo_advantages(jnp.zeros(4), jnp.zeros(3, jnp.int32))


# ----------------------------------------------------------------------------- shaping
def test_soft_overlong_penalty():
    rng = np.random.default_rng(14)
    L_max, L_cache, f = 100, 30, 1.0
    # Beyond L_max (an engine with another limit): -f, the paper's R - 1 for f = 1; the
    # formula alone would give -(130 - 70) / 30 = -2 at length 130.
    lengths = np.concatenate([[0, 70, 71, 85, 100, 101, 130], rng.integers(0, 101, 20)])
    expected = np.where(lengths > L_max, -f,
                        np.minimum(-(lengths - (L_max - L_cache)) / L_cache * f, 0.0))
    for out in (soft_overlong_penalty(jnp.asarray(lengths), L_max, L_cache, f),
                soft_overlong_penalty(lengths, L_max, L_cache, f)):  # jax / numpy (host)
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out[:7], [0, 0, -1 / 30, -0.5, -1.0, -1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(soft_overlong_penalty(jnp.asarray([130]), L_max, L_cache, 0.5),
                               [-0.5])
    with pytest.raises(ValueError, match="overlong_buffer.len"):
        soft_overlong_penalty(jnp.asarray(lengths), 100, 0, 1.0)


def test_overlong_filter_zeroes_truncated_responses():
    # Two packed rows: row 0 holds a kept response (cols 1-2) and a truncated one (cols 4-6).
    mask = jnp.array([[0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], jnp.float32)
    truncated = jnp.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], bool)
    out = overlong_filter(mask, truncated)
    np.testing.assert_array_equal(out, [[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter(mask, jnp.array([True, False]))
