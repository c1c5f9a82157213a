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
- `tokamax_mosaic` (Mosaic GPU, Hopper/Blackwell), `tokamax_triton` (Ampere or newer), and
  `tokamax_xla` / `tokamax_xla_chunked` (tokamax's XLA references, which run on CPU for the
  tests): tokamax's kernels with a causal mask and each query's first key (`k_start`, the
  start of its segment). tokamax's public `dot_product_attention` takes packing only as a
  dense mask, so these call its attention ops with its `Mask` directly (tokamax is pinned).
  tokamax's Mosaic TPU kernel rejects `k_start` ("mask.k_start is not supported") and would
  need the dense mask: on TPU, splash is the kernel.

`auto` decides from the platform of the mesh the function is traced under (the compile
target), not from the host: XLA attention on CPU, splash on TPU, tokamax's Mosaic kernel on
a Hopper or Blackwell GPU. It never picks a kernel that cannot compile for the target, the
dtype or the head size (`kernel_problem`, the rules measured by compiling tokamax 0.0.17 for
H100): such a case runs in XLA with a one-line warning naming the reason, and a kernel asked
for by name that cannot compile is a one-line `KernelUnavailable` before any compute. The
Triton kernel is used only when asked for (Pallas' Triton backend is deprecated).

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
# tokamax's SM90 Mosaic kernel works in query tiles of 2 x 64 rows and key blocks of 128
# (its heuristics without autotuning); 0.0.12 failed on other lengths and 0.0.17 still skips
# its own test of key lengths that are not a multiple of the key block: rows are padded.
MOSAIC_BLOCK = 128
# The largest head the Mosaic kernel compiles for on H100 (forward and backward; 512 needs
# 384 KiB of shared memory, the chip has 227 KiB). Qwen's heads are 64 or 128.
MOSAIC_MAX_HEAD_DIM = 256
_SIXTEEN_BIT = ("bfloat16", "float16")

log = logging.getLogger(__name__)


class KernelUnavailable(ValueError):
    """An attention kernel asked for by name that cannot compile for the target: the
    message is one line naming the reason and the fix."""


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
    return _platform_name(jax.default_backend() if mesh.empty else
                          mesh.abstract_device.platform)


def target_device(platform: str) -> Any:
    """A device of `platform` to read the chip from: JAX's default device (the compile tool
    sets it to the target's), else the first of the platform's; None if there is none."""
    from jax.extend import backend

    device = backend.get_default_device()
    if platform_of(device) == platform:
        return device
    try:
        return jax.devices(platform)[0]
    except RuntimeError:  # no backend of that platform here
        return None


def _platform_name(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def platform_of(device: Any) -> str:
    """'cpu', 'tpu' or 'gpu' for a device."""
    return _platform_name(device.platform)


def gpu_generation(device: Any) -> str:
    """'<device kind> (sm_XY)', or the kind alone when it has no compute capability."""
    cc = getattr(device, "compute_capability", None)
    return f"{device.device_kind} (sm_{str(cc).replace('.', '')})" if cc else device.device_kind


def kernel_problem(impl: str, platform: str, device: Any = None, head_dim: int | None = None,
                   dtype: Any = None) -> tuple[str, str]:
    """(why kernel `impl`, a name other than auto and xla, cannot compile for `platform`'s
    `device` with heads of `head_dim` in `dtype` (None: not checked), the fix); ("", "") if
    it can. The rules are what compiling tokamax 0.0.17 for H100 showed
    (tests/test_compile.py compiles the shapes the trainer and the engine use)."""
    other = "use model.attention_impl=auto or xla"
    if impl.startswith("tokamax") and not installed("tokamax"):
        return "tokamax is not installed", "pip install -e \".[kernels]\" (or .[gpu])"
    if impl in ("tokamax_xla", "tokamax_xla_chunked"):
        return "", ""  # tokamax's XLA references run anywhere
    if impl == "splash":
        return ("", "") if platform == "tpu" else \
            (f"splash attention is a TPU kernel and the target is {platform}", other)
    if platform != "gpu":
        return f"{impl} is an NVIDIA GPU kernel and the target is {platform}", other
    cc = getattr(device, "compute_capability", None) if device is not None else None
    cc = float(cc) if cc else None
    where = gpu_generation(device) if device is not None else "this GPU"
    if impl == "tokamax_mosaic":
        if cc is None or not 9.0 <= cc < 11.0:
            return (f"tokamax's Mosaic GPU kernel needs a Hopper (sm_90) or Blackwell (sm_100) "
                    f"GPU and {where} is not one", "use model.attention_impl=xla")
        if dtype is not None and jnp.dtype(dtype).name not in _SIXTEEN_BIT:
            return (f"tokamax's Mosaic GPU kernel takes bfloat16 or float16 inputs and the model "
                    f"computes in {jnp.dtype(dtype).name}",
                    "set model.compute_dtype=bfloat16, or model.attention_impl=xla")
        if head_dim is not None and head_dim > MOSAIC_MAX_HEAD_DIM:
            return (f"tokamax's Mosaic GPU kernel takes heads of at most {MOSAIC_MAX_HEAD_DIM} "
                    f"(larger tiles outgrow shared memory) and the model's head_dim is "
                    f"{head_dim}", "use model.attention_impl=xla")
    elif impl == "tokamax_triton" and (cc is None or cc < 8.0):
        return (f"tokamax's Triton kernel needs an Ampere (sm_80) or newer GPU and {where} is "
                "not one", "use model.attention_impl=xla")
    return "", ""


_warned: set[str] = set()


def resolve_attention_impl(impl: str, platform: str | None = None, *, device: Any = None,
                           head_dim: int | None = None, dtype: Any = None) -> str:
    """The implementation `impl` stands for on `platform` (default: `target_platform()`)
    and its `device` (default: `target_device`), for heads of `head_dim` in `dtype` (None:
    not checked). `auto` is xla on CPU, splash on TPU and tokamax's Mosaic kernel on a GPU;
    where that kernel cannot compile (`kernel_problem`) it is xla, with a one-line warning
    logged once per reason. A kernel named explicitly that cannot compile raises
    `KernelUnavailable` naming the reason and the fix."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if impl == "xla":
        return impl
    platform = platform or target_platform()
    kernel = {"tpu": "splash", "gpu": "tokamax_mosaic"}.get(platform, "xla") if \
        impl == "auto" else impl
    if kernel == "xla":
        return kernel
    if device is None:
        device = target_device(platform)
    reason, fix = kernel_problem(kernel, platform, device, head_dim, dtype)
    if not reason:
        return kernel
    if impl != "auto":
        raise KernelUnavailable(f"model.attention_impl={impl}: {reason}; {fix}")
    hint = "" if "attention_impl" in fix else f" ({fix.split(',')[0]} to use it)"
    message = f"model.attention_impl=auto: {reason}, so attention runs in XLA{hint}"
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
    return "xla"


def attention_pairs(impl: str, T: int) -> int:
    """(query, key) score pairs one head computes for a row of T tokens in one layer's
    forward pass, by how `impl` skips the causal triangle (without skipping across packed
    segments, which the kernels' per-query key starts add on top): our XLA attention up to
    `qwen.CAUSAL_MAX_LEN` tokens runs CAUSAL_BLOCK queries against the keys up to the
    block's end, beyond it SEQUENTIAL_BLOCK queries against all keys (the whole square);
    tokamax's Mosaic kernel runs tiles of MOSAIC_BLOCK x MOSAIC_BLOCK and skips those above
    the diagonal; splash likewise on its blocks. The causal minimum is T (T + 1) / 2."""
    from dapo_jax.models import qwen

    def triangle(block_q: int, block_k: int, n: int) -> int:
        return sum(min(-(-(min(q + block_q, n)) // block_k) * block_k, n) * min(block_q, n - q)
                   for q in range(0, n, block_q))

    if impl == "xla":
        if T <= qwen.CAUSAL_BLOCK:
            return T * T
        if T <= qwen.CAUSAL_MAX_LEN:
            return triangle(qwen.CAUSAL_BLOCK, 1, T)
        return -(-T // qwen.SEQUENTIAL_BLOCK) * qwen.SEQUENTIAL_BLOCK * T
    block = MOSAIC_BLOCK if impl == "tokamax_mosaic" else SPLASH_BLOCK
    padded = -(-T // block) * block
    return triangle(block, block, padded)


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


def _pad_rows(x_BT: jax.Array, pad: int) -> jax.Array:
    """`pad` padding tokens (zeros: segment 0) appended to each row of [B, T, ...]."""
    return jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2)) if pad else x_BT


def _tokamax(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
             segment_ids_BT: jax.Array, *, op: str, block: int = 1) -> jax.Array:
    """tokamax's kernel `op` with a causal mask and each query's first key (the start of its
    segment), on rows padded to whole `block`s with padding tokens (segment 0: they attend
    only each other and nothing attends them), cut back after."""
    api, base = _tokamax_attention()
    T = q_BTNH.shape[1]
    pad = -T % block
    q_BTNH, k_BTKH, v_BTKH, segment_ids_BT = (_pad_rows(x, pad) for x in (
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT))
    mask = base.Mask(k_start=_segment_starts(segment_ids_BT)[:, None, :], is_causal=True)
    out = api.IMPLEMENTATIONS[op](q_BTNH, k_BTKH, v_BTKH, mask=mask, bias=None,
                                  logits_scale=q_BTNH.shape[-1] ** -0.5, precision=None,
                                  logits_soft_cap=None, q_sharding=None)
    return out[:, :T]


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
    q_BKGTH = _pad_rows(q_BTNH * H ** -0.5, pad).reshape(B, Tp, K, G, H).transpose(
        0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = (_pad_rows(x, pad).transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
    seg_BT = _pad_rows(segment_ids_BT, pad)

    def row(q_KGTH, k_KTH, v_KTH, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTH, k_KTH, v_KTH)

    out_BKGTH = jax.vmap(row)(q_BKGTH, k_BKTH, v_BKTH, seg_BT)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]


def _kernel(impl: str, interpret: bool):
    if impl == "splash":
        return functools.partial(_splash, interpret=interpret)
    return functools.partial(_tokamax, op=_TOKAMAX_OPS[impl],
                             block=MOSAIC_BLOCK if impl == "tokamax_mosaic" else 1)


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
