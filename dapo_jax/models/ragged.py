"""Decode attention over live cache columns only: the generation engine's KV cache and the
attention of one new token per row against it.

The cache (`SlotCache`) holds `max_num_seqs` rows ("slots") of S columns for every layer. A
row's sequence is stored contiguously from column 0 (prompt, then generated tokens), so the
row's live keys are the columns [0, length) and its position of column c is c. A decode step
reads, per row, only the key blocks that hold live columns, with a trip count traced from
the lengths (no shape depends on them, so nothing recompiles as rows grow): on a GPU and a
TPU a Pallas kernel per row reads KV_BLOCK-column blocks up to the row's own length
(`decode_kernel`); elsewhere XLA's loop takes rows sorted by length ROW_GROUP at a time, up
to each group's longest row, which costs the sum over groups of rows x longest row, close to
the live KV itself. Attending every slot of every row costs rows x S (at DAPO's length mix,
where most rows are far shorter than the limit, 3-4x more). The softmax is accumulated
across blocks (flash-decoding's running max and sum).

Under a mesh the function runs per device under `jax.shard_map` (rows over the batch axes,
kv heads over `tensor` when they divide it): the sort and the gathers are device-local.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dapo_jax.models.kernels import target_platform
from dapo_jax.sharding import logical_to_spec

KV_BLOCK = 128  # columns read per loop iteration; S is a multiple of it
ROW_GROUP = 16  # rows per group: larger groups waste more on unequal lengths, smaller loop more


class SlotCache(NamedTuple):
    """The K and V pools, each holding L layers x B rows x S columns x K kv heads x H
    head_dim in the platform's dimension order (`pool_orders`); `length` [B]: the columns
    [0, length) a row attends (0 for a slot not decoding)."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


# The pools' dimension orders, per platform traced for (letters: L layers, B rows, S
# columns, K kv heads, H head_dim). Each platform's decode kernel fixes the pool's layout,
# and the order is the one in which XLA's own writes (the prefill's, the column of each
# decode step) keep it in place: found in the compiled programs (`loop_copy_bytes`). On a
# TPU, L B S K H: in L B K S H the Mosaic kernel's [columns, head_dim] tiles met the column
# write's scatter, which XLA:TPU lays out with (K, H) minor, and the whole pool was
# re-laid out in every decode step (2 x 37.6 GB per device at the 1.7B v5p seed shape); the
# kernel copies a (layer, row)'s [128, K, H] blocks and reads each kv head's [128, H] with
# a strided load. On a GPU, B S L K H, as XLA:GPU's scatter of the prefill writes it: in
# L B K S H the first fill was followed by a transpose of both whole pools (2 x 37.6 GB
# of temporaries). On the CPU (XLA's block loop) a (layer, row) block is contiguous in
# L B K H S / L B K S H: an S-major order made the engine 3.3x slower here.
POOL_ORDERS = {"tpu": ("LBSKH", "LBSKH"), "gpu": ("BSLKH", "BSLKH")}
DEFAULT_POOL_ORDERS = ("LBKHS", "LBKSH")
_AXES = {"L": "layers", "B": "batch", "S": "length", "K": "kv_heads", "H": "head_dim"}
CANONICAL = "LBSKH"  # the order the engine hands values in


def pool_orders() -> tuple[str, str]:
    """The K and V pools' orders for the platform traced for (`kernels.target_platform`)."""
    return POOL_ORDERS.get(target_platform(), DEFAULT_POOL_ORDERS)


def decode_kernel() -> str:
    """How a decode step attends, for the platform traced for: a Pallas kernel reading each
    row's live blocks in place on a GPU ("pallas_gpu": Triton, `_decode_attention_pallas`)
    and a TPU ("pallas_tpu": Mosaic, `_decode_attention_tpu`), "xla" elsewhere
    (`_decode_attention`'s block loop). The tests trace the kernels in Pallas's interpreters
    ("pallas_gpu_interpret", "pallas_tpu_interpret")."""
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(target_platform(), "xla")


def pool_axes(order: str) -> tuple[str, ...]:
    """Logical axis names (`dapo_jax.sharding`) of a pool in `order`."""
    return tuple(_AXES[a] for a in order)


