"""Per-token log-probs and entropy without materialising [B, T, V] float32 logits.

For hidden states h [B, T, D], output weight W [D, V], targets y [B, T], temperature tau:

    z_t        = h_t W / tau                                  (float32)
    logp_t     = z_t[y_t] - logsumexp(z_t)
    entropy_t  = -sum_v p_tv log p_tv,   p_t = softmax(z_t)

The vocabulary is processed in blocks of `Vc` columns (an online logsumexp in the forward
pass), and the backward pass is written by hand (`jax.custom_vjp`) so that it, too, walks
the vocabulary block by block and writes each block of dW exactly once:

    dz_tv = g_logp_t (1[v = y_t] - p_tv) - g_ent_t p_tv (log p_tv + entropy_t)
    dh    = sum_blocks dz W_blk^T / tau,     dW_blk = h^T dz_blk / tau

Live memory is a few [B, T, Vc] float32 blocks plus dh [B, T, D], never [B, T, V]; `Vc` is
chosen so a block holds about `block_elements` values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dapo_jax.sharding import batch_shards

_MIN_BLOCK = 128


def vocab_block(batch_tokens: int, vocab: int, block_elements: int) -> int:
    """Columns per block: about `block_elements / batch_tokens`, a multiple of 128."""
    vc = max(_MIN_BLOCK, (block_elements // max(batch_tokens, 1)) // _MIN_BLOCK * _MIN_BLOCK)
    return min(vc, vocab)


def _block(h_BTD, w_DV, j, vc, temperature):
    """Logits of vocab block j; the last block is shifted left to stay in range, and `fresh`
    marks the columns no earlier block has covered."""
    V = w_DV.shape[1]
    start = jnp.minimum(j * vc, V - vc)
    w_Dv = jax.lax.dynamic_slice_in_dim(w_DV, start, vc, axis=1)
    z_BTv = jnp.einsum("BTD,Dv->BTv", h_BTD, w_Dv, preferred_element_type=jnp.float32)
    cols_v = start + jnp.arange(vc)
    return z_BTv / temperature, w_Dv, cols_v, cols_v >= j * vc, start


def _forward(h_BTD, w_DV, y_BT, vc, temperature):
    B, T, _ = h_BTD.shape
    num_blocks = -(-w_DV.shape[1] // vc)

    def body(carry, j):
        m, s, t, target = carry  # running max, sum exp(z - m), sum exp(z - m) z, z[y]
        z, _, cols, fresh, _ = _block(h_BTD, w_DV, j, vc, temperature)
        z_fresh = jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z_fresh, axis=-1))
        e = jnp.exp(z_fresh - m_new[..., None])
        scale = jnp.exp(m - m_new)
        s = s * scale + jnp.sum(e, axis=-1)
        t = t * scale + jnp.sum(e * jnp.where(fresh, z, 0.0), axis=-1)
        hit = (cols == y_BT[..., None]) & fresh
        target = target + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, t, target), None

    zeros = jnp.zeros((B, T), jnp.float32)
    init = (jnp.full((B, T), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (m, s, t, target), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
    lse = m + jnp.log(s)
    return target - lse, lse - t / s, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs(h_BTD, w_DV, y_BT, vc, temperature):
    logp, entropy, _ = _forward(h_BTD, w_DV, y_BT, vc, temperature)
    return logp, entropy


def _logprobs_fwd(h_BTD, w_DV, y_BT, vc, temperature):
    logp, entropy, lse = _forward(h_BTD, w_DV, y_BT, vc, temperature)
    return (logp, entropy), (h_BTD, w_DV, y_BT, lse, entropy)


def _logprobs_bwd(vc, temperature, residuals, cotangents):
    h_BTD, w_DV, y_BT, lse, entropy = residuals
    g_logp, g_ent = cotangents
    num_blocks = -(-w_DV.shape[1] // vc)

    def body(carry, j):
        dh_BTD, dw_DV = carry
        z, w_Dv, cols, fresh, start = _block(h_BTD, w_DV, j, vc, temperature)
        logp_all = z - lse[..., None]
        p = jnp.exp(logp_all)
        onehot = (cols == y_BT[..., None]).astype(jnp.float32)
        dz = g_logp[..., None] * (onehot - p) - g_ent[..., None] * p * (
            logp_all + entropy[..., None])
        dz = (jnp.where(fresh, dz, 0.0) / temperature).astype(h_BTD.dtype)
        dh_BTD = dh_BTD + jnp.einsum("BTv,Dv->BTD", dz, w_Dv, preferred_element_type=jnp.float32)
        dw_Dv = jnp.einsum("BTD,BTv->Dv", h_BTD, dz, preferred_element_type=jnp.float32)
        # Columns already written by an earlier block get 0 here (dz masked), so adding is
        # exact and every column receives its gradient once.
        old = jax.lax.dynamic_slice_in_dim(dw_DV, start, vc, axis=1)
        dw_DV = jax.lax.dynamic_update_slice_in_dim(
            dw_DV, old + dw_Dv.astype(dw_DV.dtype), start, axis=1)
        return (dh_BTD, dw_DV), None

    init = (jnp.zeros(h_BTD.shape, jnp.float32), jnp.zeros_like(w_DV))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
    return dh.astype(h_BTD.dtype), dw, None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def token_logprobs(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    temperature: float = 1.0,
    block_elements: int = 2**24,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of `targets_BT` and entropy per position, both float32 [B, T].

    Differentiable in `h_BTD` and `w_DV` (both outputs). `temperature` divides the logits
    first: the distribution a sampler at that temperature draws from. `block_elements` bounds
    the size of one [B, T, Vc] logits block (default 16M values, 64 MiB in float32).
    """
    B, T, D = h_BTD.shape
    if w_DV.shape[0] != D:
        raise ValueError(f"hidden dim {D} does not match output weight {w_DV.shape}")
    if targets_BT.shape != (B, T):
        raise ValueError(f"targets shape {targets_BT.shape} does not match hidden {h_BTD.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # The block is sized for one device's rows: under a mesh the batch is split over the
    # `batch` axes (at the seed shape, 1,187 sequential 128-column blocks per micro-batch
    # when sized for the global batch instead of 198).
    vc = vocab_block(B * T // batch_shards(B), w_DV.shape[1], block_elements)
    return _logprobs(h_BTD, w_DV, targets_BT.astype(jnp.int32), vc, float(temperature))


def naive_token_logprobs(
    h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Reference: full [B, T, V] logits, log_softmax and gather (tests and benchmarks)."""
    z = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets_BT[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
