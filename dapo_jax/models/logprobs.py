"""Per-token log-probs and entropy without materialising [B, T, V] float32 logits.

For hidden states h [B, T, D], output weight W [D, V] and targets y [B, T]:

    z_t        = h_t W                               (float32)
    logp_t     = z_t[y_t] - logsumexp(z_t)
    entropy_t  = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v

The sequence is processed in chunks of `chunk_size` positions inside a `lax.scan` whose body
is rematerialised, so forward and backward keep only [B, chunk, V] logits alive at a time:
peak memory grows with B x chunk x V, not B x T x V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(
    h_BCD: jax.Array, w_DV: jax.Array, targets_BC: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD, w_DV, preferred_element_type=jnp.float32)
    logits_BCV = logits_BCV / temperature
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    entropy_BC = lse_BC - jnp.sum(probs_BCV * logits_BCV, axis=-1)
    return target_BC - lse_BC, entropy_BC


def token_logprobs(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of `targets_BT` and entropy per position, both float32 [B, T].

    Differentiable in `h_BTD` and `w_DV`. `temperature` divides the logits first (the
    distribution a sampler at that temperature draws from). T need not divide `chunk_size`:
    the tail is padded and dropped.
    """
    B, T, D = h_BTD.shape
    if w_DV.shape[0] != D:
        raise ValueError(f"hidden dim {D} does not match output weight {w_DV.shape}")
    if targets_BT.shape != (B, T):
        raise ValueError(f"targets shape {targets_BT.shape} does not match hidden {h_BTD.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = min(chunk_size, T)
    num_chunks = -(-T // chunk)
    pad = num_chunks * chunk - T
    h = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    # [n, B, C, ...]: scan over chunks.
    h_nBCD = h.reshape(B, num_chunks, chunk, D).swapaxes(0, 1)
    y_nBC = y.reshape(B, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def body(_, xs):
        h_BCD, y_BC = xs
        return None, _chunk_stats(h_BCD, w_DV, y_BC, temperature)

    _, (logp_nBC, ent_nBC) = jax.lax.scan(body, None, (h_nBCD, y_nBC))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(B, num_chunks * chunk)[:, :T]
    return unchunk(logp_nBC), unchunk(ent_nBC)


def naive_token_logprobs(
    h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Reference: full [B, T, V] logits, log_softmax and gather (tests and benchmarks)."""
    return _chunk_stats(h_BTD, w_DV, targets_BT, temperature)
