"""The JAX generation engine: continuous batching over a slot KV cache (`Generator`).

Up to `max_num_seqs` sequences decode at once, each in a slot of the cache; a finished
sequence's slot is refilled with the next waiting prompt, so a batch does not run as long as
its longest row, and each decode step reads each row's live cache columns only
(`dapo_jax.models.ragged`). Sampling settings are traced values, so changing them does not
recompile; only the kind of sampling (greedy, full distribution, top-k/top-p truncated)
selects a static variant.

Log-probs: each sampled token's log-prob under the distribution it was drawn from, i.e.
log_softmax(logits / temperature) after top-k / top-p truncation and renormalisation (the same
convention as vLLM's `processed_logprobs`). With top_p = 1 and top_k = -1, the DAPO training
setting, that is exactly the trainer's teacher-forced log_softmax(logits / temperature).
Greedy decoding (temperature 0) reports log_softmax(logits).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax.models.ragged import KV_BLOCK, pool_orders, write_column, write_prefix
from dapo_jax.multihost import to_host
from dapo_jax.sharding import batch_sharding, constrain, mesh_context

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_tokens: int = 64
    seed: int = 0
    ignore_eos: bool = False  # no stop token ends a sequence (benchmarks pin lengths)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    # "stop" (a stop token was sampled, and is included), "length", or another engine's
    # reason (vLLM: "abort"); everything but "stop" is overlong-filtered.
    finish_reason: str
    weight_version: int


END_OF_TURN = "<|im_end|>"


def stop_token_ids(model_dir: str | Path) -> list[int]:
    """Stop tokens of a HF model directory, the same for every engine:

    - `eos_token_id` of generation_config.json and config.json (an int or a list),
    - the tokenizer's eos token (tokenizer_config.json), and
    - the chat template's end of turn, <|im_end|>, when the template writes it: prompts go
      through the chat template, so the answer ends its turn there. The seed's base models
      (Qwen2.5-Math-7B, Qwen3-1.7B-Base, Qwen3-4B-Base) name only <|endoftext|> (151643) as
      eos in all three files, but their chat template ends every turn with <|im_end|>
      (151645); stopping on eos alone lets a response run on into an invented next turn until
      <|endoftext|> or the length limit (and overlong filtering then drops it).

    Token strings are resolved through tokenizer_config.json's `added_tokens_decoder`, then
    tokenizer.json's added tokens and vocabulary; an eos token that resolves nowhere is an
    error naming the file."""
    model_dir = Path(model_dir)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
    tok_cfg_file = model_dir / "tokenizer_config.json"
    if not tok_cfg_file.exists():
        return sorted(ids)
    tok_cfg = json.loads(tok_cfg_file.read_text())
    token_ids = {v["content"]: int(k) for k, v in tok_cfg.get("added_tokens_decoder", {}).items()}
    tok_file = model_dir / "tokenizer.json"
    if tok_file.exists():
        tok = json.loads(tok_file.read_text())
        token_ids = {**(tok.get("model") or {}).get("vocab", {}), **token_ids,
                     **{t["content"]: t["id"] for t in tok.get("added_tokens", [])}}
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos:
        if eos not in token_ids:
            raise ValueError(f"{tok_cfg_file}: eos_token {eos!r} is not a token of the tokenizer")
        ids.add(token_ids[eos])
    template = tok_cfg.get("chat_template") or ""
    template_file = model_dir / "chat_template.jinja"
    if template_file.exists():
        template += template_file.read_text()
    if END_OF_TURN in template and END_OF_TURN in token_ids:
        ids.add(token_ids[END_OF_TURN])
    return sorted(ids)


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Next power of two >= max(n, minimum): few distinct shapes, few compilations."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _largest_passing(x_BV: jax.Array, passes, iters: int = 40) -> jax.Array:
    """Per row, (nearly) the largest threshold t in [min x, max x] with passes(t) true, for a
    predicate that only turns false as t grows; bisection, `iters` masked reductions."""
    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = passes(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.min(x_BV, axis=-1, keepdims=True)
    hi = jnp.max(x_BV, axis=-1, keepdims=True)
    return jax.lax.fori_loop(0, iters, body, (lo, hi))[0]


def _truncate(z_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p on the renormalised top-k distribution: logits outside are -inf.

    Thresholds come from bisection, not a sort (sorting [64, 32k] logits costs 330 ms per
    decode step on CPU; bisection a few ms). Tokens tied with the threshold are kept."""
    V = z_BV.shape[-1]
    k_B1 = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    t_k = _largest_passing(z_BV, lambda t: jnp.sum(z_BV >= t, -1, keepdims=True) >= k_B1)
    z_BV = jnp.where(z_BV >= t_k, z_BV, -jnp.inf)
    p_BV = jax.nn.softmax(z_BV, axis=-1)
    # The nucleus: the most likely tokens whose mass reaches top_p, i.e. p >= t for the
    # largest t whose kept mass is still >= top_p.
    t_p = _largest_passing(
        p_BV, lambda t: jnp.sum(jnp.where(p_BV >= t, p_BV, 0.0), -1, keepdims=True) >= top_p)
    return jnp.where(p_BV >= t_p, z_BV, -jnp.inf)


