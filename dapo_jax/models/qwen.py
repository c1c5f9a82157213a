"""One Flax NNX decoder for Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Shapes in names: B batch, T query length, S key length, D hidden, N query heads, K kv heads,
H head dim, F MLP hidden, V vocab, L layers. Every parameter carries logical axis names
(`axes` metadata) that `dapo_jax.sharding.LOGICAL_RULES` maps to the mesh.

Inputs are RL batches: left-padded prompts followed by right-padded responses, so positions
come from the attention mask (position of a token = number of real tokens before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dapo_jax.models.config import QwenConfig
from dapo_jax.sharding import constrain, named_sharding

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

_init = nnx.initializers.normal(0.02)

KVLayer = tuple[jax.Array, jax.Array]  # one layer's (k, v) cache, each [B, K, S, H]
KVCache = tuple[jax.Array, jax.Array]  # all layers' (k, v), each [L, B, K, S, H]


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


def cached_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query softmax attention over a KV cache laid out [B, K, S, H]: the N query
    heads are K groups of G = N / K sharing one kv head. Scores and softmax in float32.
    (On CPU this is 3.5x faster per decode step than `jax.nn.dot_product_attention` on a
    [B, S, K, H] cache, which transposes the whole cache every step.)"""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH,
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs):
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

    def project_qkv(
        self, x_BTD: jax.Array, positions_BT: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,N,H], k and v [B,T,K,H] with bias, q/k norm and RoPE applied."""
        w = lambda p: p[...].astype(self.dtype)
        q = jnp.einsum("BTD,DNH->BTNH", x_BTD, w(self.q_proj))
        k = jnp.einsum("BTD,DKH->BTKH", x_BTD, w(self.k_proj))
        v = jnp.einsum("BTD,DKH->BTKH", x_BTD, w(self.v_proj))
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
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_proj[...].astype(self.dtype))
        return constrain(out_BTD, ("batch", "length", "act_embed"))

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array,
                 kv: KVLayer | None = None, index: jax.Array | None = None):
        """Without `kv`, attends within x (S = T). With a layer's cache `kv` ([B, K, S, H]
        each), writes this chunk's k/v at slot `index`, attends over the whole cache and
        returns the updated layer cache."""
        q, k, v = self.project_qkv(x_BTD, positions_BT)
        if kv is None:
            out_BTNH = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None, :, :])
            return self.project_out(out_BTNH), None
        # The cache is [B, K, S, H]: attention reads it without a per-step transpose.
        place = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
            cache, new.swapaxes(1, 2).astype(cache.dtype), index, axis=2)
        kv = (place(kv[0], k), place(kv[1], v))
        return self.project_out(cached_attention(q, kv[0], kv[1], mask_BTS)), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(x gate) * (x up))."""

    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, precision.param_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.dtype = precision.dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w(self.gate_proj))
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w(self.up_proj))
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        out_BTD = jnp.einsum("BTF,FD->BTD", h_BTF, w(self.down_proj))
        return constrain(out_BTD, ("batch", "length", "act_embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenConfig, precision: Precision, rngs: nnx.Rngs):
        pd = precision.param_dtype
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.attn = Attention(cfg, precision, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.mlp = MLP(cfg, precision, rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array,
                 kv: KVLayer | None = None, index: jax.Array | None = None):
        attn_BTD, kv = self.attn(self.input_norm(x_BTD), positions_BT, mask_BTS, kv, index)
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
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of {list(REMAT_POLICIES)}")
        pd = precision.param_dtype
        self.config = cfg
        self.precision = precision
        self.remat = remat
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, precision, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed_tokens(self, input_ids_BT: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], input_ids_BT, axis=0).astype(self.precision.dtype)
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

    def hidden_states(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype."""
        positions_BT = positions_from_mask(attention_mask_BT)
        T = input_ids_BT.shape[1]
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
        mask_BTT = causal_TT[None] & attention_mask_BT.astype(jnp.bool_)[:, None, :]
        x_BTD = self.embed_tokens(input_ids_BT)
        x_BTD, _ = self.scan_layers(
            lambda layer, x: (layer(x, positions_BT, mask_BTT)[0], None), x_BTD
        )
        return self.final_norm(x_BTD)

    def hidden_states_cached(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array,
        slots_valid_BS: jax.Array,
        cache: KVCache,
        index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Generation: the T new tokens occupy cache slots [index, index + T) of every row.
        A token at slot s attends slots <= s that `slots_valid_BS` marks as real (left
        padding of the prompt is not). Returns final-norm hidden states and the new cache."""
        T, S = input_ids_BT.shape[1], slots_valid_BS.shape[1]
        slot_T = index + jnp.arange(T)
        causal_TS = jnp.arange(S)[None, :] <= slot_T[:, None]
        mask_BTS = causal_TS[None] & slots_valid_BS.astype(jnp.bool_)[:, None, :]
        x_BTD = self.embed_tokens(input_ids_BT)

        def step(layer, x, k_BSKH, v_BSKH):
            x, (k_BSKH, v_BSKH) = layer(x, positions_BT, mask_BTS, (k_BSKH, v_BSKH), index)
            return x, (k_BSKH, v_BSKH)

        x_BTD, cache = self.scan_layers(step, x_BTD, *cache)
        return self.final_norm(x_BTD), cache

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """Zeroed KV cache, (k, v) each [L, B, K, S, H] in the compute dtype."""
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, slots, c.head_dim)
        zeros = jnp.zeros(shape, self.precision.dtype)
        zeros = constrain(zeros, ("layers", "batch", "kv_heads", "length", "head_dim"))
        return zeros, zeros

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        """Logits [B, T, V] in float32. Memory grows with B*T*V: the trainer uses
        `dapo_jax.models.logprobs.token_logprobs` on `hidden_states` instead."""
        h_BTD = self.hidden_states(input_ids_BT, attention_mask_BT)
        logits = jnp.einsum(
            "BTD,DV->BTV", h_BTD, self.lm_head_weight(), preferred_element_type=jnp.float32
        )
        return constrain(logits, ("batch", "length", "vocab"))


def param_logical_axes(state: nnx.State) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{parameter path: logical axes}, with `layers` prepended for the stacked layers."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        axes = tuple(var.get_metadata()["axes"])
        out[tuple(str(p) for p in path)] = (("layers",) + axes) if path[0] == "layers" else axes
    return out


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The state with each parameter replaced by its NamedSharding on `mesh`."""

    def to_sharding(path: tuple[Any, ...], var: nnx.Variable) -> nnx.Variable:
        axes = tuple(var.get_metadata()["axes"])
        if getattr(path[0], "key", None) == "layers":
            axes = ("layers",) + axes
        return var.replace(named_sharding(mesh, axes, var.get_value().shape))

    return jax.tree_util.tree_map_with_path(
        to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def init_model(
    cfg: QwenConfig,
    *,
    seed: int = 0,
    precision: Precision = Precision(),
    remat: str = "none",
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen:
    """Randomly initialised model, created directly in its sharding when `mesh` is given."""
    create = lambda: Qwen(cfg, precision=precision, remat=remat, rngs=nnx.Rngs(seed))
    if mesh is None:
        return create()
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
