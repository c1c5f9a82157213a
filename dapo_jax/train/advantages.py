"""Group-relative advantages (DAPO_FACTS section 1), one scalar per response.

`group_ids` are integers in [0, N) naming each response's prompt group (e.g. the prompt's
index in the batch); groups may have any size, including one.

Each function computes in the namespace of its input: numpy arrays stay on the host (the
trainer's step: no device round trip, no op-by-op dispatch), jax arrays or tracers in JAX.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray or jax.Array


def xp(x: Array) -> Any:
    """jax.numpy for jax arrays and tracers, numpy for everything else."""
    return jnp if isinstance(x, jax.Array) else np


_JAX_SEGMENT = {"sum": jax.ops.segment_sum, "max": jax.ops.segment_max,
                "min": jax.ops.segment_min}
_NP_SEGMENT = {"sum": (np.add, 0.0), "max": (np.maximum, -np.inf), "min": (np.minimum, np.inf)}


def _segment(op: str, x: Array, ids: Array, n: int) -> Array:
    """Per-group sum / max / min of x over group ids in [0, n), as jax.ops.segment_*."""
    if xp(x) is jnp or xp(ids) is jnp:
        return _JAX_SEGMENT[op](x, ids, num_segments=n)
    ufunc, identity = _NP_SEGMENT[op]
    out = np.full(n, identity, x.dtype)
    ufunc.at(out, np.asarray(ids), x)
    return out


def _group_stats(rewards: Array, group_ids: Array) -> tuple[Array, Array, Array, Array]:
    """Per-response group size n, group mean, unbiased (ddof=1) group std, and whether the
    group's rewards are all equal (compared exactly: float32 rounding of a mean of equal
    fractions can differ from them, and that residue must not become an advantage)."""
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {rewards.shape}, {group_ids.shape}")
    N, np_ = rewards.shape[0], xp(rewards)
    r = rewards.astype(np_.float32)
    seg = lambda op, x: _segment(op, x, group_ids, N)[group_ids]
    n = seg("sum", np_.ones_like(r))
    mean = seg("sum", r) / n
    var = seg("sum", (r - mean) ** 2) / np_.maximum(n - np_.float32(1), np_.float32(1))
    return n, mean, np_.sqrt(var), seg("max", r) == seg("min", r)


def grpo_advantages(rewards: Array, group_ids: Array, norm_by_std: bool = True,
                    epsilon: float = 1e-6) -> Array:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased (ddof=1).

    `norm_by_std=False` gives Dr. GRPO's A_i = R_i - mean_g R. A group of one has mean 0 and
    std 1 (so A = R / (1 + eps)), as in verl and SkyRL. A larger group whose rewards are all
    equal gets exactly 0 (SkyRL and verl divide the rounding residue of the mean by eps:
    up to 0.3 for shaped rewards)."""
    n, mean, std, uniform = _group_stats(rewards, group_ids)
    np_ = xp(mean)
    single = n == 1
    mean = np_.where(single, np_.float32(0), mean)
    centred = np_.where(uniform & ~single, np_.float32(0), rewards.astype(np_.float32) - mean)
    if not norm_by_std:
        return centred
    return centred / (np_.where(single, np_.float32(1), std) + np_.float32(epsilon))


def rloo_advantages(rewards: Array, group_ids: Array) -> Array:
    """RLOO: A_i = R_i - mean_{j != i} R_j = (R_i - mean_g R) * n / (n - 1); a group of one
    gets 0, and so does a group of equal rewards (exactly)."""
    n, mean, _, uniform = _group_stats(rewards, group_ids)
    np_ = xp(mean)
    one = np_.float32(1)
    return np_.where((n > 1) & ~uniform, (rewards.astype(np_.float32) - mean) * n /
                     np_.maximum(n - one, one), np_.float32(0))


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages, "rloo": rloo_advantages}


def token_advantages(advantages: Array, loss_mask: Array) -> Array:
    """Broadcasts per-response advantages [N] over response tokens: [N, T]."""
    return advantages[:, None] * loss_mask.astype(xp(loss_mask).float32)