_BLOCK = 128


def _inverse_cdf(probs_BV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One draw per row from `probs_BV` with a single uniform per row (from that row's key
    in `keys_B`): first pick a block of
    128 tokens by its mass, then the token inside it. (`jax.random.categorical` draws B x V
    Gumbel numbers: 30 ms of a 60 ms decode step at B=64, V=32k on CPU; this takes <1 ms.)"""
    B, V = probs_BV.shape
    nb = -(-V // _BLOCK)
    p_BnC = jnp.pad(probs_BV, ((0, 0), (0, nb * _BLOCK - V))).reshape(B, nb, _BLOCK)
    mass_Bn = jnp.sum(p_BnC, axis=-1)
    cdf_Bn = jnp.cumsum(mass_Bn, axis=-1)
    u_B1 = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(keys_B)
    u_B1 = (1.0 - u_B1) * cdf_Bn[:, -1:]  # in (0, total]
    block_B = jnp.minimum(jnp.sum(cdf_Bn < u_B1, axis=-1), nb - 1)
    inner_BC = jnp.take_along_axis(p_BnC, block_B[:, None, None], axis=1)[:, 0]
    before_B1 = jnp.take_along_axis(cdf_Bn - mass_Bn, block_B[:, None], axis=1)
    k_B = jnp.sum(before_B1 + jnp.cumsum(inner_BC, axis=-1) < u_B1, axis=-1)
    # Rounding can leave u just past the block's last entry: take its last non-zero token.
    last_B = _BLOCK - 1 - jnp.argmax((inner_BC > 0)[:, ::-1], axis=-1)
    return block_B * _BLOCK + jnp.minimum(k_B, last_B)


def _argmax(x_BV: jax.Array) -> jax.Array:
    """First index of each row's maximum, as two plain reductions (XLA:CPU's variadic
    argmax reduction takes 4 ms on [64, 32k], this 1.5 ms)."""
    top_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    V = x_BV.shape[-1]
    return jnp.min(jnp.where(x_BV == top_B1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


SAMPLING_KINDS = ("greedy", "full", "truncated")


def sampling_kind(sampling: SamplingParams) -> str:
    """The static variant of the sampler that `sampling` needs (one compilation each)."""
    if sampling.temperature == 0:
        return "greedy"
    return "truncated" if sampling.top_k > 0 or sampling.top_p < 1.0 else "full"


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array, *, kind: str
                  ) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row, each with its own key; returns (tokens [B], log-probs [B])
    per the module docstring.
    `kind` (static, see `sampling_kind`) picks greedy, sampling from the full distribution
    or with top-k/top-p truncation: traced switches would compute or copy the unused
    branches on every decode step."""
    if kind not in SAMPLING_KINDS:
        raise ValueError(f"kind must be one of {SAMPLING_KINDS}, got {kind!r}")
    if kind == "greedy":
        tokens = _argmax(logits_BV)
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    else:
        z = logits_BV / temperature
        if kind == "truncated":
            z = _truncate(z, top_k, top_p)
        logp_BV = jax.nn.log_softmax(z, axis=-1)
        tokens = _inverse_cdf(jnp.exp(logp_BV), keys_B).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp_BV, tokens[:, None], -1)[:, 0]


