"""Decode attention over live cache columns only: the generation engine's KV cache and the
attention of one new token per row against it.

The cache (`SlotCache`) holds `max_num_seqs` rows ("slots") of S columns for every layer. A
row's sequence is stored contiguously from column 0 (prompt, then generated tokens), so the
row's live keys are the columns [0, length) and its position of column c is c. A decode step
reads, per row, only the key blocks that hold live columns: rows are sorted by length and
taken ROW_GROUP at a time, and each group loops over KV_BLOCK-column blocks up to its
longest row (a `fori_loop` with a traced trip count: no shape depends on the lengths, so
nothing recompiles as rows grow). Reading cost is the sum over groups of
rows x longest row, close to the live KV itself, where attending every slot of every row
costs rows x S (at DAPO's length mix, where most rows are far shorter than the limit, 3-4x
more). The softmax is accumulated across blocks (flash-decoding's running max and sum).

Under a mesh the function runs per device under `jax.shard_map` (rows over the batch axes,
kv heads over `tensor` when they divide it): the sort and the gathers are device-local.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dapo_jax.sharding import logical_to_spec

KV_BLOCK = 128  # columns read per loop iteration; S is a multiple of it
ROW_GROUP = 16  # rows per group: larger groups waste more on unequal lengths, smaller loop more


class SlotCache(NamedTuple):
    """k and v [S, L, B, K, H]; `length` [B]: the columns [0, length) a row attends (0 for a
    slot not decoding). The column axis leads: that is the layout XLA:TPU gathers a block
    of columns of (layer, row) pairs in, so the decode loop keeps the pool as it is; with
    the columns inside (k [L, B, K, H, S] as the training attention lays it out, or
    [L, B, S, K, H]) it copied the whole pool into that layout in every decode step
    (checked in the compiled v5p-8 program: 2 x 37.6 GB a step at the 1.7B seed shape)."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


CACHE_AXES = ("length", "layers", "batch", "kv_heads", "head_dim")


def decode_attention(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array, cache: SlotCache,
                     layer: jax.Array) -> jax.Array:
    """Each row's query heads (N = K groups of G sharing a kv head) attend their own new key
    and value (`k_BKH`, `v_BKH`) and the row's cache columns [0, length) of layer `layer`,
    one softmax across both, in float32:
    out = (sum_c e^(s_c - m) v_c + e^(s_new - m) v_new) / (sum_c e^(s_c - m) + e^(s_new - m)),
    s = q.k / sqrt(H). Returns [B, N, H] in q's dtype."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _decode_attention(q_BNH, k_BKH, v_BKH, cache.k, cache.v, cache.length, layer)
    kv_spec = logical_to_spec(("batch", "kv_heads", "head_dim"), k_BKH.shape, mesh)
    # Query heads follow the kv heads' split, so a device's queries meet its own kv heads.
    q_spec = kv_spec
    k_spec = v_spec = logical_to_spec(CACHE_AXES, cache.k.shape, mesh)
    len_spec = jax.sharding.PartitionSpec(kv_spec[0])
    out = jax.shard_map(
        _decode_attention, mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, k_spec, v_spec, len_spec, jax.sharding.PartitionSpec()),
        out_specs=q_spec, check_vma=False,
    )(q_BNH, k_BKH, v_BKH, cache.k, cache.v, cache.length, layer)
    return out


def _decode_attention(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array,
                      k_SLBKH: jax.Array, v_SLBKH: jax.Array, length_B: jax.Array,
                      layer: jax.Array) -> jax.Array:
    B, N, H = q_BNH.shape
    K = k_BKH.shape[1]
    R = math.gcd(B, ROW_GROUP)
    scale = H ** -0.5
    q_BKGH = q_BNH.reshape(B, K, N // K, H)
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
            k_RCKH = _rows_block(k_SLBKH, rows_R, layer, start)
            v_RCKH = _rows_block(v_SLBKH, rows_R, layer, start)
            live_RC = start + jnp.arange(KV_BLOCK) < length_R[:, None]
            s = jnp.einsum("RKGH,RCKH->RKGC", q, k_RCKH.astype(jnp.float32)) * scale
            s = jnp.where(live_RC[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            carry_scale = jnp.exp(m - m_new)
            total = total * carry_scale + jnp.sum(p, axis=-1)
            acc = acc * carry_scale[..., None] + jnp.einsum(
                "RKGC,RCKH->RKGH", p, v_RCKH.astype(jnp.float32))
            return m_new, total, acc

        blocks = (jnp.max(length_R) + KV_BLOCK - 1) // KV_BLOCK
        m, total, acc = jax.lax.fori_loop(0, blocks, block, (m, total, acc))
        return acc / total[..., None]

    out_gRKGH = jax.lax.map(one_group, groups_gR)
    out_BKGH = jnp.zeros((B, K, N // K, H), jnp.float32).at[groups_gR.reshape(-1)].set(
        out_gRKGH.reshape(B, K, N // K, H))
    return out_BKGH.reshape(B, N, H).astype(q_BNH.dtype)


def _rows_block(cache: jax.Array, rows_R: jax.Array, layer: jax.Array, start: jax.Array
                ) -> jax.Array:
    """cache[start:start + KV_BLOCK, layer, rows_R]: [R, KV_BLOCK, K, H] (one slab per row:
    a gather of R blocks, not of whole rows)."""
    _, _, _, K, H = cache.shape

    def one(row: jax.Array) -> jax.Array:
        zero = jnp.int32(0)
        return jax.lax.dynamic_slice(cache, (start, layer, row, zero, zero),
                                     (KV_BLOCK, 1, 1, K, H))[:, 0, 0]

    return jax.vmap(one)(rows_R)
