"""One Flax NNX decoder for Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Shapes in names: B batch, T query length, S key length, D hidden, N query heads, K kv heads,
H head dim, F MLP hidden, V vocab, L layers. Every parameter carries logical axis names
(`axes` metadata) that `dapo_jax.sharding.LOGICAL_RULES` maps to the mesh.

Inputs are rows of token ids with `segment_ids` (k > 0 marks the row's k-th sequence, 0 is
padding): a token attends the earlier tokens of its own segment only, so several whole
sequences can be packed into one row. A 0/1 attention mask is the one-segment case (an RL
row: left-padded prompt, then the right-padded response). Positions restart in each segment;
without explicit positions they come from the mask (number of real tokens before a token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from dapo_jax.models.config import QwenConfig
from dapo_jax.models.kernels import check_attention_impl, fused_attention, resolve_attention_impl
from dapo_jax.models.ragged import SlotCache, decode_attention, pool_axes, pool_orders
from dapo_jax.sharding import ParamLayout, constrain, named_sharding, param_layout

# What a layer keeps for its backward pass, least recompute first (REMAT_ORDER): everything
# (none); every matmul's output, attention's too (dots_saveable); only the projections'
# outputs, the matmuls without batch dimensions, recomputing attention, norms and the
# activation (minimal: MaxText's `minimal`, checkpoint_dots_with_no_batch_dims); only the
# layer's input, the whole forward again (full). `model.remat=auto` picks the first that fits
# (dapo_jax.train.update.choose_remat).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
REMAT_ORDER = tuple(REMAT_POLICIES)

_init = nnx.initializers.normal(0.02)

# A layer's cache: k [B, K, H, S] and v [B, K, S, H], so that both attention contractions
# (over H for the scores, over S for the output) run over a non-minor axis and vectorise
# along the minor one (3.5x faster scores on CPU than k [B, K, S, H]).
KVLayer = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Precision:
    """dtype policy: `param_dtype` stores weights, `dtype` computes; logits are float32."""

    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("param_dtype", "dtype"):
            value = jnp.dtype(getattr(self, name))
            if value not in (jnp.float32, jnp.bfloat16):
                raise ValueError(f"{name} must be float32 or bfloat16, got {value}")
            object.__setattr__(self, name, value)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(_init(rngs.params(), shape, dtype), axes=axes)


def compute_weight(param: nnx.Param, dtype: Any) -> jax.Array:
    """The weight a decoder layer multiplies with: cast to the compute dtype, then gathered
    over the FSDP axis (its `embed` dim unsharded; tensor-parallel dims stay split). Stating
    the gather makes FSDP what XLA does: all-gather a layer's weights (in bf16 under mixed
    precision: half the bytes of the float32 master), keep activations sharded over the
    batch. Left to itself, on a data x fsdp mesh such as 2x4x1 XLA resharded activations to
    the weights' layout instead, by an "involuntary full rematerialization" (replicate, then
    split). The embedding and LM head are left to XLA: gathering [V, D] whole costs more
    than the vocab-blocked log-probs save."""
    axes = tuple("act_embed" if a == "embed" else a for a in param.get_metadata()["axes"])
    return constrain(param[...].astype(dtype), axes)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., C1..Ck] times w [C1..Ck, ...] over the k = `contract` shared dims, as one 2-D
    matmul of the flattened leading dims: the same dot on GPU and TPU, but XLA:CPU
    differentiates the [B, T, D] einsum 2-3x slower than the [B*T, D] product (measured on
    the main job's MLP shapes: 39 vs 16 ms forward + backward). Only unsharded `length` is
    merged into the batch dim, so the batch sharding carries over."""
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    k = math.prod(inner)
    out = x.reshape(-1, k) @ w.reshape(k, -1)
    return out.reshape(*lead, *w.shape[contract:])


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, axis: str, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position of each token = number of real tokens before it (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in HF's rotate-half layout, computed in float32."""
    head_dim = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles_BTH) + rotated * jnp.sin(angles_BTH)).astype(x_BTNH.dtype)


CAUSAL_BLOCK = 256  # up to CAUSAL_MAX_LEN: unrolled blocks that skip the masked triangle
CAUSAL_MAX_LEN = 2048
SEQUENTIAL_BLOCK = 1024  # longer: a loop over query blocks, memory flat in length


