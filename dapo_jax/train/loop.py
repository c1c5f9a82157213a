"""The DAPO training loop (host side). One step:

    generate -> rewards -> dynamic sampling (draw until the batch is full)
    -> `step.train_step` (soft overlong punishment, advantages, overlong filtering, old
       log-probs, mini-batch updates) -> weight sync -> metrics, checkpoint, eval

`setup` builds everything once from the typed settings (`settings.Settings`, read from the
config at the command line); `run` is the loop, each step replacing the frozen `TrainState`.
Everything inside jit lives in `update.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from dapo_jax import evaluation, multihost
from dapo_jax.models import QwenConfig, load_pretrained, read_config
from dapo_jax.models.checkpoint import save_hf
from dapo_jax.models.kernels import KernelUnavailable, platform_of, resolve_attention_impl
from dapo_jax.models.qwen import abstract_params, parameter_layouts
from dapo_jax.placement import memory_budget
from dapo_jax.prompts import PromptSet, load_prompt_set
from dapo_jax.rewards import RewardPool
from dapo_jax.sharding import ReplicatedParameters, check_replication, make_mesh
from dapo_jax.train import config as config_lib
from dapo_jax.train.checkpointing import Checkpointer, resolve_resume
from dapo_jax.train.dynamic_sampling import DynamicSamplingState, accumulate
from dapo_jax.train.metrics_log import MetricsLog, device_memory, route_library_logs
from dapo_jax.train.settings import DataSettings, ModelSettings, Settings, Sizes
from dapo_jax.train.step import StepSettings, TrainState, train_step
from dapo_jax.train.update import (
    OUT_OF_MEMORY,
    TrainFns,
    abstract_train_state,
    choose_remat,
    compiled_peak_bytes,
    init_optimizer,
    make_optimizer,
    make_train_fns,
    rollout_copy_bytes,
    update_lowering,
)
from rollout.engines import Engine, InProcessEngine, SidecarEngine
from rollout.generation import stop_token_ids
from rollout.worker import (
    GenerationBatch,
    Position,
    RolloutWorker,
    WorkerSettings,
    reward_metrics,
    staleness,
)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The trained model's pieces: its structure, the jitted update and log-prob functions,
    the optimiser, and the reference weights (KL loss only; never trained)."""

    graphdef: nnx.GraphDef
    fns: TrainFns
    optimizer: optax.GradientTransformation
    ref_params: Any


@dataclasses.dataclass
class Run:
    """The pieces of a run, built by `setup`."""

    settings: Settings
    run_dir: Path
    primary: bool  # process 0 writes files
    tokenizer: Any
    train_set: PromptSet
    val_set: PromptSet | None
    max_steps: int
    policy: Policy
    state: TrainState  # what each step replaces
    engine: Engine
    rewards: RewardPool
    ckpt: Checkpointer
    worker: RolloutWorker
    step_settings: StepSettings
    start_step: int = 0
    lock: Any = None  # the run directory's lock file, held while the run lives

    def close(self) -> None:
        self.worker.close()
        self.rewards.close()
        self.ckpt.close()
        if self.lock is not None:
            self.lock.close()  # releases the flock


def prompt_set(data: DataSettings, tokenizer: Any, split: str) -> PromptSet:
    """The run's training (split "train") or held-out ("eval") prompts."""
    return load_prompt_set(
        data.train_data if split == "train" else data.val_data, tokenizer, split=split,
        builtin_size=data.builtin_train_size if split == "train" else data.builtin_val_size,
        seed=data.seed, max_prompt_length=data.max_prompt_length,
        on_overlong=data.overlong_prompts)


def use_compilation_cache(cache_dir: str) -> bool:
    """Turns on JAX's persistent compilation cache in `cache_dir` ("" : off), except on more
    than one CPU device: there XLA:CPU (jaxlib 0.10.2) programs loaded from the cache
    deadlock in their collectives (one device reaches an all-gather while the others wait
    in an all-reduce; the rendezvous aborts the process after 40 s), while the same
    programs compiled fresh run. Returns whether the cache is on."""
    if not cache_dir:
        return False
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        if multihost.is_primary():
            print(f"trainer.compilation_cache_dir is not used on {jax.device_count()} CPU "
                  "devices: XLA:CPU programs with collectives loaded from the cache "
                  "deadlock", file=sys.stderr)
        return False
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).expanduser()))
    # Small programs too: the first step compiles a dozen of 0.2-3 s each on CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return True


