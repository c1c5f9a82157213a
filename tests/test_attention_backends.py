"""Every attention backend that runs on CPU against a float64 reference, forward and
gradients, on packed rows (several segments, padding) with grouped-query heads: our XLA
attention, tokamax's XLA references through the same per-query key ranges its GPU kernels
take, and splash attention's Pallas kernel in interpret mode (the TPU kernel, segment ids);
also under shard_map on 8 devices. The model gives the same hidden states whichever backend
computes its attention. The kernels' compiled programs for H100 and TPU are checked by
tests/test_compile.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.models import init_model, kernels, preset
from dapo_jax.models.kernels import fused_attention, resolve_attention_impl
from dapo_jax.models.qwen import attention
from dapo_jax.sharding import make_mesh
from dapo_jax.train.batch import build_rows, packed_layout

CPU_BACKENDS = ["xla", "tokamax_xla", "tokamax_xla_chunked"]  # what the model runs on CPU
KERNEL_BACKENDS = CPU_BACKENDS + ["splash"]  # splash: Pallas interpret mode
B, T, N, K, H = 2, 320, 4, 2, 16  # T > 256: our XLA path runs its causal query blocks


def packed_segments() -> np.ndarray:
    seg = np.zeros((B, T), np.int32)
    for row, bounds in enumerate([(0, 70, 200, 310), (0, 150, 320)]):
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), 1):
            seg[row, a:b] = k  # row 0 ends in 10 padding tokens
    return seg


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, n, H)) for n in (N, K, K))
    seg = packed_segments()
    mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & \
        (seg[:, None, :] > 0)
    weight = rng.normal(size=(B, T, N, H)) * (seg > 0)[..., None, None]  # real queries only
    return q, k, v, mask, weight


def run(impl: str, q, k, v, mask):
    if impl == "xla":
        return attention(q, (k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)), mask)
    return fused_attention(q, k, v, jnp.asarray(packed_segments()), impl,
                           interpret=impl == "splash")


def reference(q, k, v, mask):
    """Dense softmax attention, GQA by repeating kv heads."""
    k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None].any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def value_and_grads(fn, q, k, v, mask, weight):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weight)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_backend_matches_float64_reference(impl):
    q, k, v, mask, weight = inputs()
    with jax.enable_x64(True):
        ref_out = np.asarray(reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), mask))
        ref_loss, ref_grads = value_and_grads(
            reference, *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), mask, weight)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out = np.asarray(jax.jit(lambda *a: run(impl, *a, mask))(*f32))
    real = packed_segments() > 0
    np.testing.assert_allclose(out[real], ref_out[real], rtol=1e-5, atol=1e-5)
    loss, grads = value_and_grads(lambda *a: run(impl, *a), *f32, mask,
                                  jnp.asarray(weight, jnp.float32))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r, name in zip(grads, ref_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_rows_padded_for_the_mosaic_kernel_give_the_same_attention():
    """The Mosaic kernel gets rows padded to whole 128-token blocks (T = 320 -> 384, with
    padding tokens): the same padding around tokamax's XLA op matches the reference."""
    q, k, v, mask, weight = inputs()
    with jax.enable_x64(True):
        ref_loss, ref_grads = value_and_grads(
            reference, *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), mask, weight)
    seg = jnp.asarray(packed_segments())
    padded = lambda q, k, v, _: kernels._tokamax(q, k, v, seg, op="xla",
                                                 block=kernels.MOSAIC_BLOCK)
    loss, grads = value_and_grads(padded, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                  mask, jnp.asarray(weight, jnp.float32))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r, name in zip(grads, ref_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_model_hidden_states_agree_across_backends():
    cfg = preset("qwen3-tiny")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (5, 9, 3, 7)]
    responses = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (11, 4, 20, 8)]
    layout = packed_layout(np.array([len(p) for p in prompts]),
                           np.array([len(r) for r in responses]), 40)
    rows = build_rows(layout, prompts, responses)
    real = rows["segment_ids"] > 0
    out = {}
    for impl in CPU_BACKENDS:
        model = init_model(cfg, seed=0, attention_impl=impl)
        out[impl] = np.asarray(model.hidden_states(rows["input_ids"], rows["segment_ids"],
                                                   rows["positions"]))[real]
    for impl in CPU_BACKENDS[1:]:
        np.testing.assert_allclose(out[impl], out["xla"], rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("impl", ["tokamax_xla", "splash"])
def test_kernel_under_shard_map_matches_reference(impl):
    """On a 2x2x2 mesh (batch over data x fsdp, heads over tensor) each device runs the
    kernel on its own rows and heads; the result is the unsharded one."""
    q, k, v, mask, _ = inputs(seed=3)
    q, k, v = (np.concatenate([x] * 2) for x in (q, k, v))  # 4 rows: 1 per batch shard
    seg = jnp.asarray(np.concatenate([packed_segments()] * 2))
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    fn = lambda q, k, v: fused_attention(q, k, v, seg, impl, interpret=impl == "splash")
    expected = np.asarray(jax.jit(fn)(*f32))
    with jax.set_mesh(make_mesh((2, 2, 2))):
        hlo = jax.jit(fn).lower(*f32).as_text()
        out = np.asarray(jax.jit(fn)(*f32))
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(out[real], expected[real], rtol=1e-5, atol=1e-5)


class FakeGpu:
    """What `kernel_problem` reads of a GPU device."""
    platform = "gpu"

    def __init__(self, kind: str, cc: str):
        self.device_kind, self.compute_capability = kind, cc


H100, A100, B200 = (FakeGpu("NVIDIA H100 80GB HBM3", "9.0"), FakeGpu("NVIDIA A100-SXM4-80GB",
                                                                    "8.0"),
                    FakeGpu("NVIDIA B200", "10.0"))


def test_auto_follows_the_target_platform_and_unknown_is_an_error():
    """The resolver's decision per target. That the decided kernel is what runs is checked
    in the compiled programs: test_compile finds tokamax's Mosaic custom call in every H100
    program and splash's in every TPU one, and a kernel run on the global batch fails there."""
    assert resolve_attention_impl("auto") == "xla"  # no mesh: this CPU host
    assert resolve_attention_impl("auto", "tpu") == "splash"
    for gpu in (H100, B200):
        assert resolve_attention_impl("auto", "gpu", device=gpu, head_dim=128,
                                      dtype="bfloat16") == "tokamax_mosaic"
    assert resolve_attention_impl("tokamax_triton", "gpu", device=A100, head_dim=128,
                                  dtype="float32") == "tokamax_triton"  # as asked: it compiles
    assert resolve_attention_impl("tokamax_xla", "cpu") == "tokamax_xla"
    with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
        resolve_attention_impl("flash")


@pytest.mark.parametrize("device,head_dim,dtype,reason,fix", [
    (A100, 128, "bfloat16", "needs a Hopper (sm_90) or Blackwell (sm_100) GPU and NVIDIA "
     "A100-SXM4-80GB (sm_80) is not one", "use model.attention_impl=xla"),
    (H100, 128, "float32", "takes bfloat16 or float16 inputs and the model computes in float32",
     "set model.compute_dtype=bfloat16"),
    (H100, 512, "bfloat16", "heads of at most 256 (larger tiles outgrow shared memory) and the "
     "model's head_dim is 512", "use model.attention_impl=xla"),
])
def test_a_kernel_that_cannot_compile_is_xla_for_auto_and_an_error_when_asked_for(
        caplog, device, head_dim, dtype, reason, fix):
    """`auto` falls back to XLA with one warning line naming the reason (once per reason);
    the kernel asked for by name is a one-line KernelUnavailable naming reason and fix."""
    kernels._warned.clear()
    with caplog.at_level("WARNING", logger="dapo_jax.models.kernels"):
        for _ in range(2):
            assert resolve_attention_impl("auto", "gpu", device=device, head_dim=head_dim,
                                          dtype=dtype) == "xla"
    [record] = caplog.records
    assert reason in record.message and "attention runs in XLA" in record.message
    assert "\n" not in record.message
    with pytest.raises(kernels.KernelUnavailable) as e:
        resolve_attention_impl("tokamax_mosaic", "gpu", device=device, head_dim=head_dim,
                               dtype=dtype)
    assert str(e.value).startswith("model.attention_impl=tokamax_mosaic: ")
    assert reason in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)