def _logits_last(model: Any, h_BD: jax.Array) -> jax.Array:
    return jnp.einsum("BD,DV->BV", h_BD, model.lm_head_weight(),
                      preferred_element_type=jnp.float32)


class Sampler(NamedTuple):
    """One call's sampling settings as traced values (changing them does not recompile)."""

    stop_ids: jax.Array  # [n_stop] int32
    seed: jax.Array  # uint32
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    ignore_eos: jax.Array  # bool


def _sample(model: Any, h_BD: jax.Array, state: dict[str, jax.Array], index_B: jax.Array,
            sampler: Sampler, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token `index_B` of each row's sequence, drawn from its own key (seed, prompt key,
    sample index, token index): what a sequence generates does not depend on the slot, the
    batch or the moment it ran in. Returns (tokens, log-probs, stopped)."""
    key = jax.random.key(sampler.seed)
    keys_B = jax.vmap(lambda h, j, i: jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, h), j), i))(
        state["prompt_key"], state["sample"], index_B)
    tok_B, logp_B = sample_tokens(_logits_last(model, h_BD), keys_B, sampler.temperature,
                                  sampler.top_k, sampler.top_p, kind=kind)
    return tok_B, logp_B, jnp.isin(tok_B, sampler.stop_ids) & ~sampler.ignore_eos


# The engine's state: a `SlotCache` of B slots x S columns and, per slot, [B] unless noted:
#   last     the latest sampled token (the next step's input; its position is cache.length)
#   count    tokens generated so far       limit  the slot's max_tokens (0: empty slot)
#   stopped  a stop token was sampled      prompt_key, sample  the sequence's identity
#   tokens [B, M], logps [B, M]            what the slot's sequence generated
# and slot_steps (a scalar): slots x decode steps run, for `Generator.utilization`.
# A slot decodes while count < limit and not stopped; the host collects finished slots and
# refills them.
SLOT_FIELDS = ("last", "count", "limit", "stopped", "prompt_key", "sample", "tokens", "logps")


def _running(state: dict[str, Any]) -> jax.Array:
    return (state["count"] < state["limit"]) & ~state["stopped"]


def _new_state(model: Any, batch: int, slots: int, new_tokens: int) -> dict[str, Any]:
    zeros = lambda dtype, *shape: constrain(jnp.zeros((batch, *shape), dtype),
                                            ("batch",) + (None,) * len(shape))
    return dict(cache=model.init_cache(batch, slots), last=zeros(jnp.int32),
                count=zeros(jnp.int32), limit=zeros(jnp.int32), stopped=zeros(jnp.bool_),
                prompt_key=zeros(jnp.uint32), sample=zeros(jnp.int32),
                tokens=zeros(jnp.int32, new_tokens), logps=zeros(jnp.float32, new_tokens),
                slot_steps=jnp.int32(0))


def _insert(model: Any, state: dict[str, Any], prompt_RP: jax.Array, prompt_len_R: jax.Array,
            slot_R: jax.Array, prompt_key_R: jax.Array, sample_R: jax.Array,
            limit_R: jax.Array, sampler: Sampler, kind: str) -> dict[str, Any]:
    """Prefills R right-padded prompts and places them in slots `slot_R` (an index >= B is a
    filler row, dropped): the prompt's keys/values at cache columns [0, P), its first
    sampled token, count 1."""
    R, P = prompt_RP.shape
    mask_RP = jnp.arange(P) < prompt_len_R[:, None]
    positions_RP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
    h_RPD, (k, v) = model.hidden_states_cached(prompt_RP, positions_RP, mask_RP.astype(jnp.int32))
    h_RD = jnp.take_along_axis(h_RPD, (prompt_len_R - 1)[:, None, None], axis=1)[:, 0]
    ident = dict(prompt_key=prompt_key_R, sample=sample_R)
    tok_R, logp_R, stop_R = _sample(model, h_RD, ident, jnp.zeros_like(slot_R), sampler, kind)
    cache = state["cache"]
    k_order, v_order = pool_orders()
    put = lambda x, value: x.at[slot_R].set(value.astype(x.dtype), mode="drop")
    # R = B only in the first fill, row r into slot r (`Generator._insert_group`).
    aligned = R == state["limit"].shape[0]
    cache = cache._replace(
        k=write_prefix(cache.k, k_order, slot_R, k.transpose(0, 1, 4, 2, 3), aligned=aligned),
        v=write_prefix(cache.v, v_order, slot_R, v.swapaxes(2, 3), aligned=aligned),
        length=put(cache.length, prompt_len_R))
    return dict(state, cache=cache, last=put(state["last"], tok_R),
                count=put(state["count"], jnp.ones_like(slot_R)),
                limit=put(state["limit"], limit_R), stopped=put(state["stopped"], stop_R),
                prompt_key=put(state["prompt_key"], prompt_key_R),
                sample=put(state["sample"], sample_R),
                tokens=state["tokens"].at[slot_R, 0].set(tok_R, mode="drop"),
                logps=state["logps"].at[slot_R, 0].set(logp_R, mode="drop"))


def _decode_step(model: Any, s: dict[str, Any], sampler: Sampler, kind: str
                 ) -> dict[str, Any]:
    """One decode step of every running slot: reads each row's live cache columns only
    (`decode_attention`) and writes the new column once for all layers."""
    B, M = s["tokens"].shape
    rows = jnp.arange(B)
    run = _running(s)
    cache = s["cache"]
    k_order, v_order = pool_orders()
    S = cache.k.shape[k_order.index("S")]
    # Rows not running read nothing and write nowhere (an index past the end is dropped).
    reading = cache._replace(length=jnp.where(run, cache.length, 0))
    h, (k, v) = model.hidden_states_cached(s["last"][:, None], cache.length[:, None],
                                           jnp.ones((B, 1), jnp.int32), reading)
    col = jnp.where(run, cache.length, S)
    cache = cache._replace(
        k=write_column(cache.k, k_order, rows, col, k[..., 0]),
        v=write_column(cache.v, v_order, rows, col, v[:, :, :, 0]),
        length=cache.length + run)
    tok, logp, stop = _sample(model, h[:, 0], s, s["count"], sampler, kind)
    at = jnp.where(run, s["count"], M)
    return dict(s, cache=cache, last=jnp.where(run, tok, s["last"]),
                slot_steps=s["slot_steps"] + B,
                count=s["count"] + run, stopped=s["stopped"] | (run & stop),
                tokens=s["tokens"].at[rows, at].set(tok, mode="drop"),
                logps=s["logps"].at[rows, at].set(logp, mode="drop"))


def _decode(model: Any, state: dict[str, Any], sampler: Sampler, free_target: jax.Array,
            kind: str) -> dict[str, Any]:
    """`_decode_step`s until `free_target` slots are not running (time to refill or to
    shrink the batch) or none runs."""

    def going(s: dict[str, Any]) -> jax.Array:
        run = _running(s)
        return jnp.any(run) & (jnp.sum(~run) < free_target)

    return jax.lax.while_loop(going, lambda s: _decode_step(model, s, sampler, kind), state)


def _compact(state: dict[str, Any], slot_b: jax.Array, keep_b: jax.Array) -> dict[str, Any]:
    """A smaller batch: row i takes slot `slot_b[i]` (`keep_b[i]` False: an empty slot)."""
    cache = state["cache"]
    out = {f: state[f][slot_b] for f in SLOT_FIELDS} | {"slot_steps": state["slot_steps"]}
    out["limit"] = jnp.where(keep_b, out["limit"], 0)
    k_order, v_order = pool_orders()
    out["cache"] = cache._replace(k=jnp.take(cache.k, slot_b, axis=k_order.index("B")),
                                  v=jnp.take(cache.v, slot_b, axis=v_order.index("B")),
                                  length=cache.length[slot_b])
    return out


def _rows(state: dict[str, Any], slot_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    return state["tokens"][slot_b], state["logps"][slot_b]


def _merged(fn: Any) -> Any:
    """`fn(model, ...)` as a function of (graphdef, params, ...) for `jax.jit`."""
    def call(graphdef: nnx.GraphDef, params: nnx.State, *args: Any, **kw: Any) -> Any:
        return fn(nnx.merge(graphdef, params), *args, **kw)
    # fn's name for JAX's compile events and logs; not functools.wraps: its __wrapped__
    # would give jit fn's signature, in which the static arguments sit elsewhere.
    call.__name__ = call.__qualname__ = fn.__name__
    return call


REFILL_PARTS = 16  # a batch refills when 1/16 of its slots are free
MIN_SHRINK = 8  # batches are not shrunk below this many rows (small batches cost alike)


def batch_sizes(batch: int, multiple: int) -> list[int]:
    """The batch sizes a call of `batch` slots may shrink to as its sequences finish,
    largest first: every halving, with 3/4 steps in the top two octaves (at least 2/3 of the
    slots busy while the last sequences finish), each a multiple of `multiple` and at least
    MIN_SHRINK rows."""
    sizes = {batch}
    for e in range(batch.bit_length()):
        sizes.add(batch >> e)
        if e < 2:
            sizes.add(3 * (batch >> e) // 4)
    floor = max(MIN_SHRINK, multiple)
    return sorted({batch} | {b for b in sizes if b >= floor and b % multiple == 0},
                  reverse=True)


@dataclasses.dataclass
class _Row:
    prompt: list[int]
    prompt_key: int
    sample: int
    limit: int


class Generator:
    """Samples from a `Qwen` model's parameters with continuous batching: up to
    `max_num_seqs` sequences decode at once in the slots of a `SlotCache`; when a slot's
    sequence finishes, the next waiting one is prefilled into it. `set_params` swaps in new
    weights with a version number that every returned sample carries.

    The host drives jitted pieces: `insert` prefills a group of waiting prompts into free
    slots, `decode` runs decode steps in a `lax.while_loop` until a refill group's worth of
    slots is free (or, with nothing waiting, until the batch can shrink to the next size in
    `batch_sizes`), `compact` moves the running sequences into a smaller batch. A host loop
    over jitted chunks rather than one program (JetStream's insert is the same prefill-and-
    place step): the host holds the waiting queue, and each piece compiles once per shape
    (batch size, prompt bucket, cache columns), never per length mix."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, *,
                 stop_token_ids: Sequence[int], max_model_len: int, pad_token_id: int = 0,
                 mesh: jax.sharding.Mesh | None = None, weight_version: int = 0,
                 max_num_seqs: int = 0):
        if not stop_token_ids:
            raise ValueError("stop_token_ids is empty: generation would never stop early")
        self.graphdef = graphdef
        self.params = params
        self.version = weight_version
        self.stop_ids = np.asarray(sorted(set(int(t) for t in stop_token_ids)), np.int32)
        self.max_model_len = max_model_len
        self.pad_token_id = pad_token_id
        self.mesh = mesh
        self.max_num_seqs = max_num_seqs  # slots decoding at once; 0: every row of a call
        # The last call: prefill groups inserted, batch shrinks, generated tokens / (slots x
        # decode steps).
        self.stats: dict[str, float] = {}
        self._insert = jax.jit(_merged(_insert), static_argnums=0, static_argnames="kind",
                               donate_argnums=2)
        self._decode = jax.jit(_merged(_decode), static_argnums=0, static_argnames="kind",
                               donate_argnums=2)
        self._new_state = jax.jit(_merged(_new_state), static_argnums=(0, 2, 3, 4))
        self._compact = jax.jit(_compact)
        self._rows = jax.jit(_rows)

    def set_params(self, params: nnx.State, version: int) -> None:
        self.params = params
        self.version = int(version)

    def _place(self, values: Any, batched: bool) -> Any:
        """Inputs on the mesh: batched ones split over the batch axes, the rest replicated
        (every process passes the same host values; each places its own devices' shards)."""
        if self.mesh is None:
            return values
        return jax.device_put(values, self._sharding(batched))

    def _sharding(self, batched: bool) -> NamedSharding:
        return batch_sharding(self.mesh) if batched else NamedSharding(self.mesh,
                                                                       PartitionSpec())

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def batch_bucket(self, rows: int) -> int:
        """Slots of one call: a power of two (few compilations), rounded up to a multiple of
        the data-parallel size so that every device gets whole rows."""
        dp = self._batch_multiple()
        return -(-bucket(rows) // dp) * dp

    def slots(self, rows: int) -> int:
        """The KV pool's slots for a call of `rows` sequences: `batch_bucket(rows)`, but
        never more than `max_num_seqs` (rounded up to the data-parallel size): the pool's
        memory is max_num_seqs x (prompt + limit), as the setting says, also where it is
        not a power of two."""
        B = self.batch_bucket(rows)
        if self.max_num_seqs:
            dp = self._batch_multiple()
            B = min(B, -(-self.max_num_seqs // dp) * dp)
        return B

    def refill_rows(self, batch: int) -> int:
        """Prompts prefilled together into a batch of `batch` slots."""
        dp = self._batch_multiple()
        return -(-max(1, batch // REFILL_PARTS) // dp) * dp

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 n: int = 1, keys: Sequence[int] | None = None,
                 max_tokens: Sequence[int] | None = None) -> list[list[Sample]]:
        """`n` samples for each prompt (token-id lists); one list of Samples per prompt.
        `keys` name each prompt's identity (its position in the dataset; default: its
        position in `prompts`): sample j of a prompt draws from key (sampling.seed, key, j),
        so two copies of one prompt under different keys draw different samples, and what a
        prompt gets does not depend on the batch it is in, its order or its slot.
        `max_tokens` limits each prompt's responses (vLLM's per-request field; default:
        `sampling.max_tokens` for all)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        keys = range(len(prompts)) if keys is None else keys
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        limits = [sampling.max_tokens] * len(prompts) if max_tokens is None else max_tokens
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
        for i, (p, limit) in enumerate(zip(prompts, limits, strict=True)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
                raise ValueError(f"max_tokens[{i}] must be an integer >= 1, got {limit!r}")
            if len(p) + limit > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={limit} it "
                    f"exceeds the model's maximum length {self.max_model_len}")
        rows = [_Row(list(p), int(k) % 2**32, j, int(limit))
                for p, k, limit in zip(prompts, keys, limits, strict=True) for j in range(n)]
        samples = self._run(rows, sampling)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def shapes(self, rows: int, prompt_len: int, max_tokens: int) -> tuple[int, int, int, int]:
        """(slots B, prompt bucket P, cache columns S, token columns M) of a call of `rows`
        sequences with prompts up to `prompt_len` and up to `max_tokens` new tokens: S holds
        the longest prompt + response, in whole attention blocks."""
        B = self.slots(rows)
        P = bucket(prompt_len)
        S = -(-max(P, prompt_len + max_tokens) // KV_BLOCK) * KV_BLOCK
        return B, P, S, bucket(max_tokens)

    def _sampler(self, sampling: SamplingParams) -> Sampler:
        return Sampler(*self._place((
            self.stop_ids, np.uint32(sampling.seed % 2**32), np.float32(sampling.temperature),
            np.int32(sampling.top_k), np.float32(sampling.top_p), np.bool_(sampling.ignore_eos)),
            batched=False))

    def _run(self, rows: list[_Row], sampling: SamplingParams) -> list[Sample]:
        B, P, S, M = self.shapes(len(rows), max(len(r.prompt) for r in rows),
                                 max(r.limit for r in rows))
        kind = sampling_kind(sampling)
        sampler = self._sampler(sampling)
        sizes = batch_sizes(B, self._batch_multiple())
        waiting = collections.deque(range(len(rows)))
        holder: list[int | None] = [None] * B  # the row each slot decodes
        inserts = shrinks = 0
        out: list[Sample | None] = [None] * len(rows)
        with mesh_context(self.mesh):
            state = self._new_state(self.graphdef, self.params, B, S, M)
            while waiting or any(h is not None for h in holder):
                B = len(holder)
                free = [i for i, h in enumerate(holder) if h is None]
                R = self.refill_rows(B)
                while waiting and free and (len(free) >= R or len(waiting) <= len(free)):
                    # An empty pool fills in one prefill (one program of B rows), later
                    # refills R at a time.
                    size = B if len(free) == B else R
                    group = [waiting.popleft() for _ in range(min(size, len(free), len(waiting)))]
                    state = self._insert_group(state, [rows[i] for i in group],
                                               free[:len(group)], size, P, sampler, kind)
                    for slot, i in zip(free, group, strict=False):
                        holder[slot] = i
                    free = free[len(group):]
                    inserts += 1
                if waiting:
                    target = min(R, len(waiting))
                else:
                    smaller = [b for b in sizes if b < B]
                    target = B - smaller[0] if smaller else B + 1
                state = self._decode(self.graphdef, self.params, state, sampler,
                                     self._place(np.int32(target), batched=False), kind=kind)
                state, holder = self._collect(state, holder, rows, out)
                if not waiting:
                    B = len(holder)
                    state, holder = self._shrink(state, holder, sizes)
                    shrinks += len(holder) < B
            slot_steps = int(to_host(state["slot_steps"]))
        # Tokens of decode steps (each sequence's first comes from its prefill) per slot-step.
        decoded = sum(len(o.token_ids) - 1 for o in out if o is not None)
        self.stats = dict(inserts=inserts, shrinks=shrinks,
                          utilization=decoded / max(slot_steps, 1))
        return out  # type: ignore[return-value]

    def _insert_group(self, state: dict[str, Any], group: list[_Row], slots: list[int],
                      R: int, P: int, sampler: Sampler, kind: str) -> dict[str, Any]:
        B = state["limit"].shape[0]
        if R == B and list(slots) != list(range(len(slots))):  # `_insert`'s aligned write
            raise AssertionError(f"a prefill of every slot fills slots 0.., not {slots}")
        prompt = np.full((R, P), self.pad_token_id, np.int32)
        length = np.ones(R, np.int32)
        slot = np.full(R, B, np.int32)  # fillers: past the end, dropped
        prompt_key = np.zeros(R, np.uint32)
        sample = np.zeros(R, np.int32)
        limit = np.zeros(R, np.int32)
        for j, (r, s) in enumerate(zip(group, slots, strict=True)):
            prompt[j, :len(r.prompt)] = r.prompt
            length[j], slot[j], prompt_key[j], sample[j], limit[j] = (
                len(r.prompt), s, r.prompt_key, r.sample, r.limit)
        batch = self._place((prompt, length, slot, prompt_key, sample, limit), batched=True)
        return self._insert(self.graphdef, self.params, state, *batch, sampler, kind=kind)

    def _collect(self, state: dict[str, Any], holder: list[int | None], rows: list[_Row],
                 out: list[Sample | None]) -> tuple[dict[str, Any], list[int | None]]:
        """Samples of the slots whose sequence finished; their slots become free."""
        count, limit, stopped = (to_host(state[f]) for f in ("count", "limit", "stopped"))
        done = [i for i, h in enumerate(holder)
                if h is not None and (stopped[i] or count[i] >= limit[i])]
        if not done:
            return state, holder
        idx = np.zeros(self.batch_bucket(len(done)), np.int32)
        idx[:len(done)] = done
        tokens, logps = (to_host(x) for x in self._rows(state, self._place(idx, batched=False)))
        holder = list(holder)
        for j, slot in enumerate(done):
            c = int(count[slot])
            out[holder[slot]] = Sample(token_ids=tokens[j, :c].tolist(),
                                       logprobs=logps[j, :c].tolist(),
                                       finish_reason="stop" if stopped[slot] else "length",
                                       weight_version=self.version)
            holder[slot] = None
        return state, holder

    def _shrink(self, state: dict[str, Any], holder: list[int | None], sizes: list[int]
                ) -> tuple[dict[str, Any], list[int | None]]:
        """With nothing waiting: the running sequences into the smallest batch that holds
        them, once that is smaller."""
        live = [i for i, h in enumerate(holder) if h is not None]
        fits = [b for b in sizes if b >= len(live)]
        if not live or not fits or fits[-1] >= len(holder):
            return state, holder
        b = fits[-1]
        slot = np.zeros(b, np.int32)
        slot[:len(live)] = live
        keep = np.arange(b) < len(live)
        state = self._compact(state, *self._place((slot, keep), batched=True))
        return state, [holder[i] for i in live] + [None] * (b - len(live))

    def lower(self, params: Any, rows: int, prompt_len: int, max_tokens: int,
              kind: str = "full") -> Any:
        """`jax.jit(...).lower` of one cycle of the engine on abstract `params` (sharded
        `jax.ShapeDtypeStruct`s), for the compile tool: the first fill's prefill (every
        slot's prompt at once, the largest prefill a call runs) placed into the KV pool of a
        call of `rows` sequences with prompts up to `prompt_len` and `max_tokens` new
        tokens, then its decode loop."""
        B, P, S, M = self.shapes(rows, prompt_len, max_tokens)
        R = B

        def cycle(graphdef: nnx.GraphDef, params: nnx.State, group: tuple[jax.Array, ...],
                  sampler: Sampler, target: jax.Array) -> dict[str, Any]:
            model = nnx.merge(graphdef, params)
            state = _insert(model, _new_state(model, B, S, M), *group, sampler, kind)
            return _decode(model, state, sampler, target, kind)

        spec = self._abstract
        group = (spec((R, P), np.int32, True),) + tuple(
            spec((R,), d, True) for d in (np.int32, np.int32, np.uint32, np.int32, np.int32))
        with mesh_context(self.mesh):
            return jax.jit(cycle, static_argnums=0).lower(
                self.graphdef, params, group, self._abstract_sampler(),
                spec((), np.int32, False))

    def lower_step(self, params: Any, rows: int, prompt_len: int, max_tokens: int,
                   kind: str = "full") -> Any:
        """`jax.jit(...).lower` of one decode step (`_decode_step`, the state donated as
        `decode` donates it) at the KV pool and batch of a call of `rows` sequences, for the
        compile tool's bytes per decode step."""
        B, _, S, M = self.shapes(rows, prompt_len, max_tokens)
        with mesh_context(self.mesh):
            new = jax.jit(_merged(_new_state), static_argnums=(0, 2, 3, 4)).lower(
                self.graphdef, params, B, S, M)
            shardings = new.compile().output_shardings
            state = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                new.out_info, shardings)
            return jax.jit(_merged(_decode_step), static_argnums=0, static_argnames="kind",
                           donate_argnums=2).lower(
                self.graphdef, params, state, self._abstract_sampler(), kind=kind)

    def _abstract(self, shape: tuple[int, ...], dtype: Any, batched: bool
                  ) -> jax.ShapeDtypeStruct:
        """An abstract input as `_place` lays it out on the mesh."""
        sharding = None if self.mesh is None else self._sharding(batched)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def _abstract_sampler(self) -> Sampler:
        return Sampler(*(self._abstract(s, d, False) for s, d in (
            (self.stop_ids.shape, np.int32), ((), np.uint32), ((), np.float32),
            ((), np.int32), ((), np.float32), ((), np.bool_))))