def arrange(x: jax.Array, order: str, source: str = CANONICAL) -> jax.Array:
    """`x`, whose dimensions are `source`'s letters, transposed to `order`'s."""
    return x.transpose([source.index(a) for a in order])


def write_prefix(pool: jax.Array, order: str, rows_R: jax.Array, x_LRTKH: jax.Array, *,
                 aligned: bool = False) -> jax.Array:
    """`pool` with rows `rows_R` (an index >= B: dropped) holding x at columns [0, T).

    `aligned`: R = B and row r goes to slot r (or is dropped), as in the first fill of an
    empty pool. Then x is written in place, row for row, with no scatter: a scatter by slot
    index is partitioned by gathering every row's keys and values onto every device (2 x 28
    GB per device for the first fill at the 1.7B seed shape)."""
    x = arrange(x_LRTKH, order).astype(pool.dtype)
    if aligned:
        index = tuple(slice(0, x_LRTKH.shape[2]) if a == "S" else slice(None) for a in order)
        shape = [1] * len(order)
        shape[order.index("B")] = -1
        keep = (rows_R < pool.shape[order.index("B")]).reshape(shape)
        return pool.at[index].set(jnp.where(keep, x, pool[index]))
    index = tuple(rows_R if a == "B" else slice(0, x_LRTKH.shape[2]) if a == "S" else
                  slice(None) for a in order)
    return pool.at[index].set(x, mode="drop")


def write_column(pool: jax.Array, order: str, rows_B: jax.Array, col_B: jax.Array,
                 x_LBKH: jax.Array) -> jax.Array:
    """`pool` with x[:, b] at (row rows_B[b], column col_B[b]) (a column >= S: dropped)."""
    index = tuple(rows_B if a == "B" else col_B if a == "S" else slice(None) for a in order)
    # NumPy's rule: the two indexed axes become one, in place when adjacent, else first.
    rest = order.replace("S", "")
    if abs(order.index("B") - order.index("S")) != 1:
        rest = "B" + rest.replace("B", "")
    return pool.at[index].set(arrange(x_LBKH, rest, "LBKH").astype(pool.dtype), mode="drop")


def decode_attention(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array, cache: SlotCache,
                     layer: jax.Array) -> jax.Array:
    """Each row's query heads (N = K groups of G sharing a kv head) attend their own new key
    and value (`k_BKH`, `v_BKH`) and the row's cache columns [0, length) of layer `layer`,
    one softmax across both, in float32:
    out = (sum_c e^(s_c - m) v_c + e^(s_new - m) v_new) / (sum_c e^(s_c - m) + e^(s_new - m)),
    s = q.k / sqrt(H). Returns [B, N, H] in q's dtype."""
    mesh = jax.sharding.get_abstract_mesh()
    orders = pool_orders()
    kernel = decode_kernel()
    interpret = kernel.endswith("_interpret")
    attend = {"xla": _decode_attention,
              "pallas_gpu": functools.partial(_decode_attention_pallas, interpret=interpret),
              "pallas_tpu": functools.partial(_decode_attention_tpu, interpret=interpret),
              }[kernel.removesuffix("_interpret")]
    if mesh.empty or mesh.size == 1:
        return attend(q_BNH, k_BKH, v_BKH, cache.k, cache.v, cache.length, layer, orders)
    kv_spec = logical_to_spec(("batch", "kv_heads", "head_dim"), k_BKH.shape, mesh)
    # Query heads follow the kv heads' split, so a device's queries meet its own kv heads.
    q_spec = kv_spec
    k_spec, v_spec = (logical_to_spec(pool_axes(o), c.shape, mesh)
                      for o, c in zip(orders, (cache.k, cache.v), strict=True))
    len_spec = jax.sharding.PartitionSpec(kv_spec[0])
    out = jax.shard_map(
        functools.partial(attend, orders=orders), mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, k_spec, v_spec, len_spec, jax.sharding.PartitionSpec()),
        out_specs=q_spec, check_vma=False,
    )(q_BNH, k_BKH, v_BKH, cache.k, cache.v, cache.length, layer)
    return out


