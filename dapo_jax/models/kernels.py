"""Fused attention kernels for training and prefill, run on each device's own shard.

A kernel is a custom call, which XLA's SPMD partitioner does not split: inside a sharded
jit it would run on the all-gathered global batch on every device (compiled for 8x H100 at
the seed shape: 12.97 GB of collectives per update instead of 1.63 GB). So every kernel
here runs under `jax.shard_map` over the batch (`data` x `fsdp`) and head (`tensor`) axes,
with the specs from `dapo_jax.sharding.LOGICAL_RULES`, and packing reaches it as segment
ids or per-query key ranges, never as a dense [B, T, T] mask (100 MB per row at 10,240
tokens):

- `splash` (TPU): Pallas splash attention (`jax.experimental.pallas.ops.tpu`) with a causal
  mask and `SegmentIds`; grouped-query heads as one multi-query kernel per kv head.
- `tokamax_mosaic` (Mosaic GPU, H100/B200), `tokamax_triton` (any CUDA GPU), and
  `tokamax_xla` / `tokamax_xla_chunked` (tokamax's XLA references, which run on CPU for the
  tests): tokamax's kernels with a causal mask and each query's first key (`k_start`, the
  start of its segment). tokamax's public `dot_product_attention` takes packing only as a
  dense mask, so these call its attention ops with its `Mask` directly (tokamax is pinned).
  tokamax's Mosaic TPU kernel rejects `k_start` ("mask.k_start is not supported") and would
  need the dense mask: on TPU, splash is the kernel.

`auto` decides from the platform of the mesh the function is traced under (the compile
target), not from the host: XLA attention on CPU, splash on TPU, tokamax Mosaic on a GPU
that supports it and Triton on any other.

Padding (segment 0) queries get outputs that nothing reads: they attend other padding
tokens here and nothing in the XLA path, and real tokens never attend them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import jax
import jax.numpy as jnp

from dapo_jax.sharding import logical_to_spec

ATTENTION_IMPLS = ("auto", "xla", "splash", "tokamax_mosaic", "tokamax_triton", "tokamax_xla",
                   "tokamax_xla_chunked")
_TOKAMAX_OPS = {"tokamax_mosaic": "mosaic_gpu", "tokamax_triton": "triton",
                "tokamax_xla": "xla", "tokamax_xla_chunked": "xla_chunked"}
SPLASH_BLOCK = 128  # splash attention's sequence tiles: rows are padded to a multiple

log = logging.getLogger(__name__)


def installed(module: str) -> bool:
    """Whether `module` (dotted names too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_attention_impl(impl: str) -> None:
    """A known value, and tokamax installed when one of its kernels is asked for (checked
    without starting a JAX backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if impl.startswith("tokamax") and not installed("tokamax"):
        raise ImportError(f"attention_impl {impl!r} needs tokamax: pip install -e "
                          "\".[kernels]\"")


def target_platform() -> str:
    """'cpu', 'tpu' or 'gpu': the platform of the mesh in context (the compile target,
    whatever the host is), else of JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_attention_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` stands for on `platform` (default: `target_platform()`):
    `auto` is xla on CPU, splash on TPU and tokamax's GPU kernels (Mosaic, else Triton; see
    `fused_attention`) on GPU when tokamax is installed, else xla with a warning."""
    check_attention_impl(impl)
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        if installed("tokamax"):
            return "tokamax_mosaic"
        log.warning("attention_impl auto on GPU: tokamax is not installed (pip install -e "
                    "\".[kernels]\"), so attention runs in XLA without a fused kernel")
    return "xla"


def _segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """Index of the first token of each token's segment (run of equal ids), [B, T]."""
    T = segment_ids_BT.shape[1]
    first = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                             segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(first, jnp.arange(T, dtype=jnp.int32), 0), axis=1)


@functools.cache
def _tokamax_attention() -> tuple[Any, Any]:
    """tokamax's attention ops (api, base), imported once. tokamax reads its options from
    absl flags and, outside `absl.app.run` (tests, notebooks, the compile tool's library
    use), would parse sys.argv for them: the flags are marked parsed here, once, with their
    defaults, never while a function is being traced."""
    from absl import flags
    from tokamax._src.ops.attention import api, base

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return api, base


def _tokamax(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
             segment_ids_BT: jax.Array, *, op: str) -> jax.Array:
    api, base = _tokamax_attention()
    mask = base.Mask(k_start=_segment_starts(segment_ids_BT)[:, None, :], is_causal=True)
    ops = ("mosaic_gpu", "triton") if op == "mosaic_gpu" else (op,)
    for i, name in enumerate(ops):
        try:
            return api.IMPLEMENTATIONS[name](q_BTNH, k_BTKH, v_BTKH, mask=mask, bias=None,
                                             logits_scale=q_BTNH.shape[-1] ** -0.5,
                                             precision=None, logits_soft_cap=None,
                                             q_sharding=None)
        except NotImplementedError as e:
            if i == len(ops) - 1:
                raise
            log.warning("tokamax %s attention is not supported here (%s): using %s", name, e,
                        ops[i + 1])
    raise AssertionError("unreachable")


def _splash(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
            segment_ids_BT: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Splash attention: one multi-query kernel (G = N / K query heads over one kv head)
    per kv head and row, rows padded to whole SPLASH_BLOCK tiles with padding tokens."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    pad = -T % SPLASH_BLOCK
    Tp = T + pad
    block = max(b for b in (512, 256, SPLASH_BLOCK) if Tp % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([sm.CausalMask((Tp, Tp))] * G),
                                block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    padT = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q_BKGTH = padT(q_BTNH * H ** -0.5).reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = (padT(x).transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
    seg_BT = padT(segment_ids_BT)

    def row(q_KGTH, k_KTH, v_KTH, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTH, k_KTH, v_KTH)

    out_BKGTH = jax.vmap(row)(q_BKGTH, k_BKTH, v_BKTH, seg_BT)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]


def _kernel(impl: str, interpret: bool):
    if impl == "splash":
        return functools.partial(_splash, interpret=interpret)
    return functools.partial(_tokamax, op=_TOKAMAX_OPS[impl])


def fused_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                    segment_ids_BT: jax.Array, impl: str, *, interpret: bool = False
                    ) -> jax.Array:
    """Causal attention within segments (`segment_ids_BT`, as `dapo_jax.models.qwen`) through
    the kernel `impl` (a resolved name other than xla), per device under `jax.shard_map`
    when a mesh is in context. `interpret` runs splash's Pallas kernel in interpret mode
    (CPU tests)."""
    kernel = _kernel(impl, interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT).astype(q_BTNH.dtype)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q_BTNH.shape, mesh)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BTKH.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        # The kv heads do not divide over the tensor axis while the query heads do: a
        # device's query heads would not line up with the kv heads it holds.
        raise ValueError(f"{impl} attention needs the tensor axis ({mesh.shape['tensor']}) to "
                         f"divide both the query heads ({q_BTNH.shape[2]}) and the kv heads "
                         f"({k_BTKH.shape[2]}); use model.attention_impl=xla or another mesh")
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    out = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                        out_specs=q_spec, check_vma=False)(q_BTNH, k_BTKH, v_BTKH,
                                                            segment_ids_BT)
    return out.astype(q_BTNH.dtype)