def attention(q_BTNH: jax.Array, new: KVLayer, mask_BTT: jax.Array,
              *, causal_max_len: int = CAUSAL_MAX_LEN) -> jax.Array:
    """Grouped-query softmax attention of T queries over the chunk's keys/values (`new`, in
    the `KVLayer` layout with T slots) under `mask_BTT`; the N query heads are K groups of
    G = N / K sharing one kv head. Scores and softmax in float32 (on CPU 5-10% faster per
    update than `jax.nn.dot_product_attention`, whose per-head vmaps transpose more). Decode
    steps attend a cache through `dapo_jax.models.ragged.decode_attention` instead.

    `mask_BTT` must be causal (token t attends at most tokens <= t), and long chunks are
    processed in query blocks, each under `jax.checkpoint`:
    - up to `causal_max_len` tokens, unrolled blocks of CAUSAL_BLOCK queries, each against
      the keys up to its own end: the fully masked blocks above the diagonal are not
      computed (update step on CPU at T = 512: 0.94x -> 1.02x of PyTorch's, which skips them
      too). XLA may run these blocks side by side, so this is not used for long chunks.
    - longer chunks, a `lax.map` over blocks of SEQUENTIAL_BLOCK queries against all keys:
      one block's scores, [B, N, block, T], live at a time instead of [B, N, T, T] (13 GB
      per layer for Qwen3-4B at T = 10240)."""
    B, T, N, H = q_BTNH.shape
    if T > CAUSAL_BLOCK:
        if T <= causal_max_len:
            return _causal_blocks(q_BTNH, new, mask_BTT)
        if T > SEQUENTIAL_BLOCK:
            return _sequential_blocks(q_BTNH, new, mask_BTT)
    K = new[0].shape[1]
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    neg = jnp.finfo(jnp.float32).min

    def scores(k_BKHS: jax.Array, mask: jax.Array) -> jax.Array:
        s = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS,
                       preferred_element_type=jnp.float32) * (H ** -0.5)
        return jnp.where(mask[:, None, None], s, neg)

    def values(p_BKGTS: jax.Array, v_BKSH: jax.Array) -> jax.Array:
        return jnp.einsum("BKGTS,BKSH->BKGTH", p_BKGTS.astype(v_BKSH.dtype), v_BKSH,
                          preferred_element_type=jnp.float32)

    out = values(jax.nn.softmax(scores(new[0], mask_BTT), axis=-1), new[1])
    return out.astype(q_BTNH.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _causal_blocks(q_BTNH: jax.Array, new: KVLayer, mask_BTT: jax.Array) -> jax.Array:
    """`attention` without a cache, CAUSAL_BLOCK queries at a time against keys [0, end)."""
    T = q_BTNH.shape[1]
    outs = []
    for start in range(0, T, CAUSAL_BLOCK):
        end = min(start + CAUSAL_BLOCK, T)
        outs.append(jax.checkpoint(attention)(
            q_BTNH[:, start:end], (new[0][..., :end], new[1][:, :, :end]),
            mask_BTT[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


def _sequential_blocks(q_BTNH: jax.Array, new: KVLayer, mask_BTT: jax.Array) -> jax.Array:
    """`attention` without a cache, a loop over SEQUENTIAL_BLOCK queries at a time (rows
    padded to whole blocks are fully masked, and dropped)."""
    B, T, N, H = q_BTNH.shape
    block = SEQUENTIAL_BLOCK
    nb = -(-T // block)
    pad = nb * block - T
    q = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask_BTT, ((0, 0), (0, pad), (0, 0)))
    q_nBbNH = q.reshape(B, nb, block, N, H).swapaxes(0, 1)
    mask_nBbT = mask.reshape(B, nb, block, T).swapaxes(0, 1)
    # causal_max_len=0: the block itself is not split again.
    one = jax.checkpoint(lambda qm: attention(qm[0], new, qm[1], causal_max_len=0))
    out_nBbNH = jax.lax.map(one, (q_nBbNH, mask_nBbT))
    return out_nBbNH.swapaxes(0, 1).reshape(B, nb * block, N, H)[:, :T]


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        d, n, k, h, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, (
            precision.param_dtype
        )
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), pd), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, h), pd), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, h), pd), axes=("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", pd)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", pd)
        self.cfg = cfg
        self.dtype = precision.dtype
        self.attention_impl = attention_impl

    def project_qkv(
        self, x_BTD: jax.Array, positions_BT: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,N,H], k and v [B,T,K,H] with bias, q/k norm and RoPE applied."""
        w = lambda p: compute_weight(p, self.dtype)
        q = dense(x_BTD, w(self.q_proj))
        k = dense(x_BTD, w(self.k_proj))
        v = dense(x_BTD, w(self.v_proj))
        if self.cfg.qkv_bias:
            q, k, v = q + w(self.q_bias), k + w(self.k_bias), v + w(self.v_bias)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BT, self.cfg.rope_theta)
        k = apply_rope(k, positions_BT, self.cfg.rope_theta)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def project_out(self, out_BTNH: jax.Array) -> jax.Array:
        out_BTD = dense(out_BTNH, compute_weight(self.o_proj, self.dtype), contract=2)
        return constrain(out_BTD, ("batch", "length", "act_embed"))

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTT: jax.Array,
                 segment_ids_BT: jax.Array, cache: SlotCache | None = None,
                 layer: jax.Array | None = None) -> tuple[jax.Array, KVLayer]:
        """Attends within x (`mask_BTT`, built from `segment_ids_BT`), or, given the
        engine's cache, one token per row over itself and its row's live cache columns of
        layer `layer` (`dapo_jax.models.ragged`). Returns the output and this chunk's
        k [B, K, H, T] and v [B, K, T, H] (the layouts `attention` reads) for the caller to
        store.
        Without a cache (training, prefill) a fused kernel may compute it from the segment
        ids instead (`dapo_jax.models.kernels`; `auto` is resolved for the platform traced
        for)."""
        q, k, v = self.project_qkv(x_BTD, positions_BT)
        new = (k.transpose(0, 2, 3, 1), v.swapaxes(1, 2))
        if cache is not None:
            out_BNH = decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, layer)
            return self.project_out(out_BNH[:, None]), new
        impl = resolve_attention_impl(self.attention_impl, head_dim=q.shape[-1], dtype=q.dtype)
        if impl != "xla":
            out_BTNH = fused_attention(q, k, v, segment_ids_BT, impl)
        else:
            out_BTNH = attention(q, new, mask_BTT)
        return self.project_out(out_BTNH), new


class MLP(nnx.Module):
    """SwiGLU: down(silu(x gate) * (x up))."""

    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, precision.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.dtype = precision.dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        w = lambda p: compute_weight(p, self.dtype)
        gate_BTF = dense(x_BTD, w(self.gate_proj))
        up_BTF = dense(x_BTD, w(self.up_proj))
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        out_BTD = dense(h_BTF, w(self.down_proj))
        return constrain(out_BTD, ("batch", "length", "act_embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        pd = precision.param_dtype
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.attn = Attention(cfg, precision, rngs, attention_impl)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.mlp = MLP(cfg, precision, rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTT: jax.Array,
                 segment_ids_BT: jax.Array, cache: SlotCache | None = None,
                 layer: jax.Array | None = None) -> tuple[jax.Array, KVLayer]:
        attn_BTD, kv = self.attn(self.input_norm(x_BTD), positions_BT, mask_BTT,
                                 segment_ids_BT, cache, layer)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.post_attn_norm(x_BTD)), kv


class Qwen(nnx.Module):
    """Qwen2/Qwen3 causal LM with layers stacked on a leading `layers` axis and scanned."""

    def __init__(
        self,
        cfg: QwenConfig,
        *,
        precision: Precision = Precision(),
        remat: str = "none",
        attention_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of {list(REMAT_POLICIES)}")
        check_attention_impl(attention_impl)  # resolved when traced, for the target
        pd = precision.param_dtype
        self.config = cfg
        self.precision = precision
        self.remat = remat
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, precision, rngs, attention_impl)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed_tokens(self, input_ids_BT: jax.Array) -> jax.Array:
        x = jnp.take(compute_weight(self.embed, self.precision.dtype), input_ids_BT, axis=0)
        return constrain(x, ("batch", "length", "act_embed"))

    def lm_head_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding's transpose when tied)."""
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.precision.dtype)

    def scan_layers(self, fn: Callable[..., Any], carry: Any, *xs: Any) -> Any:
        """lax.scan of `fn(layer, carry, *x) -> (carry, y)` over the stacked layers."""
        graphdef, state = nnx.split(self.layers)

        def body(carry: Any, inputs: Any) -> Any:
            layer_state, *x = inputs
            return fn(nnx.merge(graphdef, layer_state), carry, *x)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, carry, (state, *xs))

    def hidden_states(self, input_ids_BT: jax.Array, segment_ids_BT: jax.Array,
                      positions_BT: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype (see the module docstring
        for segments and positions)."""
        if positions_BT is None:
            positions_BT = positions_from_mask(segment_ids_BT > 0)
        return self.hidden_states_cached(input_ids_BT, positions_BT, segment_ids_BT)[0]

    def hidden_states_cached(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        cache: SlotCache | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Final-norm hidden states of T tokens and their keys/values, all layers' (k [L, B,
        K, H, T], v [L, B, K, T, H]) for the caller to store. A token attends the chunk's
        earlier tokens of its own segment (`segment_ids_BT`, 0 = padding, which is attended
        by nothing); given the engine's `SlotCache` (T = 1: a decode step), each row's token
        attends itself and its row's
        live cache columns instead (the cache is only read: the caller writes the new
        column once for all layers, not a cache copy through the layer scan)."""
        T = input_ids_BT.shape[1]
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
        seg = segment_ids_BT.astype(jnp.int32)
        mask_BTT = causal_TT[None] & (seg[:, :, None] == seg[:, None, :]) & \
            (seg[:, None, :] > 0)
        x_BTD = self.embed_tokens(input_ids_BT)

        def step(layer, x, index):
            return layer(x, positions_BT, mask_BTT, seg, cache, index)

        layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        x_BTD, new_kv = self.scan_layers(step, x_BTD, layers)
        return self.final_norm(x_BTD), new_kv

    def init_cache(self, batch: int, slots: int) -> SlotCache:
        """An empty `SlotCache` of `batch` rows and S = `slots` columns, in the compute
        dtype."""
        c, dtype = self.config, self.precision.dtype
        dims = dict(L=c.num_layers, B=batch, S=slots, K=c.num_kv_heads, H=c.head_dim)
        k, v = (constrain(jnp.zeros(tuple(dims[a] for a in o), dtype), pool_axes(o))
                for o in pool_orders())
        return SlotCache(k, v, jnp.zeros((batch,), jnp.int32))

    def __call__(self, input_ids_BT: jax.Array, segment_ids_BT: jax.Array,
                 positions_BT: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] in float32. Memory grows with B*T*V: the trainer uses
        `dapo_jax.models.logprobs.token_logprobs` on `hidden_states` instead."""
        h_BTD = self.hidden_states(input_ids_BT, segment_ids_BT, positions_BT)
        logits = jnp.einsum(
            "BTD,DV->BTV", h_BTD, self.lm_head_weight(), preferred_element_type=jnp.float32
        )
        return constrain(logits, ("batch", "length", "vocab"))


def logical_axes(path: tuple[Any, ...], var: nnx.Variable) -> tuple[str | None, ...]:
    """A parameter's logical axes: its metadata's, after the stacked layers' axis."""
    axes = tuple(var.get_metadata()["axes"])
    if getattr(path[0], "key", None) == "layers":
        axes = ("layers",) + axes
    return axes


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The state with each parameter replaced by its NamedSharding on `mesh`."""

    def to_sharding(path: tuple[Any, ...], var: nnx.Variable) -> nnx.Variable:
        return var.replace(named_sharding(mesh, logical_axes(path, var),
                                          var.get_value().shape))

    return jax.tree_util.tree_map_with_path(
        to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def abstract_params(cfg: QwenConfig, precision: Precision = Precision()) -> nnx.State:
    """The parameters of a `cfg` model as `jax.ShapeDtypeStruct`s: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: Qwen(cfg, precision=precision,
                                                  rngs=nnx.Rngs(0))))[1]


def parameter_layouts(state: nnx.State, mesh: Mesh | AbstractMesh) -> list[ParamLayout]:
    """Every parameter of `state` (concrete or abstract) as laid out on `mesh`
    (`sharding.ParamLayout`: spec, bytes per device, dimensions replicated against their
    rule), in path order."""
    out: list[ParamLayout] = []

    def add(path: tuple[Any, ...], var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        out.append(param_layout(name, logical_axes(path, var), value.shape, value.dtype, mesh))
        return var

    jax.tree_util.tree_map_with_path(add, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sorted(out, key=lambda p: p.path)


def init_model(
    cfg: QwenConfig,
    *,
    seed: int = 0,
    precision: Precision = Precision(),
    remat: str = "none",
    attention_impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen:
    """Randomly initialised model, created directly in its sharding when `mesh` is given."""
    create = lambda: Qwen(cfg, precision=precision, remat=remat, attention_impl=attention_impl,
                          rngs=nnx.Rngs(seed))
    if mesh is None:
        return create()
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