def _decode_attention(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array,
                      k_pool: jax.Array, v_pool: jax.Array, length_B: jax.Array,
                      layer: jax.Array, orders: tuple[str, str]) -> jax.Array:
    B, N, H = q_BNH.shape
    K = k_BKH.shape[1]
    R = math.gcd(B, ROW_GROUP)
    scale = H ** -0.5
    q_BKGH = q_BNH.reshape(B, K, N // K, H)
    # A block's dimensions: the pool's order without layer and row, S (C) its columns.
    k_block, v_block = (o.replace("L", "").replace("B", "").replace("S", "C") for o in orders)
    # Rows of similar length share a group, so a group's loop stops near each row's end.
    groups_gR = jnp.argsort(length_B).reshape(B // R, R).astype(jnp.int32)

    def one_group(rows_R: jax.Array) -> jax.Array:
        q = q_BKGH[rows_R].astype(jnp.float32)
        # The new token attends itself: the running max and sum start there (and stay finite).
        m = jnp.einsum("RKGH,RKH->RKG", q, k_BKH[rows_R].astype(jnp.float32)) * scale
        total = jnp.ones_like(m)
        acc = jnp.broadcast_to(v_BKH[rows_R].astype(jnp.float32)[:, :, None], q.shape)
        length_R = length_B[rows_R]

        def block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, total, acc = carry
            start = j * KV_BLOCK
            k_blk = _rows_block(k_pool, orders[0], rows_R, layer, start)
            v_blk = _rows_block(v_pool, orders[1], rows_R, layer, start)
            live_RC = start + jnp.arange(KV_BLOCK) < length_R[:, None]
            s = jnp.einsum(f"RKGH,R{k_block}->RKGC", q, k_blk.astype(jnp.float32)) * scale
            s = jnp.where(live_RC[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            carry_scale = jnp.exp(m - m_new)
            total = total * carry_scale + jnp.sum(p, axis=-1)
            acc = acc * carry_scale[..., None] + jnp.einsum(
                f"RKGC,R{v_block}->RKGH", p, v_blk.astype(jnp.float32))
            return m_new, total, acc

        blocks = (jnp.max(length_R) + KV_BLOCK - 1) // KV_BLOCK
        m, total, acc = jax.lax.fori_loop(0, blocks, block, (m, total, acc))
        return acc / total[..., None]

    out_gRKGH = jax.lax.map(one_group, groups_gR)
    out_BKGH = jnp.zeros((B, K, N // K, H), jnp.float32).at[groups_gR.reshape(-1)].set(
        out_gRKGH.reshape(B, K, N // K, H))
    return out_BKGH.reshape(B, N, H).astype(q_BNH.dtype)


def _decode_attention_pallas(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array,
                             k_pool: jax.Array, v_pool: jax.Array, length_B: jax.Array,
                             layer: jax.Array, orders: tuple[str, str], *,
                             interpret: bool = False) -> jax.Array:
    """`_decode_attention` as one Pallas (Triton) kernel: a program per (row, kv head) reads
    the pools in place (no slice of a layer is copied out) in KV_BLOCK-column tiles up to
    the row's own length, with the same running max and sum. The G query heads of a kv head
    are padded to a power of two (Triton's tiles). `interpret`: Pallas's interpreter (any
    platform; the tests' check of the kernel on CPU)."""
    from jax.experimental import pallas as pl

    if any(o.index("S") > o.index("H") for o in orders):
        raise ValueError(f"the Pallas decode kernel reads [columns, head_dim] tiles: S before "
                         f"H in the pools' orders, not {orders}")
    B, N, H = q_BNH.shape
    K = k_BKH.shape[1]
    G = N // K
    Gp = 1 << (G - 1).bit_length()
    q_BKGH = q_BNH.reshape(B, K, G, H)
    if Gp != G:
        q_BKGH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_decode_kernel, scale=H ** -0.5, orders=orders),
        grid=(B, K),
        in_specs=[pl.no_block_spec, pl.no_block_spec,  # layer, lengths: read as scalars
                  pl.BlockSpec((None, None, Gp, H), lambda b, k: (b, k, 0, 0)),
                  pl.BlockSpec((None, None, H), lambda b, k: (b, k, 0)),
                  pl.BlockSpec((None, None, H), lambda b, k: (b, k, 0)),
                  pl.no_block_spec, pl.no_block_spec],  # the pools: read in place, in tiles
        out_specs=pl.BlockSpec((None, None, Gp, H), lambda b, k: (b, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Gp, H), q_BNH.dtype),
        interpret=interpret, name="decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), length_B.astype(jnp.int32), q_BKGH,
      k_BKH, v_BKH, k_pool, v_pool)
    return out[:, :, :G].reshape(B, N, H)


def _decode_kernel(layer_ref, length_ref, q_ref, kn_ref, vn_ref, kp_ref, vp_ref, o_ref, *,
                   scale: float, orders: tuple[str, str]) -> None:
    """One (row, kv head): its G queries against its new key and its live pool columns."""
    from jax.experimental import pallas as pl

    b, kv = pl.program_id(0), pl.program_id(1)
    layer, length = layer_ref[0], length_ref[b]
    q = q_ref[...].astype(jnp.float32) * scale  # [G, H]
    m = jnp.sum(q * kn_ref[...].astype(jnp.float32)[None, :], axis=-1)  # [G]: the new token
    total = jnp.ones_like(m)
    acc = jnp.broadcast_to(vn_ref[...].astype(jnp.float32)[None, :], q.shape)

    def block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        m, total, acc = carry
        at = {"L": layer, "B": b, "K": kv, "S": pl.ds(j * KV_BLOCK, KV_BLOCK),
              "H": slice(None)}
        k = kp_ref[tuple(at[a] for a in orders[0])].astype(jnp.float32)  # [C, H]
        v = vp_ref[tuple(at[a] for a in orders[1])].astype(jnp.float32)
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, C]
        live = j * KV_BLOCK + jnp.arange(KV_BLOCK) < length
        s = jnp.where(live[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[:, None])
        carry_scale = jnp.exp(m - m_new)
        total = total * carry_scale + jnp.sum(p, axis=-1)
        acc = acc * carry_scale[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, total, acc

    m, total, acc = jax.lax.fori_loop(0, pl.cdiv(length, KV_BLOCK), block, (m, total, acc))
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


def _decode_attention_tpu(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array,
                          k_pool: jax.Array, v_pool: jax.Array, length_B: jax.Array,
                          layer: jax.Array, orders: tuple[str, str], *,
                          interpret: bool = False) -> jax.Array:
    """`_decode_attention` as one Pallas (Mosaic TPU) kernel: a program per row copies its
    live [KV_BLOCK, K, H] blocks of the layer from HBM into VMEM (two buffers: block j + 1
    is in flight while block j is used), up to the row's own length, and runs the same
    online softmax per kv head on the MXU. The layer and the lengths are prefetched scalars.
    `interpret`: Pallas's TPU interpreter (the tests' check of the kernel on CPU)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    if orders != ("LBSKH", "LBSKH"):
        raise ValueError(f"the TPU decode kernel copies [columns, K, head_dim] blocks: pools "
                         f"in L B S K H order, not {orders}")
    B, N, H = q_BNH.shape
    K = k_BKH.shape[1]
    G = N // K
    row = lambda b, *_: (b, 0, 0, 0)
    out = pl.pallas_call(
        functools.partial(_decode_kernel_tpu, scale=H ** -0.5),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B,),
            in_specs=[pl.BlockSpec((None, K, G, H), row),
                      pl.BlockSpec((None, K, H), lambda b, *_: (b, 0, 0)),
                      pl.BlockSpec((None, K, H), lambda b, *_: (b, 0, 0)),
                      pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((None, K, G, H), row),
            scratch_shapes=[pltpu.VMEM((2, KV_BLOCK, K, H), k_pool.dtype),
                            pltpu.VMEM((2, KV_BLOCK, K, H), v_pool.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))]),
        out_shape=jax.ShapeDtypeStruct((B, K, G, H), q_BNH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False, name="decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), length_B.astype(jnp.int32),
      q_BNH.reshape(B, K, G, H), k_BKH, v_BKH, k_pool, v_pool)
    return out.reshape(B, N, H)


def _decode_kernel_tpu(layer_ref, length_ref, q_ref, kn_ref, vn_ref, kp_hbm, vp_hbm, o_ref,
                       k_buf, v_buf, sem, *, scale: float) -> None:
    """One row: its N = K x G queries against its new keys and its live pool columns."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    b = pl.program_id(0)
    layer, length = layer_ref[0], length_ref[b]
    K, G, _ = q_ref.shape
    blocks = pl.cdiv(length, KV_BLOCK)

    def copies(j: jax.Array, slot: jax.Array) -> tuple[Any, Any]:
        cols = pl.ds(pl.multiple_of(j * KV_BLOCK, KV_BLOCK), KV_BLOCK)
        return (pltpu.make_async_copy(kp_hbm.at[layer, b, cols], k_buf.at[slot],
                                      sem.at[0, slot]),
                pltpu.make_async_copy(vp_hbm.at[layer, b, cols], v_buf.at[slot],
                                      sem.at[1, slot]))

    @pl.when(blocks > 0)
    def _first() -> None:
        for c in copies(jnp.int32(0), jnp.int32(0)):
            c.start()

    # Per kv head: the new token attends itself, so the running max and sum start there.
    q = [q_ref[h].astype(jnp.float32) * scale for h in range(K)]  # [G, H] each
    m = [jnp.sum(q[h] * kn_ref[pl.ds(h, 1), :].astype(jnp.float32), axis=-1, keepdims=True)
         for h in range(K)]  # [G, 1]
    total = [jnp.ones_like(m[h]) for h in range(K)]
    acc = [jnp.broadcast_to(vn_ref[pl.ds(h, 1), :].astype(jnp.float32), q[h].shape)
           for h in range(K)]

    def block(j: jax.Array, carry: tuple[list[jax.Array], ...]) -> tuple[list[jax.Array], ...]:
        m, total, acc = carry
        slot = j % 2

        @pl.when(j + 1 < blocks)
        def _next() -> None:
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        live = j * KV_BLOCK + jax.lax.broadcasted_iota(jnp.int32, (G, KV_BLOCK), 1) < length
        m_out, total_out, acc_out = [], [], []
        for h in range(K):
            k = k_buf[slot, :, h, :].astype(jnp.float32)  # [C, H]
            v = v_buf[slot, :, h, :].astype(jnp.float32)
            s = jax.lax.dot_general(q[h], k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)  # [G, C]
            s = jnp.where(live, s, -jnp.inf)
            m_new = jnp.maximum(m[h], jnp.max(s, axis=-1, keepdims=True))
            p = jnp.exp(s - m_new)
            carry_scale = jnp.exp(m[h] - m_new)
            m_out.append(m_new)
            total_out.append(total[h] * carry_scale + jnp.sum(p, axis=-1, keepdims=True))
            acc_out.append(acc[h] * carry_scale + jnp.dot(
                p, v, preferred_element_type=jnp.float32))
        return m_out, total_out, acc_out

    m, total, acc = jax.lax.fori_loop(0, blocks, block, (m, total, acc))
    for h in range(K):
        o_ref[h] = (acc[h] / total[h]).astype(o_ref.dtype)


def _rows_block(pool: jax.Array, order: str, rows_R: jax.Array, layer: jax.Array,
                start: jax.Array) -> jax.Array:
    """pool[layer, rows_R, start:start + KV_BLOCK] in the pool's order without L and B
    (one slab per row: a gather of R blocks, not of whole rows)."""
    dims = dict(zip(order, pool.shape, strict=True))
    sizes = tuple(1 if a in "LB" else KV_BLOCK if a == "S" else dims[a] for a in order)
    squeeze = tuple(i for i, a in enumerate(order) if a in "LB")

    def one(row: jax.Array) -> jax.Array:
        at = {"L": layer, "B": row, "S": start}
        starts = tuple(at.get(a, jnp.int32(0)) for a in order)
        return jax.lax.dynamic_slice(pool, starts, sizes).squeeze(squeeze)

    return jax.vmap(one)(rows_R)