def split_devices(per_process: int) -> tuple[list[jax.Device], list[jax.Device]]:
    """The trainer's devices (the first `per_process` of every process's, one global mesh)
    and this process's others (its engine's own generation mesh; none when colocated)."""
    by_process: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    trainer = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    return trainer, by_process[jax.process_index()][per_process:]


def attention_impl(model: ModelSettings, device: jax.Device) -> str:
    """`model.attention_impl` decided for the trainer's chips before anything is computed:
    `auto`'s choice (XLA, with a one-line warning, where no kernel compiles for the chip,
    the compute dtype or the head size), or the kernel asked for, which must compile there
    (else a ConfigError naming the reason and the fix)."""
    try:
        return resolve_attention_impl(model.attention_impl, platform_of(device), device=device,
                                      head_dim=read_config(model.path).head_dim,
                                      dtype=model.compute_dtype)
    except KernelUnavailable as e:
        raise config_lib.ConfigError(str(e)) from None


def check_layout(s: Settings, meshes: list[jax.sharding.Mesh], primary: bool) -> None:
    """A warning on stderr for each parameter a mesh (the trainer's, the in-process
    engine's own) replicates against its rule; with `mesh.strict` a ConfigError instead,
    before any weight is loaded."""
    params = abstract_params(read_config(s.model.path), s.model.precision)
    warn = (lambda line: print(f"warning: {line}", file=sys.stderr)) if primary else None
    for mesh in meshes:
        try:
            check_replication(parameter_layouts(params, mesh), mesh, strict=s.mesh.strict,
                              warn=warn)
        except ReplicatedParameters as e:
            raise config_lib.ConfigError(f"mesh.shape: {e}") from None


def remat_policy(s: Settings, model_cfg: QwenConfig, impl: str, mesh: jax.sharding.Mesh,
                 devices: list[jax.Device], sizes: Sizes,
                 optimizer: optax.GradientTransformation) -> str:
    """`model.remat`, or for `auto` the policy with the least recompute whose update, compiled
    here for these devices, fits their memory (less the in-process engine's rollout copy):
    `update.choose_remat`, the compile tool's rule; decided on process 0, said once."""
    if s.model.remat != "auto":
        return s.model.remat
    seq = s.rollout.max_prompt_length + s.rollout.max_generate_length
    micro = sizes.micro_rows
    rows = -(-sizes.mini_rows // micro) * micro  # the most a mini-batch lays out
    _, params, _ = abstract_train_state(model_cfg, s.model.precision, "none", optimizer, mesh,
                                        impl)
    engine_copy = rollout_copy_bytes(params, backend=s.rollout.backend,
                                     model_dtype=s.rollout.model_dtype)

    def peak(policy: str) -> float:
        lower = update_lowering(policy, model=model_cfg, precision=s.model.precision,
                                attention_impl=impl, optimizer=optimizer, loss=s.loss,
                                mesh=mesh, micro_rows=micro,
                                forward_micro_rows=sizes.forward_micro_rows, rows=rows,
                                seq_len=seq)
        try:
            return compiled_peak_bytes(lower().compile())
        except Exception as e:  # a compile-time out-of-memory (TPU) does not fit
            if not OUT_OF_MEMORY.search(str(e)):
                raise
            return math.inf

    choice = multihost.from_primary(
        lambda: choose_remat(peak, memory_budget(devices) - engine_copy))
    if multihost.is_primary():
        print(choice.describe(), file=sys.stderr, flush=True)
    return choice.policy


# ----------------------------------------------------------------------------- set-up
def join(s: Settings) -> tuple[int, Sizes, bool, Any]:
    """This process into the run: its log file, the multi-process job (if any), the
    compilation cache, the run directory's lock and config.json. Returns the trainer's
    devices per process, the batch splits on them, whether this is process 0, the lock."""
    run_dir = s.checkpoint.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    process = s.mesh.process_label
    route_library_logs(run_dir / "logs" / (
        "trainer.log" if process == 0 else f"trainer_{process}.log"))
    multihost.initialize(s.mesh.distributed)
    use_compilation_cache(s.placement.compilation_cache_dir)
    per_process = s.trainer_devices(jax.local_device_count())
    sizes = s.sizes(per_process * jax.process_count())
    s.require_sidecars()
    primary = multihost.is_primary()
    lock = lock_run_dir(run_dir) if primary else None
    if primary:
        (run_dir / "config.json").write_text(s.config_json)
    return per_process, sizes, primary, lock


def build_meshes(s: Settings, per_process: int, primary: bool
                 ) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh, list[jax.Device], str]:
    """The trainer's mesh (the first `per_process` devices of every process), the
    in-process engine's (this process's other devices; the trainer's when colocated), this
    process's trainer devices, and the attention decided for them."""
    trainer_devices, own_devices = split_devices(per_process)
    mesh = make_mesh(s.mesh.shape, trainer_devices)
    impl = attention_impl(s.model, trainer_devices[0])
    if primary and platform_of(trainer_devices[0]) == "gpu":  # in effect since JAX started
        gpu_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if f.startswith("--xla_gpu")]
        print(f"XLA GPU flags (trainer.xla_gpu_flags): {' '.join(gpu_flags) or 'none'}",
              file=sys.stderr, flush=True)
    gen_mesh = make_mesh((-1, 1, s.rollout.inference_engine_tensor_parallel_size),
                         own_devices) if own_devices else mesh
    check_layout(s, [mesh] if gen_mesh is mesh else [mesh, gen_mesh], primary)
    local = [d for d in trainer_devices if d.process_index == jax.process_index()]
    return mesh, gen_mesh, local, impl


