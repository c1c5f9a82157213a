"""Chunked log-probs/entropy equal the naive log_softmax gather, values and gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.models import load_pretrained, token_logprobs


def _numpy_reference(h, w, y, temperature):
    """float64: log_softmax gather and entropy from full logits."""
    z = (h.astype(np.float64) @ w.astype(np.float64)) / temperature
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    logp_all = z - lse[..., None]
    logp = np.take_along_axis(logp_all, y[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


# V=300 in blocks of 128 columns: three blocks, the last one overlapping the second.
@pytest.mark.parametrize("T,block_elements", [(32, 1), (37, 3 * 37 * 256), (16, 10**9)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive(T, block_elements, temperature):
    rng = np.random.default_rng(T)
    B, D, V = 3, 16, 300
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32) * 0.5
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    logp, ent = jax.jit(token_logprobs, static_argnames=("block_elements", "temperature"))(
        h, w, y, block_elements=block_elements, temperature=temperature)
    chex.assert_shape([logp, ent], (B, T))
    chex.assert_type([logp, ent], jnp.float32)
    ref_logp, ref_ent = _numpy_reference(h, w, y, temperature)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)


def test_gradients_match_naive():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 24, 16, 300
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    c = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)  # arbitrary per-token weights

    def objective(fn):
        def f(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(c * logp) + 0.3 * jnp.sum(c * ent)
        return f

    def naive(h, w):
        logits = h @ w
        logp_all = jax.nn.log_softmax(logits, -1)
        logp = jnp.take_along_axis(logp_all, y[..., None], -1)[..., 0]
        return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, -1)

    chunked = lambda h, w: token_logprobs(h, w, y, block_elements=1)  # 128-column blocks
    g_chunk = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(h, w)
    g_naive = jax.jit(jax.grad(objective(naive), argnums=(0, 1)))(h, w)
    for a, b in zip(g_chunk, g_naive, strict=True):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(g_chunk[1]).sum()) > 0


def test_model_logprobs_equal_log_softmax_of_logits(tiny_checkpoints, rl_batch):
    ids, mask = (jnp.asarray(a) for a in rl_batch)
    model = load_pretrained(tiny_checkpoints["qwen2_bias_untied"])
    targets = jnp.roll(ids, -1, axis=1)
    logp, _ = token_logprobs(model.hidden_states(ids, mask), model.lm_head_weight(), targets,
                             block_elements=1)
    ref = jnp.take_along_axis(jax.nn.log_softmax(model(ids, mask), -1), targets[..., None],
                              -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp)[np.asarray(mask) == 1],
                               np.asarray(ref)[np.asarray(mask) == 1], atol=1e-5)


def test_chunked_peak_memory_is_smaller():
    """XLA's own memory analysis of forward+backward: the chunked version's temporaries are a
    fraction of the naive version's (the benchmark measures this at vocab 151,936)."""
    B, T, D, V = 1, 1024, 64, 8192
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    y = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp_bytes(fn):
        loss = lambda h, w, y: jnp.sum(fn(h, w, y)[0])
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    from dapo_jax.models.logprobs import naive_token_logprobs
    naive = temp_bytes(naive_token_logprobs)
    chunked = temp_bytes(lambda h, w, y: token_logprobs(h, w, y, block_elements=T * 512))
    assert naive >= B * T * V * 4  # at least the full float32 logits
    assert chunked * 8 <= naive, (chunked, naive)


def test_bad_arguments():
    h = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(h, jnp.zeros((8, 10)), jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="hidden dim"):
        token_logprobs(h, jnp.zeros((7, 10)), jnp.zeros((1, 4), jnp.int32))


def test_vocab_block_is_sized_per_device():
    """Under an 8-device mesh the [B, T, Vc] block is sized for one device's B/8 rows: 16 x
    128 tokens, 8 ways, with a 2^18-value budget gives 1024 columns per block, not the
    global batch's 128."""
    from unittest import mock

    from dapo_jax.models import logprobs
    from dapo_jax.sharding import make_mesh

    blocks = []
    real = logprobs.vocab_block
    spy = lambda bt, v, be: blocks.append(real(bt, v, be)) or blocks[-1]
    h = jax.ShapeDtypeStruct((16, 128, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 4096), jnp.float32)
    y = jax.ShapeDtypeStruct((16, 128), jnp.int32)
    fn = lambda h, w, y: logprobs.token_logprobs(h, w, y, block_elements=2**18)
    with mock.patch.object(logprobs, "vocab_block", spy):
        jax.eval_shape(fn, h, w, y)
        with jax.set_mesh(make_mesh((1, -1, 1))):
            jax.eval_shape(fn, h, w, y)
    assert blocks == [128, 1024]
