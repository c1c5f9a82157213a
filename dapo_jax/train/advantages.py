"""Group-relative advantages (DAPO_FACTS section 1), one scalar per response.

`group_ids` are integers in [0, N) naming each response's prompt group (e.g. the prompt's
index in the batch); groups may have any size, including one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _group_stats(rewards: Array, group_ids: Array) -> tuple[Array, Array, Array, Array]:
    """Per-response group size n, group mean, unbiased (ddof=1) group std, and whether the
    group's rewards are all equal (compared exactly: float32 rounding of a mean of equal
    fractions can differ from them, and that residue must not become an advantage)."""
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {rewards.shape}, {group_ids.shape}")
    N = rewards.shape[0]
    r = rewards.astype(jnp.float32)
    seg = lambda x: jax.ops.segment_sum(x, group_ids, num_segments=N)[group_ids]
    n = seg(jnp.ones_like(r))
    mean = seg(r) / n
    var = seg((r - mean) ** 2) / jnp.maximum(n - 1.0, 1.0)
    top = jax.ops.segment_max(r, group_ids, num_segments=N)[group_ids]
    bottom = jax.ops.segment_min(r, group_ids, num_segments=N)[group_ids]
    return n, mean, jnp.sqrt(var), top == bottom


def grpo_advantages(rewards: Array, group_ids: Array, norm_by_std: bool = True,
                    epsilon: float = 1e-6) -> Array:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased (ddof=1).

    `norm_by_std=False` gives Dr. GRPO's A_i = R_i - mean_g R. A group of one has mean 0 and
    std 1 (so A = R / (1 + eps)), as in verl and SkyRL. A larger group whose rewards are all
    equal gets exactly 0 (SkyRL and verl divide the rounding residue of the mean by eps:
    up to 0.3 for shaped rewards)."""
    n, mean, std, uniform = _group_stats(rewards, group_ids)
    single = n == 1
    mean = jnp.where(single, 0.0, mean)
    centred = jnp.where(uniform & ~single, 0.0, rewards.astype(jnp.float32) - mean)
    if not norm_by_std:
        return centred
    return centred / (jnp.where(single, 1.0, std) + epsilon)


def rloo_advantages(rewards: Array, group_ids: Array) -> Array:
    """RLOO: A_i = R_i - mean_{j != i} R_j = (R_i - mean_g R) * n / (n - 1); a group of one
    gets 0, and so does a group of equal rewards (exactly)."""
    n, mean, _, uniform = _group_stats(rewards, group_ids)
    return jnp.where((n > 1) & ~uniform, (rewards - mean) * n / jnp.maximum(n - 1.0, 1.0), 0.0)


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages, "rloo": rloo_advantages}


def token_advantages(advantages: Array, loss_mask: Array) -> Array:
    """Broadcasts per-response advantages [N] over response tokens: [N, T]."""
    return advantages[:, None] * loss_mask.astype(jnp.float32)