def build_policy(s: Settings, mesh: jax.sharding.Mesh, devices: list[jax.Device], impl: str,
                 sizes: Sizes, max_steps: int) -> tuple[Policy, TrainState]:
    """The policy loaded from model.path onto `mesh` (remat decided for `devices`), its
    optimiser state, and the jitted functions; the state at step 0."""
    m = s.model
    optimizer = make_optimizer(s.optimizer.for_run(max_steps * s.schedule.updates_per_step))
    remat = remat_policy(s, read_config(m.path), impl, mesh, devices, sizes, optimizer)
    load = lambda dtype: nnx.split(load_pretrained(
        m.path, dtype=dtype, compute_dtype=m.compute_dtype, remat=remat, attention_impl=impl,
        mesh=mesh))
    graphdef, params = load(m.param_dtype)
    # The reference policy never trains: its weights are kept in the compute dtype.
    ref_params = load(m.compute_dtype)[1] if s.loss.use_kl_loss else None
    fns = make_train_fns(graphdef, params, optimizer, s.loss,
                         micro_batch_rows=sizes.micro_rows,
                         forward_micro_batch_rows=sizes.forward_micro_rows, mesh=mesh)
    state = TrainState(params, init_optimizer(optimizer, params), step=0, version=0)
    return Policy(graphdef, fns, optimizer, ref_params), state


def build_engine(s: Settings, policy: Policy, state: TrainState, gen_mesh: jax.sharding.Mesh,
                 mesh: jax.sharding.Mesh, pad_id: int) -> Engine:
    """The rollout engine: the in-process JAX engine (on `gen_mesh`, serving a copy of the
    weights in generator.model_dtype) or the sidecars' client."""
    r = s.rollout
    if r.backend == "jax":
        return InProcessEngine(
            policy.graphdef, state.params, r.model_dtype,
            stop_token_ids=stop_token_ids(s.model.path), max_model_len=r.max_model_len,
            pad_token_id=pad_id, mesh=gen_mesh, own_mesh=gen_mesh is not mesh,
            max_num_seqs=r.max_num_seqs)
    return SidecarEngine(list(r.sidecar_urls), r.sidecar_token,
                         Path(r.export_dir or s.checkpoint.run_dir / "exports"), r.model_dtype,
                         retry_window_s=r.sidecar_startup_timeout_s)