def test_kernels_of_another_platform_are_errors():
    with pytest.raises(kernels.KernelUnavailable, match="tokamax_triton is an NVIDIA GPU kernel "
                       "and the target is tpu"):
        resolve_attention_impl("tokamax_triton", "tpu")
    with pytest.raises(kernels.KernelUnavailable, match="splash attention is a TPU kernel"):
        resolve_attention_impl("splash", "gpu", device=H100)


def test_attention_pairs_follow_each_implementations_blocks():
    """The (query, key) pairs each implementation computes per head and layer, from its
    blocking: our XLA attention's 256-query blocks against keys up to the block's end (up to
    2,048 tokens), then 1,024-query blocks against every key; the Mosaic kernel's 128 x 128
    tiles on or below the diagonal of the padded row."""
    assert kernels.attention_pairs("xla", 200) == 200 * 200
    assert kernels.attention_pairs("xla", 320) == 256 * 256 + 64 * 320
    assert kernels.attention_pairs("xla", 4096) == 4096 * 4096  # twice the causal half
    assert kernels.attention_pairs("tokamax_mosaic", 320) == 6 * 128 * 128  # 384 = 3 tiles
    assert kernels.attention_pairs("tokamax_mosaic", 10240) == 80 * 81 // 2 * 128 * 128
