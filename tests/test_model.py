"""The Flax Qwen model against transformers (float32), on 1 and 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax.models import load_pretrained
from dapo_jax.models.qwen import REMAT_ORDER
from dapo_jax.sharding import batch_sharding, make_mesh
from tests import hf_models

VARIANTS = list(hf_models.VARIANTS)


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


def _assert_close_on_real_tokens(ours, ref, mask, atol=1e-4):
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=atol, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_one_device(tiny_checkpoints, rl_batch, variant):
    ids, mask = rl_batch
    model = load_pretrained(tiny_checkpoints[variant], dtype="float32")
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (*ids.shape, 512) and logits.dtype == jnp.float32
    ref = hf_models.hf_logits(hf_models.load_hf(tiny_checkpoints[variant]), ids, mask)
    _assert_close_on_real_tokens(logits, ref, mask)


@pytest.mark.parametrize("variant", ["qwen3_tied", "qwen2_bias_untied"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (2, 4, 1)])
def test_logits_match_on_8_devices(tiny_checkpoints, rl_batch, variant, shape):
    ids, mask = rl_batch
    mesh = make_mesh(shape)
    model = load_pretrained(tiny_checkpoints[variant], dtype="float32", mesh=mesh)
    embed = model.embed[...]
    assert len(embed.sharding.device_set) == 8
    # FSDP shards the embedding dim; tensor parallel the vocab.
    assert embed.sharding.spec == jax.sharding.PartitionSpec(
        "tensor" if shape[2] > 1 else None, "fsdp")
    rows = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        logits = forward(model, jax.device_put(ids, rows),
                         jax.device_put(mask, rows))
    ref = hf_models.hf_logits(hf_models.load_hf(tiny_checkpoints[variant]), ids, mask)
    _assert_close_on_real_tokens(logits, ref, mask)
    single = forward(load_pretrained(tiny_checkpoints[variant]), jnp.asarray(ids),
                     jnp.asarray(mask))
    _assert_close_on_real_tokens(logits, np.asarray(single), mask, atol=2e-5)


def test_bfloat16_params_and_compute_stay_close(tiny_checkpoints, rl_batch):
    ids, mask = rl_batch
    path = tiny_checkpoints["qwen3_tied"]
    model = load_pretrained(path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    ref = hf_models.hf_logits(hf_models.load_hf(path), ids, mask)
    real = mask.astype(bool)
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-8 relative). Through two layers
    # of bf16 weights and activations (float32 accumulation) the logits stay within a few
    # u of their scale: 6 u x max|logit| (measured 1.7 u). Wherever float32's top two
    # logits are further apart than twice that, the bf16 model must pick the same token.
    bound = 6 * 2.0**-8 * np.abs(ref[real]).max()
    err = np.abs(np.asarray(logits) - ref)[real]
    assert err.max() <= bound, (err.max(), bound)
    top2 = np.sort(ref, -1)[..., -2:]
    clear = real & (top2[..., 1] - top2[..., 0] > 2 * bound)
    assert clear.sum() >= real.sum() / 3  # the check covers a good part of the tokens
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("remat", REMAT_ORDER[1:])
def test_remat_gives_same_loss_and_gradients(tiny_checkpoints, rl_batch, remat):
    """Every recompute policy (remat=auto picks among them) is the same function: loss and
    gradients equal `none`'s in float32."""
    ids, mask = (jnp.asarray(a) for a in rl_batch)
    path = tiny_checkpoints["qwen2_bias_untied"]

    def loss_and_grads(model):
        loss = lambda m: jnp.mean(m(ids, mask) ** 2)
        return nnx.value_and_grad(loss)(model)

    base_loss, base = nnx.jit(loss_and_grads)(load_pretrained(path))
    loss, other = nnx.jit(loss_and_grads)(load_pretrained(path, remat=remat))
    np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_left_padding_does_not_change_real_tokens(tiny_checkpoints):
    """Shifting a sequence right by padding leaves its logits unchanged (positions follow
    the mask)."""
    model = load_pretrained(tiny_checkpoints["qwen3_tied"])
    rng = np.random.default_rng(1)
    seq = rng.integers(1, 512, size=10).astype(np.int32)
    ids = np.zeros((2, 14), np.int32)
    mask = np.zeros((2, 14), np.int32)
    ids[0, :10], mask[0, :10] = seq, 1
    ids[1, 4:], mask[1, 4:] = seq, 1
    logits = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(logits[0, :10], logits[1, 4:], atol=1e-5)


def test_long_chunks_attend_one_query_block_at_a_time(monkeypatch):
    """XLA's memory analysis of forward+backward: beyond the causal-block length, query blocks
    run in a loop and hold [B, N, block, T] scores instead of [B, N, T, T] (the mesh
    experiment measures this at seq 10240)."""
    from dapo_jax.models import qwen

    B, T, N, K, H = 1, 2048, 4, 2, 16
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    k = jax.ShapeDtypeStruct((B, K, H, T), jnp.float32)
    v = jax.ShapeDtypeStruct((B, K, T, H), jnp.float32)
    mask = jax.ShapeDtypeStruct((B, T, T), jnp.bool_)

    def temp_bytes():
        loss = lambda q, k, v, m: jnp.sum(qwen.attention(q, (k, v), m, causal_max_len=0))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return fn.lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    monkeypatch.setattr(qwen, "CAUSAL_BLOCK", T)  # no blocking at all
    whole = temp_bytes()
    monkeypatch.setattr(qwen, "CAUSAL_BLOCK", 256)
    monkeypatch.setattr(qwen, "SEQUENTIAL_BLOCK", 256)
    blocked = temp_bytes()
    assert whole >= B * N * T * T * 4  # at least the float32 scores
    assert blocked * 4 <= whole, (blocked, whole)