def restore(s: Settings, ckpt: Checkpointer, state: TrainState
            ) -> tuple[TrainState, Position, bool]:
    """The checkpoint `trainer.resume_mode` names, restored into `state`'s structure and
    shardings, with the rollout worker's position; or `state` unchanged. Returns whether
    it restored."""
    c = s.checkpoint
    resume = resolve_resume(c.resume_mode, ckpt, c.resume_path)
    if resume is None:
        return state, Position(), False
    source = ckpt if resume[0] == ckpt.directory else Checkpointer(resume[0], keep=10**6)
    params, opt_state, host = source.restore(resume[1], state.params, state.opt_state)
    print(f"resumed from {resume[0]}/{resume[1]} (step {host['step']})")
    return (TrainState(params, opt_state, step=host["step"], version=host["weight_version"]),
            Position.from_host(host), True)


def setup(s: Settings) -> Run:
    """Joins the run, builds the meshes, data, policy, engine, rewards, checkpointer and
    rollout worker, and restores the last checkpoint if resuming."""
    per_process, sizes, primary, lock = join(s)
    mesh, gen_mesh, devices, impl = build_meshes(s, per_process, primary)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set = prompt_set(s.data, tokenizer, "train")
    val_set = prompt_set(s.data, tokenizer, "eval") if s.data.val_data else None
    max_steps = s.schedule.total_steps(len(train_set.examples))

    policy, state = build_policy(s, mesh, devices, impl, sizes, max_steps)
    engine = build_engine(s, policy, state, gen_mesh, mesh, pad_id)
    ckpt = Checkpointer(s.checkpoint.run_dir / "checkpoints",
                        keep=s.checkpoint.max_ckpts_to_keep)
    state, position, resumed = restore(s, ckpt, state)
    if resumed:  # a fresh run needs no sync: engines start on the base weights as version 0
        engine.load(engine.prepare(policy.graphdef, state.params, state.step, state.version),
                    state.version)
    bound = s.schedule.max_staleness_steps
    if bound > 0 and not s.loss.use_tis and primary:
        print("trainer.fully_async with max_staleness_steps > 0 and trainer.algorithm.use_tis="
              "false: the loss does not weight tokens by pi_prox / pi_behav (set use_tis=true "
              "for decoupled PPO's capped behaviour weight, objective.tis_weights)",
              file=sys.stderr)
    r = s.reward
    rewards = RewardPool(r.fn, workers=r.num_workers, timeout_s=r.timeout_s,
                         max_failure_frac=r.max_failure_frac)
    worker = RolloutWorker(
        engine, train_set, tokenizer, rewards, WorkerSettings(
            batch_size=s.schedule.train_batch_size,
            group_size=s.rollout.n_samples_per_prompt, sampling=s.rollout.sampling,
            seed=s.schedule.seed, ahead=bound,
            split="primary" if s.rollout.backend == "sidecar" else
            "share" if gen_mesh is not mesh else "collective"),
        version=state.version, position=position)
    return Run(
        settings=s, run_dir=s.checkpoint.run_dir, primary=primary, tokenizer=tokenizer,
        train_set=train_set, val_set=val_set, max_steps=max_steps, policy=policy,
        state=state, engine=engine, rewards=rewards, ckpt=ckpt, worker=worker,
        step_settings=StepSettings.from_settings(s, sizes=sizes, pad_id=pad_id),
        start_step=state.step, lock=lock)


def evaluate_policy(run: Run, step: int) -> dict[str, float]:
    """Held-out evaluation (`dapo_jax.evaluation`, as `python -m dapo_jax.eval`):
    eval_n_samples_per_prompt responses to every validation prompt, with the trainer's
    current weights (the rollout worker waits meanwhile); the summary and every sample go to
    <run_dir>/eval/step_<step>_{summary.json,samples.jsonl}."""
    if run.val_set is None:
        return {}
    r = run.settings.rollout
    with run.worker.serving(run.state.version) as generate:
        result = evaluation.evaluate(
            generate, run.val_set.ids, run.val_set.examples, r.eval_sampling,
            r.eval_n_samples_per_prompt, run.tokenizer, run.rewards)
    if run.primary:
        result.write(run.run_dir / "eval", name=f"step_{step}_")
    failures = sum(s["status"] != "ok" for s in result.samples)
    return {**result.metrics(), "eval/all/reward_failures": float(failures)}


