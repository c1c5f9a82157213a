"""The jitted, sharded policy update and the forward-only log-prob recomputation.

A mini-batch is a dict of [N, T] arrays, N rows of T tokens (`dapo_jax.train.batch`: one
padded sequence per row, or several packed ones): input_ids, segment_ids, positions,
loss_mask (1 on response tokens that train), old_logprobs, advantages, and optionally
ref_logprobs (KL loss) and rollout_logprobs (TIS). Per-token arrays are aligned with
input_ids: entry t belongs to token t, predicted from the tokens before it in its sequence.

The mini-batch is split into micro-batches of `micro_batch_rows` rows inside the jitted step
(`lax.scan`; a packed mini-batch's row count, and so its number of micro-batches, varies
with the lengths, in a few buckets), gradients are summed, and every micro-batch's loss is
divided by the normaliser of the WHOLE mini-batch (`reduction_denominator` of the full loss
mask), so the gradient does not depend on how the mini-batch is split into micro-batches,
rows or devices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dapo_jax.models.config import QwenConfig
from dapo_jax.models.logprobs import token_logprobs
from dapo_jax.models.qwen import REMAT_ORDER, Precision, Qwen, state_shardings
from dapo_jax.sharding import batch_sharding, constrain, mesh_context
from dapo_jax.train import objective
from dapo_jax.train.objective import LossConfig

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "old_logprobs",
              "advantages")


# ----------------------------------------------------------------------------- optimiser
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`trainer.policy.optimizer_config` (SkyRL's keys) and the one place of their defaults
    (`train/config.py` reads them), plus the run's length in optimiser steps. Checked once,
    when built: a bad value is a ValueError starting with its key."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    num_warmup_steps: int = 0
    scheduler: str = "constant"  # constant | cosine (after the linear warmup)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    total_steps: int = 0  # optimiser steps of the run, for cosine decay

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler: {self.scheduler!r} is not constant or cosine")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.weight_decay < 0 or self.num_warmup_steps < 0:
            raise ValueError("weight_decay and num_warmup_steps: must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: two values in [0, 1), got {self.adam_betas}")

    def for_run(self, optimizer_steps: int) -> OptimizerConfig:
        """These settings for a run of `optimizer_steps` (at least one past the warmup, so
        that a cosine schedule has something to decay over)."""
        return dataclasses.replace(self, total_steps=max(optimizer_steps,
                                                         self.num_warmup_steps + 1))


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup lr * (t + 1) / warmup for t < warmup (the first step is not wasted at
    lr 0), then constant, or cosine down to 0 at total_steps."""
    warmup = cfg.num_warmup_steps
    warm = lambda t: cfg.lr * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1))
    if cfg.scheduler == "constant":
        return warm
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - warmup, 1))
    return lambda t: jnp.where(t < warmup, warm(t), decay(t - warmup))


