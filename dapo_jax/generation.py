"""The JAX generation engine: batched sampling with a preallocated KV cache.

One jitted function per (batch, prompt, new-token) bucket does a prefill of the left-padded
prompts, then a `lax.while_loop` of single-token decode steps that stops as soon as every
sequence has finished. Sampling settings are traced values, so changing them does not
recompile; only the kind of sampling (greedy, full distribution, top-k/top-p truncated) selects
a static variant.

Log-probs: each sampled token's log-prob under the distribution it was drawn from, i.e.
log_softmax(logits / temperature) after top-k / top-p truncation and renormalisation (the same
convention as vLLM's `processed_logprobs`). With top_p = 1 and top_k = -1, the DAPO training
setting, that is exactly the trainer's teacher-forced log_softmax(logits / temperature).
Greedy decoding (temperature 0) reports log_softmax(logits).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax.models.qwen import KVCache
from dapo_jax.multihost import to_host
from dapo_jax.sharding import constrain, mesh_context

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_tokens: int = 64
    seed: int = 0

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


def _logits_last(model: Any, h_BTD: jax.Array) -> jax.Array:
    return jnp.einsum("BD,DV->BV", h_BTD[:, -1], model.lm_head_weight(),
                      preferred_element_type=jnp.float32)


def _write(cache: KVCache, new: KVCache, slot: jax.Array) -> KVCache:
    """Stores T new positions of every layer at cache slots [slot, slot + T): one in-place
    write per step (the while loop owns the cache buffer)."""
    put = lambda c, x, axis: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), slot, axis)
    return put(cache[0], new[0], 4), put(cache[1], new[1], 3)


def _generate(graphdef: nnx.GraphDef, params: nnx.State, prompt_BP: jax.Array,
              prompt_mask_BP: jax.Array, active_B: jax.Array, stop_ids: jax.Array,
              seed: jax.Array, prompt_key_B: jax.Array, sample_B: jax.Array,
              max_new: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              *, new_bucket: int, kind: str) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    S = P + new_bucket
    prompt_len_B = jnp.sum(prompt_mask_BP, axis=-1).astype(jnp.int32)
    valid_BS = jnp.pad(prompt_mask_BP.astype(jnp.bool_), ((0, 0), (0, new_bucket)))
    positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=-1) - 1, 0)
    h, new_kv = model.hidden_states_cached(prompt_BP, positions_BP, prompt_mask_BP)
    cache = _write(model.init_cache(B, S), new_kv, jnp.int32(0))
    # Every sequence draws from its own key (seed, prompt key, sample index, token index):
    # what it generates does not depend on the batch it is in or on how that is split.
    key = jax.random.key(seed)
    seq_keys_B = jax.vmap(lambda h_, j: jax.random.fold_in(jax.random.fold_in(key, h_), j))(
        prompt_key_B, sample_B)
    keys_at = lambda i: jax.vmap(jax.random.fold_in, (0, None))(seq_keys_B, i)
    tok_B, logp_B = sample_tokens(_logits_last(model, h), keys_at(0), temperature, top_k,
                                  top_p, kind=kind)
    tokens_BM = jnp.zeros((B, new_bucket), jnp.int32).at[:, 0].set(tok_B)
    logps_BM = jnp.zeros((B, new_bucket), jnp.float32).at[:, 0].set(logp_B)
    stopped_B = jnp.isin(tok_B, stop_ids)
    state = dict(i=jnp.int32(1), tokens=tokens_BM, logps=logps_BM, stopped=stopped_B,
                 length=jnp.ones((B,), jnp.int32), valid=valid_BS, cache=cache)

    def running(s):
        return (s["i"] < max_new) & jnp.any(active_B & ~s["stopped"])

    def step(s):
        i = s["i"]
        slot = P + i - 1  # the previous token's cache slot
        prev_B1 = jax.lax.dynamic_slice_in_dim(s["tokens"], i - 1, 1, axis=1)
        positions_B1 = (prompt_len_B + i - 1)[:, None]
        h, new_kv = model.hidden_states_cached(prev_B1, positions_B1, jnp.ones_like(prev_B1),
                                               s["cache"], s["valid"])
        cache = _write(s["cache"], new_kv, slot)
        valid = s["valid"].at[:, slot].set(True)
        tok_B, logp_B = sample_tokens(_logits_last(model, h), keys_at(i), temperature, top_k,
                                      top_p, kind=kind)
        live_B = ~s["stopped"]
        tok_B = jnp.where(live_B, tok_B, 0)
        logp_B = jnp.where(live_B, logp_B, 0.0)
        return dict(
            i=i + 1,
            tokens=jax.lax.dynamic_update_slice_in_dim(s["tokens"], tok_B[:, None], i, 1),
            logps=jax.lax.dynamic_update_slice_in_dim(s["logps"], logp_B[:, None], i, 1),
            stopped=s["stopped"] | (live_B & jnp.isin(tok_B, stop_ids)),
            length=s["length"] + live_B.astype(jnp.int32),
            valid=valid,
            cache=cache,
        )

    s = jax.lax.while_loop(running, step, state)
    tokens = constrain(s["tokens"], ("batch", None))
    return dict(tokens=tokens, logprobs=s["logps"], length=s["length"], stopped=s["stopped"])


class Generator:
    """Samples from a `Qwen` model's parameters; `set_params` swaps in new weights with a
    version number that every returned sample carries."""

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
        self.max_num_seqs = max_num_seqs  # rows per generation call; 0: all at once
        self._fn = jax.jit(_generate, static_argnums=(0,),
                           static_argnames=("new_bucket", "kind"))

    def set_params(self, params: nnx.State, version: int) -> None:
        self.params = params
        self.version = int(version)

    def _place(self, values: tuple[Any, ...], batched: bool) -> tuple[Any, ...]:
        """Inputs on the mesh: batched ones split over the batch axes, the rest replicated
        (every process passes the same host values; each places its own devices' shards)."""
        if self.mesh is None:
            return values
        spec = PartitionSpec(("data", "fsdp")) if batched else PartitionSpec()
        return jax.device_put(values, NamedSharding(self.mesh, spec))

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 n: int = 1, keys: Sequence[int] | None = None) -> list[list[Sample]]:
        """`n` samples for each prompt (token-id lists); one list of Samples per prompt.
        `keys` name each prompt's identity (its position in the dataset; default: its
        position in `prompts`): sample j of a prompt draws from key (sampling.seed, key, j),
        so two copies of one prompt under different keys draw different samples, and what a
        prompt gets does not depend on the batch it is in or its order. The rows are
        generated `max_num_seqs` at a time (the KV cache holds that many)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sampling.max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={sampling.max_tokens} it "
                    f"exceeds the model's maximum length {self.max_model_len}")
        rows = [list(p) for p in prompts for _ in range(n)]
        keys = range(len(prompts)) if keys is None else keys
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        prompt_keys = np.repeat(np.asarray(keys, np.int64) % 2**32, n)
        sample = np.tile(np.arange(n, dtype=np.int32), len(prompts))
        chunk = self.max_num_seqs or len(rows)
        samples = []
        for lo in range(0, len(rows), chunk):
            part = slice(lo, lo + chunk)
            samples += self._generate_rows(rows[part], prompt_keys[part].astype(np.uint32),
                                           sample[part], sampling)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def batch_bucket(self, rows: int) -> int:
        """Rows of one generation call: a power of two (few compilations), rounded up to a
        multiple of the data-parallel size so that every device gets whole rows."""
        dp = self._batch_multiple()
        return -(-bucket(rows) // dp) * dp

    def _generate_rows(self, rows: list[list[int]], prompt_key_rows: np.ndarray,
                       sample_rows: np.ndarray, sampling: SamplingParams) -> list[Sample]:
        B = self.batch_bucket(len(rows))
        P = bucket(max(len(r) for r in rows))
        M = bucket(sampling.max_tokens)
        prompt = np.full((B, P), self.pad_token_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for b, r in enumerate(rows):
            prompt[b, P - len(r):] = r
            mask[b, P - len(r):] = 1
        prompt[len(rows):, -1] = self.pad_token_id  # filler rows: one token, inactive
        mask[len(rows):, -1] = 1
        active = np.arange(B) < len(rows)
        prompt_key = np.zeros(B, np.uint32)
        prompt_key[:len(rows)] = prompt_key_rows
        sample = np.zeros(B, np.int32)
        sample[:len(rows)] = sample_rows
        batch = self._place((prompt, mask, active, prompt_key, sample), batched=True)
        shared = self._place((self.stop_ids, np.uint32(sampling.seed % 2**32),
                              np.int32(sampling.max_tokens), np.float32(sampling.temperature),
                              np.int32(sampling.top_k), np.float32(sampling.top_p)),
                             batched=False)
        prompt, mask, active, prompt_key, sample = batch
        stop_ids, seed, max_new, temperature, top_k, top_p = shared
        with mesh_context(self.mesh):
            out = self._fn(self.graphdef, self.params, prompt, mask, active, stop_ids, seed,
                           prompt_key, sample, max_new, temperature, top_k, top_p,
                           new_bucket=M, kind=sampling_kind(sampling))
        out = {k: to_host(v) for k, v in out.items()}
        samples = []
        for b in range(len(rows)):
            length = int(out["length"][b])
            samples.append(Sample(
                token_ids=out["tokens"][b, :length].tolist(),
                logprobs=out["logprobs"][b, :length].tolist(),
                finish_reason="stop" if out["stopped"][b] else "length",
                weight_version=self.version,
            ))
        return samples

    def lower(self, params: Any, rows: int, prompt_len: int, max_tokens: int,
              kind: str = "full") -> Any:
        """`jax.jit(...).lower` of one generation call (prefill + decode loop) for `rows`
        sequences of prompts up to `prompt_len` and `max_tokens` new tokens, on abstract
        `params` (sharded `jax.ShapeDtypeStruct`s): what `generate` compiles, for the
        compile tool."""
        B, P, M = self.batch_bucket(rows), bucket(prompt_len), bucket(max_tokens)

        def spec(shape: tuple[int, ...], dtype: Any, batched: bool) -> jax.ShapeDtypeStruct:
            sharding = None if self.mesh is None else NamedSharding(
                self.mesh, PartitionSpec(("data", "fsdp")) if batched else PartitionSpec())
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        batched = [spec(s, d, True) for s, d in (((B, P), np.int32), ((B, P), np.int32),
                                                 ((B,), np.bool_))]
        hash_sample = [spec((B,), np.uint32, True), spec((B,), np.int32, True)]
        shared = [spec(s, d, False) for s, d in (
            (self.stop_ids.shape, np.int32), ((), np.uint32), ((), np.int32),
            ((), np.float32), ((), np.int32), ((), np.float32))]
        with mesh_context(self.mesh):
            return self._fn.lower(self.graphdef, params, *batched, shared[0], shared[1],
                                  *hash_sample, *shared[2:], new_bucket=M, kind=kind)