def draw_batch(run: Run, step: int, timings: dict[str, float]
               ) -> tuple[dict[str, np.ndarray], DynamicSamplingState, list[GenerationBatch],
                          dict[str, float]]:
    """Generation batches from the rollout worker until dynamic sampling keeps
    `train_batch_size` prompt groups (one batch when it is off). A batch staler than the
    bound is never trained: it goes back to the worker to be generated again (counted). The
    batches' seeds depend on (seed, batch number), so a resumed run draws the batches that
    were not trained again exactly. Returns the batch, the dynamic-sampling counters, the
    generation batches this step took (kept or filtered: their reward metrics, their
    numbers) and the async metrics."""
    sched, alg = run.settings.schedule, run.settings.algorithm
    state = DynamicSamplingState()
    drawn: list[GenerationBatch] = []  # every batch this step took, for metrics
    waited, regenerated = 0.0, 0
    bar = tqdm(desc="generation batches", leave=False, disable=not show_bars(run.primary))
    while True:
        got, wait, handed_back = run.worker.next(step)
        waited += wait
        regenerated += sum(len(b.indices) for b in handed_back)
        for b in (*handed_back, got):
            for k, v in b.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        drawn.append(got)
        # The filter looks at correctness: raw scores, before overlong punishment.
        state, batch = accumulate(
            state, got.data, got.data["score"], kind=alg.dynamic_sampling,
            group_size=run.step_settings.group_size, train_batch_size=sched.train_batch_size,
            max_sample_batches=alg.max_sample_batches,
            min_replace_ratio=alg.min_replace_ratio,
            rng=np.random.default_rng([sched.seed, step]))
        bar.update(1)
        if batch is not None:
            bar.close()
            run.worker.step_done(len(drawn))  # the batches this step used
            stale = staleness(step, batch["weight_version"])
            return batch, state, drawn, {
                "async/staleness_mean": float(stale.mean()),
                "async/staleness_max": float(stale.max()),
                "async/stale_groups_regenerated": float(regenerated),
                "timing/trainer_idle": waited}


def export_policy(run: Run, step: int) -> None:
    """The policy as a Hugging Face directory in generator.model_dtype, at
    <run_dir>/hf/step_<step>: the one place the trainer's weights become an nnx module."""
    save_hf(nnx.merge(run.policy.graphdef, run.state.params),
            run.run_dir / "hf" / f"step_{step}", base_model=run.settings.model.path,
            dtype=run.settings.rollout.model_dtype)


def run(s: Settings) -> dict[str, float]:
    """Trains per `s`; returns the last step's metrics."""
    started = time.perf_counter()
    r = setup(s)
    c, lg = s.checkpoint, s.logging
    log = MetricsLog(r.run_dir, lg.logger, project=lg.project_name, run_name=lg.run_name,
                     config=json.loads(s.config_json), write=r.primary)
    if r.start_step == 0 and lg.eval_before_train:
        log.log(0, {**evaluate_policy(r, 0), "data/train_prompts": len(r.train_set.examples),
                    "data/dropped_overlong_prompts": r.train_set.dropped_overlong,
                    "data/duplicates_removed": r.train_set.duplicates}, echo=tqdm.write)
    metrics: dict[str, float] = {}
    evals: dict[int, float] = {}
    bar = tqdm(total=r.max_steps, initial=r.start_step, desc="steps",
               disable=not show_bars(r.primary))
    try:
        for step in range(r.start_step + 1, r.max_steps + 1):
            step_start = time.perf_counter()
            timings: dict[str, float] = {}
            batch, ds_state, drawn, async_metrics = draw_batch(r, step, timings)
            r.state, metrics = train_step(batch, r.state, ref_params=r.policy.ref_params,
                                          fns=r.policy.fns, settings=r.step_settings,
                                          timings=timings)
            start = time.perf_counter()
            # The engine takes these weights before its next batch (the worker's thread, or
            # inline at the next step's first batch); `prepare` copies or casts them before
            # the next update donates them.
            r.worker.publish(r.engine.prepare(r.policy.graphdef, r.state.params, step,
                                              r.state.version), r.state.version)
            timings["sync"] = time.perf_counter() - start
            metrics.update(async_metrics)
            metrics["timing/generator_idle"] = r.worker.take_idle()
            metrics.update(ds_state.metrics())
            metrics.update(reward_metrics(drawn, r.step_settings.group_size))
            metrics.update({f"timing/{k}": v for k, v in timings.items()})
            metrics.update(device_memory(jax.local_devices()))
            if r.primary:  # before its checkpoint: a checkpointed step always has its line
                record_trained_groups(r, step, batch, drawn)
            last = step == r.max_steps
            if c.ckpt_interval > 0 and (step % c.ckpt_interval == 0 or last):
                r.ckpt.save(step, r.state.params, r.state.opt_state, {
                    "step": step, "weight_version": r.state.version, **r.worker.state()})
            if c.hf_save_interval > 0 and (step % c.hf_save_interval == 0 or last):
                export_policy(r, step)
            if lg.eval_interval > 0 and (step % lg.eval_interval == 0 or last):
                metrics.update(evaluate_policy(r, step))
            metrics["timing/step"] = time.perf_counter() - step_start
            # Response tokens of the trained batch (after dynamic sampling) per second.
            metrics["throughput/trained_tokens_per_s"] = (
                metrics["generate/avg_response_length"] * len(batch["score"]) /
                metrics["timing/step"])
            log.log(step, metrics, echo=tqdm.write)
            if "eval/all/accuracy" in metrics:
                evals[step] = metrics["eval/all/accuracy"]
            bar.update(1)
        r.worker.flush(r.state.version)
    finally:
        bar.close()
        log.close()
        r.close()
    if r.primary:
        print(run_summary(r, evals, time.perf_counter() - started), flush=True)
    return metrics