def decay_mask(params: Any) -> Any:
    """True where AdamW's decoupled weight decay applies: the weight matrices (embedding,
    projections, LM head), not RMSNorm scales or q/k/v biases (the usual choice of GPT-2,
    nanoGPT and MaxText: decaying a norm scale pulls it towards 0, not towards identity).
    SkyRL decays every parameter; at the seed runs' lr 1e-6 x weight_decay 0.1 over ~5k
    optimiser steps either choice shrinks a weight by under 0.05%."""
    def keep(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", "")) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule (lr is in the state, for metrics).

    The mask is a static argument: `inject_hyperparams` otherwise takes every callable for
    a schedule and calls it with the step count (the state then held `mask: True` and every
    parameter was decayed). Hyperparameters are float32 whatever the parameter dtype (by
    default they take the parameters' dtype)."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",),
                                     hyperparam_dtype=jnp.float32)(
        learning_rate=lr_schedule(cfg), b1=cfg.adam_betas[0], b2=cfg.adam_betas[1], eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


# ----------------------------------------------------------------------------- log-probs
def sequence_logprobs(model: Qwen, input_ids: jax.Array, segment_ids: jax.Array,
                      positions: jax.Array | None = None, *, temperature: float = 1.0
                      ) -> tuple[jax.Array, jax.Array]:
    """log p(token_t | earlier tokens of its sequence) and the entropy of that next-token
    distribution, [N, T] float32, aligned with input_ids (entry 0 has no prediction and is 0;
    the first token of a packed sequence gets a meaningless value, which its loss mask, 0 on
    prompt tokens, drops)."""
    h = model.hidden_states(input_ids, segment_ids, positions)
    logp, entropy = token_logprobs(h[:, :-1], model.lm_head_weight(), input_ids[:, 1:],
                                   temperature=temperature)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad(logp), pad(entropy)


def _split(x: jax.Array, micro_rows: int | None) -> jax.Array:
    """[N, ...] -> [M, N/M, ...] with N/M = micro_rows (None, or N < micro_rows: one
    micro-batch); row i goes to micro-batch i % M so each micro-batch keeps the batch
    sharding of the rows (the sum over micro-batches does not care which rows)."""
    n = x.shape[0]
    micro_rows = min(micro_rows or n, n)
    if n % micro_rows:
        raise ValueError(f"batch of {n} rows does not split into micro-batches of "
                         f"{micro_rows} rows")
    num_micro = n // micro_rows
    x = x.reshape(micro_rows, num_micro, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def _unsplit(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class TrainFns:
    """The two jitted functions the trainer calls (see `make_train_fns`), run under the
    mesh so that activation constraints apply when they are traced."""

    update_jit: Any
    logprobs_jit: Any
    mesh: jax.sharding.Mesh | None = None

    def put(self, rows: Any) -> Any:
        """Host rows (any pytree of [N, ...] arrays) as global arrays split over the batch
        axes, in one explicit transfer: every process passes the same host values and
        places its own devices' shards (jit refuses numpy inputs with a non-trivial
        sharding). Arrays already on the devices stay where they are."""
        if self.mesh is None:
            return jax.device_put(rows)
        return jax.device_put(rows, batch_sharding(self.mesh))

    def update(self, params: Any, opt_state: Any, batch: Any
               ) -> tuple[Any, Any, dict[str, jax.Array]]:
        with mesh_context(self.mesh):
            return self.update_jit(params, opt_state, self.put(batch))

    def logprobs(self, params: Any, input_ids: Any, segment_ids: Any, positions: Any
                 ) -> jax.Array:
        with mesh_context(self.mesh):
            return self.logprobs_jit(params, *self.put((input_ids, segment_ids, positions)))

    def lower_update(self, params: Any, opt_state: Any, batch: Any) -> Any:
        """`jax.jit(...).lower` of the update on (abstract) inputs, under the mesh."""
        with mesh_context(self.mesh):
            return self.update_jit.lower(params, opt_state, batch)

    def lower_logprobs(self, params: Any, input_ids: Any, segment_ids: Any, positions: Any
                       ) -> Any:
        with mesh_context(self.mesh):
            return self.logprobs_jit.lower(params, input_ids, segment_ids, positions)


def make_train_fns(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    optimizer: optax.GradientTransformation,
    loss_cfg: LossConfig,
    *,
    micro_batch_rows: int | None = None,
    forward_micro_batch_rows: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainFns:
    """Builds the jitted update and log-prob functions for parameters laid out like `params`.

    update(params, opt_state, batch) -> (params, opt_state, metrics): one optimiser step on a
    mini-batch in micro-batches of `micro_batch_rows` rows (over all devices; None: the whole
    mini-batch at once); params and opt_state are donated.
    logprobs(params, input_ids, segment_ids, positions) -> logp [N, T]: forward only, in
    micro-batches of `forward_micro_batch_rows` rows (the last one filled with empty rows;
    the forward pass keeps no activations for a backward, so its micro-batches are usually
    larger: `trainer.micro_forward_batch_size_per_gpu`). No entropy: nothing reads it.
    """
    def loss_fn(params: nnx.State, mb: Batch, denominator: jax.Array, sequences: jax.Array):
        model = nnx.merge(graphdef, params)
        logp, entropy = sequence_logprobs(model, mb["input_ids"], mb["segment_ids"],
                                          mb["positions"], temperature=loss_cfg.temperature)
        return objective.total_loss(logp, entropy, mb, loss_cfg, denominator=denominator,
                                    num_sequences_total=sequences)

    def update(params: nnx.State, opt_state: Any, batch: Batch):
        _check_batch(batch, loss_cfg)
        denominator = objective.reduction_denominator(
            batch["loss_mask"], loss_cfg.loss_reduction, loss_cfg.max_seq_len,
            batch["segment_ids"])
        sequences = objective.num_sequences(batch["loss_mask"], batch["segment_ids"])
        micro = {k: _split(v, micro_batch_rows) for k, v in batch.items()}
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(grads, mb):
            (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(
                params, mb, denominator, sequences)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return grads, {**metrics, "loss": loss}

        grads, per_micro = jax.lax.scan(body, zeros, micro)
        metrics = _combine_metrics(per_micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        lr = _current_lr(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return params, opt_state, metrics

    def logprobs(params: nnx.State, input_ids: jax.Array, segment_ids: jax.Array,
                 positions: jax.Array):
        model = nnx.merge(graphdef, params)
        fn = lambda rows: sequence_logprobs(model, *rows, temperature=loss_cfg.temperature)[0]
        n = input_ids.shape[0]
        micro_rows = min(forward_micro_batch_rows or n, n)
        extra = -(-n // micro_rows) * micro_rows - n  # empty rows (segment 0) fill the last
        rows = [jnp.pad(x, ((0, extra), (0, 0))) for x in (input_ids, segment_ids, positions)]
        return _unsplit(jax.lax.map(fn, tuple(_split(x, micro_rows) for x in rows)))[:n]

    if mesh is None:
        return TrainFns(jax.jit(update, donate_argnums=(0, 1)), jax.jit(logprobs))

    param_sh = jax.tree.map(lambda x: x.sharding, params)
    batch_sh = batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = optimizer_shardings(optimizer, params)
    update_jit = jax.jit(update, donate_argnums=(0, 1),
                         in_shardings=(param_sh, opt_sh, batch_sh),
                         out_shardings=(param_sh, opt_sh, replicated))
    logprobs_jit = jax.jit(logprobs, in_shardings=(param_sh, batch_sh, batch_sh, batch_sh),
                           out_shardings=batch_sh)
    return TrainFns(update_jit, logprobs_jit, mesh)


def _current_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate `inject_hyperparams` recorded for this step (None without it)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
    values = [v for _, v in found if isinstance(v, jax.Array)]
    return values[0] if values else None


def _check_batch(batch: Batch, loss_cfg: LossConfig) -> None:
    needed = list(BATCH_KEYS)
    if loss_cfg.use_kl_loss:
        needed.append("ref_logprobs")
    if loss_cfg.use_tis:
        needed.append("rollout_logprobs")
    missing = [k for k in needed if k not in batch]
    if missing:
        raise ValueError(f"mini-batch is missing {missing} (has {sorted(batch)})")
    shape = batch["input_ids"].shape
    bad = {k: v.shape for k, v in batch.items() if v.shape != shape}
    if bad:
        raise ValueError(f"mini-batch arrays must all be {shape} like input_ids, got {bad}")


def _combine_metrics(per_micro: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Losses (already divided by the mini-batch normaliser) add up over micro-batches;
    token-mean metrics are weighted by each micro-batch's token count."""
    tokens = per_micro["num_tokens"]
    total = jnp.sum(tokens)
    out = {}
    for k, v in per_micro.items():
        if k.endswith("loss") or k == "num_tokens":
            out[k] = jnp.sum(v)
        else:
            out[k] = jnp.sum(v * tokens) / jnp.maximum(total, 1.0)
    return out


def optimizer_shardings(optimizer: optax.GradientTransformation, params: nnx.State) -> Any:
    """Shardings of the optimiser state: moments take their parameter's sharding, counters
    and other scalars are replicated. None when `params` are not on a mesh."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(param_sh)[0]
    if not isinstance(first, jax.sharding.NamedSharding):
        return None
    replicated = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
        param_sh, transform_non_params=lambda _: replicated)


def init_optimizer(optimizer: optax.GradientTransformation, params: nnx.State) -> Any:
    """Optimiser state created in place, laid out by `optimizer_shardings`."""
    return jax.jit(optimizer.init, out_shardings=optimizer_shardings(optimizer, params))(params)


# ----------------------------------------------------------------------------- shapes only
def abstract_train_state(cfg: QwenConfig, precision: Precision, remat: str,
                         optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                         attention_impl: str = "auto") -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, optimiser state) as sharded `jax.ShapeDtypeStruct`s: nothing is
    allocated, so any model size compiles on a CPU."""
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=precision, remat=remat,
                                           attention_impl=attention_impl, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(with_sharding, state, state_shardings(state, mesh))
    opt_state = jax.tree.map(with_sharding, jax.eval_shape(optimizer.init, params),
                             optimizer_shardings(optimizer, params))
    return graphdef, params, opt_state


def abstract_batch(rows: int, seq_len: int, mesh: jax.sharding.Mesh,
                   keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, jax.ShapeDtypeStruct]:
    """A training (mini-)batch of `rows` x `seq_len`, sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    dtype = lambda k: jnp.int32 if k in ("input_ids", "segment_ids", "positions") else \
        jnp.float32
    return {k: jax.ShapeDtypeStruct((rows, seq_len), dtype(k), sharding=sharding)
            for k in keys}


def per_device_bytes(tree: Any, dtype: Any = None) -> float:
    """Bytes of one device's shards of an abstract (sharded) tree, in `dtype` if given."""
    return float(sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) *
                     jnp.dtype(dtype or leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def rollout_copy_bytes(params: Any, *, backend: str, model_dtype: str) -> float:
    """Bytes per device of the in-process engine's copy of `params` in the rollout dtype,
    which it keeps beside the trainer's state (a cast, or a copy in the same dtype: never
    the masters themselves, which the update donates); 0 when the engines are sidecars."""
    if backend != "jax":
        return 0.0
    return per_device_bytes(params, model_dtype)


# A compile-time out-of-memory (TPU: "HLO temporaries (20.18G) exceeds available HBM").
OUT_OF_MEMORY = re.compile(r"exceeds available HBM|RESOURCE_EXHAUSTED|[Oo]ut of memory")


def update_lowering(remat: str, *, model: QwenConfig, precision: Precision,
                    attention_impl: str, optimizer: optax.GradientTransformation,
                    loss: LossConfig, mesh: jax.sharding.Mesh, micro_rows: int,
                    forward_micro_rows: int, rows: int, seq_len: int) -> Callable[[], Any]:
    """The update of a `rows` x `seq_len` mini-batch on abstract weights of `model` with
    recompute policy `remat` (what `choose_remat` compiles each policy with), as a function
    that lowers it: the abstract state is built here, the lowering when called (the compile
    tool lowers under the target's default device, where the optimiser's set-up cannot
    run)."""
    graphdef, params, opt_state = abstract_train_state(model, precision, remat, optimizer,
                                                       mesh, attention_impl)
    fns = make_train_fns(graphdef, params, optimizer, loss, micro_batch_rows=micro_rows,
                         forward_micro_batch_rows=forward_micro_rows, mesh=mesh)
    batch = abstract_batch(rows, seq_len, mesh)
    return lambda: fns.lower_update(params, opt_state, batch)


def compiled_peak_bytes(compiled: Any) -> float:
    """A compiled program's peak per device by its compiler's memory analysis: arguments +
    outputs - donated (aliased) + temporaries."""
    mem = compiled.memory_analysis()
    return float(mem.argument_size_in_bytes + mem.output_size_in_bytes -
                 mem.alias_size_in_bytes + mem.temp_size_in_bytes)


# ----------------------------------------------------------------------------- recompute
# What a compiled peak must leave free of its budget (remat=auto here, the memory planner's
# suggested fraction): allocator fragmentation and what the compile does not see (on one
# H200 the GPU compiler's analysis was within 0.2% of the peak measured, the deviceless H100
# compile 1.1-1.6% under it; GPU_FACTS.md).
MEMORY_HEADROOM = 0.10


@dataclasses.dataclass(frozen=True)
class RematChoice:
    policy: str
    peaks: dict[str, float]  # policy -> compiled update peak per device (inf: out of memory)
    budget: float  # bytes per device the update may use

    def describe(self) -> str:
        tried = ", ".join(f"{p} {b / 2**30:.2f}" for p, b in self.peaks.items())
        fits = self.peaks[self.policy] * (1 + MEMORY_HEADROOM) <= self.budget
        return (f"model.remat=auto: {self.policy} (update peak GiB per device: {tried}; budget "
                f"{self.budget / 2**30:.2f} GiB with {MEMORY_HEADROOM:.0%} to spare"
                f"{'' if fits else ': nothing fits'})")


def choose_remat(peak_of: Callable[[str], float], budget_bytes: float) -> RematChoice:
    """`model.remat=auto`: the policy with the least recompute (REMAT_ORDER: none,
    dots_saveable, minimal, full) whose update peak `peak_of(policy)` (compiled, bytes per
    device) plus MEMORY_HEADROOM fits `budget_bytes`; `full` when none does."""
    peaks: dict[str, float] = {}
    for policy in REMAT_ORDER:
        peaks[policy] = peak_of(policy)
        if peaks[policy] * (1 + MEMORY_HEADROOM) <= budget_bytes:
            return RematChoice(policy, peaks, budget_bytes)
    return RematChoice("full", peaks, budget_bytes)