def record_trained_groups(r: Run, step: int, batch: dict[str, np.ndarray],
                          drawn: list[GenerationBatch]) -> None:
    """Appends the step's line to <run_dir>/trained_groups.jsonl: the prompts it trained and
    the weight versions they were generated with, the generation batches it took (kept or
    filtered by dynamic sampling) and the batches handed back to be generated again, not
    trained yet. Over a run (a resumed step's line replacing the killed run's) every batch
    number is taken once or still pending: nothing lost, nothing twice."""
    n = r.step_settings.group_size
    with open(r.run_dir / "trained_groups.jsonl", "a") as f:
        f.write(json.dumps({
            "step": step, "prompt_index": batch["prompt_index"][::n].tolist(),
            "weight_version": batch["weight_version"][::n].tolist(),
            "batches": [b.number for b in drawn],
            "regenerate": sorted(r.worker.position.redo)}) + "\n")


class RunDirInUse(RuntimeError):
    pass


def lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock on <run_dir>/.lock for this trainer's lifetime (the kernel drops it
    when the process dies, kill -9 included): two trainers on one run directory would
    interleave metrics.jsonl and collide on checkpoint names. A second one refuses at once,
    naming the holder's pid."""
    import fcntl
    import os

    f = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirInUse(f"{run_dir} is in use by another trainer (pid {holder}); stop it or "
                          "set trainer.run_dir to another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def show_bars(primary: bool) -> bool:
    """Progress bars on a terminal only: in a log file (piped, under a scheduler) the
    per-step lines say it all."""
    return primary and sys.stderr.isatty()


def run_summary(r: Run, evals: dict[int, float], wall_s: float) -> str:
    """The end of a run: held-out accuracy, steps, wall time, where everything is."""
    first = _first_eval(r.run_dir)
    acc = "no held-out eval"
    if first is not None and evals:
        last = max(evals)
        acc = f"held-out accuracy {first[1]:.3f} (step {first[0]}) -> {evals[last]:.3f} " \
              f"(step {last})"
    hf = sorted((r.run_dir / "hf").glob("step_*"), key=lambda p: int(p.name[5:]))
    lines = [f"done: {r.max_steps} steps ({r.max_steps - r.start_step} this run) in "
             f"{wall_s / 60:.1f} min; {acc}",
             f"  metrics: {r.run_dir / 'metrics.jsonl'}",
             f"  checkpoints: {r.run_dir / 'checkpoints'}"]
    if hf:
        lines.append(f"  Hugging Face policy: {hf[-1]}")
    return "\n".join(lines)


def _first_eval(run_dir: Path) -> tuple[int, float] | None:
    """(step, accuracy) of the run's first held-out eval, from metrics.jsonl (a resumed run
    reports from where the whole run began)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "eval/all/accuracy" in row:
            return int(row["step"]), float(row["eval/all/accuracy"])
    return None
