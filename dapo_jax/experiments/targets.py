"""Compiling the project's own functions for hardware that is not here, and reading the
compiled programs: the code behind `python -m dapo_jax.experiments.compile` and the mesh and
memory tools.

XLA compiles for a TPU (libtpu) or an NVIDIA GPU (the CUDA PJRT plugin with a target
description) from a CPU host; nothing runs. The compiled program's `memory_analysis()` is
that chip's compiler's own accounting, and its HLO names the collectives and the kernels
(custom calls) it will run. Without the plugins (`pip install -e ".[aot]"`) a target can
fall back to a compile over simulated CPU devices, labelled as such.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on a CPU host
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # two compiles at once
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dapo_jax.experiments.hlo import Program  # noqa: E402
from dapo_jax.experiments.lengths import length_mix  # noqa: E402
from dapo_jax.models import QwenConfig, preset, read_config  # noqa: E402,E501
from dapo_jax.models.kernels import (  # noqa: E402
    KernelUnavailable,
    attention_pairs,
    installed,
    platform_of,
    resolve_attention_impl,
)
from dapo_jax.models.qwen import abstract_params, parameter_layouts  # noqa: E402
from dapo_jax.placement import memory_budget, with_xla_flags  # noqa: E402
from dapo_jax.sharding import ReplicatedParameters, check_replication, make_mesh  # noqa: E402,E501
from dapo_jax.train import config as config_lib  # noqa: E402
from dapo_jax.train.config import GPU_XLA_FLAGS  # noqa: E402
from dapo_jax.train.settings import Settings  # noqa: E402
from dapo_jax.train.update import (  # noqa: E402
    OUT_OF_MEMORY,
    abstract_batch,
    abstract_train_state,
    choose_remat,
    compiled_peak_bytes,
    make_optimizer,
    make_train_fns,
    per_device_bytes,
    rollout_copy_bytes,
    update_lowering,
)
from rollout.generation import Generator  # noqa: E402

GIB = 2**30
H100_DESCRIPTION = Path(__file__).resolve().parents[1] / "assets" / "targets" / \
    "h100_sxm_80gb.txtpb"
# Cloud TPU accelerator types: (libtpu topology, HBM per chip, dense bf16 FLOP/s per chip;
# TARGET_COMPILE.md). v5p types count TensorCores (two per chip): v5p-8 is 4 chips on one
# host, v5p-16 is 8 chips; v6e and v5e types count chips.
TPU_TARGETS: dict[str, tuple[str, float, float]] = {
    "v5p-8": ("v5p:2x2x1", 95 * GIB, 459e12),
    "v5p-16": ("v5p:2x2x2", 95 * GIB, 459e12),
    "v6e-8": ("v6e:2x4", 32 * GIB, 918e12),
    "v5e-8": ("v5e:2x4", 16 * GIB, 197e12),
}
GPU_TARGETS = {"h100x8": H100_DESCRIPTION}
TARGETS = (*GPU_TARGETS, *TPU_TARGETS, "local")


class TargetError(ValueError):
    """A target that cannot be compiled for (unknown, unparsable, plugin missing): the
    message names the problem and the fix, for a one-line error."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # tpu | gpu | cpu
    devices: tuple[Any, ...]
    memory_bytes: float  # per device
    device_kind: str
    fallback: str = ""  # why a CPU compile stands in for the target ("" if it does not)

    @property
    def label(self) -> str:
        if self.fallback:
            return f"{self.name} stood in by {len(self.devices)} CPU devices ({self.fallback})"
        return f"{self.name}: {len(self.devices)} x {self.device_kind}"


def versions() -> dict[str, str]:
    out = {}
    for dist in ("jax", "jaxlib", "libtpu", "jax-cuda13-pjrt", "jax-cuda13-plugin", "tokamax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _missing_plugin(name: str) -> str:
    if name in TPU_TARGETS:
        return "" if installed("libtpu") else "libtpu is not installed"
    return "" if installed("jax_plugins.xla_cuda13") else \
        "the CUDA PJRT plugin (jax-cuda13-pjrt) is not installed"


def local_target() -> Target:
    """This machine's own accelerators (JAX's default backend), compiled for for real: the
    check that the kernels compile for the local GPU or TPU. Memory is the trainer's budget
    on them (`placement.memory_budget`: a GPU's XLA_PYTHON_CLIENT_MEM_FRACTION of the chip)."""
    devices = jax.devices()
    return Target("local", platform_of(devices[0]), tuple(devices), memory_budget(devices),
                  devices[0].device_kind)


def get_target(name: str, *, cpu_fallback: bool = False, num_devices: int = 8,
               gpu_flags: tuple[str, ...] = GPU_XLA_FLAGS) -> Target:
    """The devices of target `name`: h100x8, v5p-8, v6e-8, v5e-8, a GPU target description
    file (a GpuTargetConfigProto in text form, 8 GPUs), or `local` (`local_target`). With
    `cpu_fallback`, a target whose plugin is not installed becomes `num_devices` CPU
    devices, labelled. A GPU program compiles with `gpu_flags` (the trainer's
    `trainer.xla_gpu_flags`) in XLA_FLAGS, set here before the first backend starts: XLA
    reads them once per process."""
    from jax.experimental import topologies

    if name not in TPU_TARGETS and name != "cpu":
        os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), gpu_flags)

    if name == "cpu":
        return _cpu_target("cpu", num_devices, "")
    if name == "local":
        return local_target()
    description = GPU_TARGETS.get(name) or (Path(name) if name not in TPU_TARGETS else None)
    if description is not None and name not in GPU_TARGETS and not description.is_file():
        raise TargetError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}, or the "
                          "path of a GPU target description (.txtpb)")
    missing = _missing_plugin(name)
    if missing:
        if cpu_fallback:
            return _cpu_target(name, num_devices, f"{missing}: pip install -e \".[aot]\"")
        raise TargetError(f"target {name}: {missing}; install the aot extra: "
                          "pip install -e \".[aot]\"")
    if name in TPU_TARGETS:
        topology, memory, _ = TPU_TARGETS[name]
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        return Target(name, "tpu", tuple(devices), memory, devices[0].device_kind)
    text = description.read_text()
    try:
        devices = topologies.get_topology_desc(platform="cuda", target_config=text,
                                               topology=f"1x1x{num_devices}").devices
    except Exception as e:  # the plugin's parse errors are plain RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"GPU target description {description} does not parse ({first}); "
                          f"see {H100_DESCRIPTION} for a working one") from None
    match = re.search(r"device_memory_size:\s*(\d+)", text)
    if not match:
        raise TargetError(f"GPU target description {description} has no device_memory_size")
    return Target(name if name in GPU_TARGETS else description.stem, "gpu", tuple(devices),
                  float(match.group(1)), devices[0].device_kind)


def _cpu_target(name: str, num_devices: int, fallback: str) -> Target:
    devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise TargetError(f"{num_devices} CPU devices are needed, {len(devices)} exist: set "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}")
    return Target(name, "cpu", tuple(devices[:num_devices]), 80e9, "cpu",
                  fallback or "this host")


# ----------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class FunctionReport:
    """One compiled function on one device of the target (bytes)."""

    name: str
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    alias_bytes: float = 0.0
    temp_bytes: float = 0.0
    peak_bytes: float = 0.0  # arguments + outputs - aliased (donated) + temporaries
    memory_bytes: float = 0.0  # the chip's
    resident_bytes: float = 0.0  # other buffers of the process live during the call
    fits: bool = False  # peak + resident within the chip's memory
    collective_bytes: float = 0.0
    # Dot FLOPs per call as compiled (loops counted per iteration, recompute included;
    # dapo_jax.experiments.hlo), and the asynchronous collectives, with how many of them have
    # compute scheduled between start and done.
    flops: float = 0.0
    remat: str = ""  # the policy compiled (model.remat, or what auto chose)
    full_flops: float = 0.0  # the update's FLOPs under remat=full, when auto chose another
    async_collectives: int = 0
    overlapped_collectives: int = 0
    attention: str = "xla"  # the kernels' custom-call targets found, or "xla"
    kernel_names: list[str] = dataclasses.field(default_factory=list)  # Program.kernel_names
    compile_s: float = 0.0
    # generate: one decode step (`Generator.lower_step`), per device: XLA's bytes accessed,
    # and the weights + KV it would read with every row at the mix's mean live length.
    step_bytes: float = 0.0
    live_bytes: float = 0.0
    # Copies of at least `loop_copy_min_bytes` (compile_report's) inside loop bodies.
    loop_copy_bytes: float = 0.0
    error: str = ""  # a compile-time out-of-memory: the compiler's words
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # decisions, e.g. remat=auto's

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_report(name: str, lower: Callable[[], Any], target: Target, *,
                   requested_kernel: str, global_rows: int, local_rows: int,
                   resident_bytes: float = 0.0,
                   loop_copy_min_bytes: float = math.inf) -> FunctionReport:
    """Lowers and compiles `lower()` for `target` and reads the program: memory, collective
    bytes, attention kernels. A compile-time out-of-memory is reported (fits False, the
    compiler's message), any other error is raised. Warns when `requested_kernel` (a
    resolved attention_impl other than xla) is absent, or when a kernel's results have the
    global batch (`global_rows` != `local_rows`: it was not partitioned). It fits when its
    peak plus `resident_bytes` (what the process holds beside the call) is within the chip's
    memory. Copies of at least `loop_copy_min_bytes` in loop bodies are counted
    (`loop_copy_bytes`) and warned about."""
    report = FunctionReport(name, memory_bytes=target.memory_bytes,
                            resident_bytes=resident_bytes)
    start = time.perf_counter()
    try:
        # tokamax finds the device it compiles for from the default device.
        with jax.default_device(target.devices[0]):
            compiled = lower().compile()
    except Exception as e:
        if not OUT_OF_MEMORY.search(str(e)):
            raise
        report.compile_s = time.perf_counter() - start
        report.error = next(line for line in str(e).splitlines()
                            if OUT_OF_MEMORY.search(line)).strip()
        asked = re.findall(r"\(([\d.]+)G\)", report.error)
        report.peak_bytes = float(asked[0]) * 1e9 if asked else math.inf
        return report
    report.compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    report.argument_bytes = float(mem.argument_size_in_bytes)
    report.output_bytes = float(mem.output_size_in_bytes)
    report.alias_bytes = float(mem.alias_size_in_bytes)
    report.temp_bytes = float(mem.temp_size_in_bytes)
    report.peak_bytes = compiled_peak_bytes(compiled)
    report.fits = report.peak_bytes + resident_bytes <= target.memory_bytes
    program = Program.parse(compiled.as_text())  # read once: a full-size program is MBs
    report.collective_bytes = program.collective_bytes()
    report.flops = program.flops()
    report.async_collectives, report.overlapped_collectives = program.async_collectives()
    report.loop_copy_bytes = program.loop_copy_bytes(loop_copy_min_bytes)
    if report.loop_copy_bytes:
        report.warnings.append(f"a loop copies {report.loop_copy_bytes / 1e9:.3g} GB per "
                               "iteration (a layout change XLA repeats every iteration)")
    calls = program.kernel_calls()
    report.attention = ",".join(sorted({c for c, _ in calls})) or "xla"
    report.kernel_names = program.kernel_names()
    if requested_kernel != "xla" and not calls:
        report.warnings.append(f"{requested_kernel} attention was requested but no kernel is "
                               "in the compiled program (it runs in XLA)")
    if global_rows != local_rows and any(
            shapes and shapes[0] and shapes[0][0] == global_rows for _, shapes in calls):
        report.warnings.append(f"an attention kernel's results have the global batch "
                               f"({global_rows} rows, {local_rows} per device): it is not "
                               "partitioned")
    return report


def decode_step_report(report: FunctionReport, generator: Generator, params: Any, rows: int,
                       target: Target, s: Settings, model: QwenConfig, dp: int) -> None:
    """Compiles one decode step of the engine at the batch and KV pool of `report`'s call
    and adds its bytes to `report`: XLA's cost analysis (`bytes accessed`, per device)
    against what the step must read, the weights plus each row's live KV with the rows at
    the mean length of DAPO's mix at the config's limits (`experiments.lengths`)."""
    prompt_limit, limit = s.rollout.max_prompt_length, s.rollout.max_generate_length
    B, _, S, _ = generator.shapes(rows, prompt_limit, limit)
    with jax.default_device(target.devices[0]):
        compiled = generator.lower_step(params, rows, prompt_limit, limit).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # A deviceless GPU compile has no cost analysis (the plugin needs its device for it).
    report.step_bytes = float(cost.get("bytes accessed", 0.0)) if cost else math.nan
    prompt, response = length_mix(4096, np.random.default_rng(0), scale=max(1, limit // 1024))
    live = float(np.mean(np.minimum(prompt, prompt_limit) + np.minimum(response, limit)))
    column = 2 * model.num_layers * model.num_kv_heads * model.head_dim * \
        jnp.dtype(s.rollout.model_dtype).itemsize  # K and V of one token, every layer
    weights = per_device_bytes(params)
    report.live_bytes = weights + B / dp * live * column
    pool = B / dp * S * column
    counted = (f"XLA's cost analysis counts {report.step_bytes / 1e9:.2f} GB per device "
               f"({report.step_bytes / report.live_bytes:.2f}x what it must read)"
               if cost else "XLA has no cost analysis for this target")
    report.notes.append(
        f"a decode step at batch {B} ({B // dp} rows per device), KV pool {S:,} columns "
        f"({pool / 1e9:.2f} GB per device) must read the weights ({weights / 1e9:.2f} GB) + "
        f"the live KV at the mix's mean length of {live:,.0f} tokens "
        f"({(report.live_bytes - weights) / 1e9:.2f} GB) = {report.live_bytes / 1e9:.2f} GB "
        f"per device; {counted}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--config.a.b=value` arguments as {"a.b": value} (Python literals, else strings)."""
    out = {}
    for item in items:
        if not item.startswith("--config.") or "=" not in item:
            raise config_lib.ConfigError(f"unexpected argument {item!r} (overrides are "
                                         "--config.a.b=value)")
        key, value = item.removeprefix("--config.").split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_run(config: str, overrides: dict[str, Any], preset_name: str
             ) -> tuple[Settings, QwenConfig]:
    """The settings of a config file with its overrides (dotted keys), and the model's
    shape: a preset, or model.path's config.json (positions raised to the config's row
    length). The checks that need the devices are the target's (`compile_config`)."""
    if not Path(config).is_file():
        raise config_lib.ConfigError(f"--config {config} does not exist")
    cfg = config_lib.load_config_file(config)
    try:
        config_lib.apply_overrides(cfg, overrides)
    except (AttributeError, KeyError) as e:
        raise config_lib.ConfigError(f"unknown config key in the overrides: {e}") from None
    if preset_name:
        try:
            model = preset(preset_name)
        except KeyError as e:
            raise config_lib.ConfigError(str(e.args[0])) from None
    elif Path(cfg.model.path, "config.json").exists():
        model = read_config(cfg.model.path)
    else:
        raise config_lib.ConfigError(f"{cfg.model.path}/config.json does not exist here: pass "
                                     "--preset (qwen3-1.7b, qwen3-4b, qwen2.5-math-7b, ...)")
    seq = cfg.trainer.max_prompt_length + cfg.generator.sampling_params.max_generate_length
    if model.max_position_embeddings < seq:  # Qwen2.5-Math-7B's must be raised (README)
        model = QwenConfig(**{**model.__dict__, "max_position_embeddings": seq})
    return Settings.for_shapes(cfg, model), model


FUNCTIONS = ("update", "logprobs", "generate")


def attention_note(impl: str, T: int) -> str:
    """How much of the causal triangle `impl`'s attention computes for a row of T tokens
    (`kernels.attention_pairs`)."""
    if impl not in ("xla", "tokamax_mosaic", "splash"):
        return f"attention {impl}: its causal skip is not modelled here"
    ratio = attention_pairs(impl, T) / (T * (T + 1) / 2)
    return (f"attention {impl} computes {ratio:.2f}x the causal (query, key) pairs at {T:,} "
            "tokens a row (before skipping across packed segments)")


def compile_config(s: Settings, model: QwenConfig, target: Target, *,
                   attention_impl: str | None = None,
                   functions: tuple[str, ...] = FUNCTIONS) -> dict[str, FunctionReport]:
    """Compiles a run's own functions for `target` at the config's shapes and mesh, on
    abstract weights of `model`: the update of one mini-batch in its micro-batches, the
    old-log-prob pass over a step's rollout batch in forward micro-batches, and one call of
    the JAX generation engine (`generator.max_num_seqs` rows of max_prompt_length +
    max_generate_length tokens, prefill + decode loop).

    `resident_bytes` in each report counts what else the trainer process holds meanwhile
    (AdamW moments during the log-prob pass; with the in-process engine, its
    `generator.model_dtype` copy of the weights during updates, and the masters and moments
    during generation), so `fits` is the process's peak against the chip's memory."""
    try:
        sizes = s.sizes(len(target.devices))
    except config_lib.ConfigError as e:
        fix = "; pass --config.mesh.shape=(1,-1,1) or another shape that fits it" if \
            str(e).startswith("mesh.shape") else ""
        raise TargetError(f"{e} (target {target.name} has {len(target.devices)} "
                          f"devices){fix}") from None
    ro = s.rollout
    impl = attention_impl or s.model.attention_impl
    try:
        requested = resolve_attention_impl(impl, target.platform, device=target.devices[0],
                                           head_dim=model.head_dim,
                                           dtype=s.model.compute_dtype)
    except KernelUnavailable as e:
        raise TargetError(f"{e} (target {target.label})") from None
    impl = requested  # the model compiles what was decided here, warned about once
    mesh = make_mesh(s.mesh.shape, devices=list(target.devices))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    precision = s.model.precision
    try:  # said once, in the first function's report
        replicated = check_replication(
            parameter_layouts(abstract_params(model, precision), mesh), mesh,
            strict=s.mesh.strict)
    except ReplicatedParameters as e:
        raise TargetError(f"mesh.shape: {e}") from None
    optimizer = make_optimizer(s.optimizer.for_run(max(s.schedule.max_steps, 1) *
                                                   s.schedule.updates_per_step))
    loss = s.loss
    seq = ro.max_prompt_length + ro.max_generate_length
    # The most rows a mini-batch takes (every sequence its own row), in whole micro-batches,
    # as `dapo_jax.train.batch` lays them out; the log-prob pass runs per mini-batch too.
    whole = lambda n, micro: -(-n // micro) * micro
    mini_rows = whole(sizes.mini_rows, sizes.micro_rows)

    _, params, opt_state = abstract_train_state(model, precision, "none", optimizer, mesh, impl)
    masters, moments = per_device_bytes(params), per_device_bytes(opt_state)
    in_process = ro.backend == "jax"
    engine_copy = rollout_copy_bytes(params, backend=ro.backend, model_dtype=ro.model_dtype)
    lowering = functools.partial(
        update_lowering, model=model, precision=precision, attention_impl=impl,
        optimizer=optimizer, loss=loss, mesh=mesh, micro_rows=sizes.micro_rows,
        forward_micro_rows=sizes.forward_micro_rows, rows=mini_rows, seq_len=seq)
    updates: dict[str, FunctionReport] = {}  # remat policy -> the update compiled with it

    def update_report(remat: str) -> FunctionReport:
        if remat not in updates:
            updates[remat] = compile_report(
                "update", lowering(remat), target, requested_kernel=requested,
                global_rows=sizes.micro_rows, local_rows=sizes.micro_rows // dp,
                resident_bytes=engine_copy)
            updates[remat].remat = remat
        return updates[remat]

    remat, choice = s.model.remat, None
    if remat == "auto":
        # The trainer's share of the chip: the GPU's XLA_PYTHON_CLIENT_MEM_FRACTION, a TPU's
        # whole HBM; less the rollout copy the in-process engine keeps beside the update.
        share = s.trainer_memory_fraction() if target.platform == "gpu" else 1.0
        budget = share * target.memory_bytes - engine_copy
        if "update" in functions:
            choice = choose_remat(lambda p: update_report(p).peak_bytes, budget)
            remat = choice.policy
        else:
            remat = "full"  # the forward-only functions compile the same under any policy
    graphdef, params, opt_state = abstract_train_state(model, precision, remat, optimizer,
                                                       mesh, impl)
    fns = make_train_fns(graphdef, params, optimizer, loss,
                         micro_batch_rows=sizes.micro_rows,
                         forward_micro_batch_rows=sizes.forward_micro_rows, mesh=mesh)
    engine_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(ro.model_dtype), sharding=x.sharding),
        params)
    rollout_rows = s.schedule.train_batch_size * ro.n_samples_per_prompt
    reports = {}
    for name in functions:
        if name == "update":
            reports[name] = report = update_report(remat)
            if choice is not None and remat != "full":  # what auto's choice saves
                report.full_flops = update_report("full").flops
            if choice is not None:
                report.notes.append(choice.describe())
            report.notes.append(attention_note(requested, seq))
            continue
        if name == "logprobs":
            r = abstract_batch(mini_rows, seq, mesh,
                               keys=("input_ids", "segment_ids", "positions"))
            lower = lambda r=r: fns.lower_logprobs(params, r["input_ids"], r["segment_ids"],
                                                   r["positions"])
            rows, resident = sizes.forward_micro_rows, moments + engine_copy
        elif name == "generate":
            generator = Generator(graphdef, engine_params, stop_token_ids=[0],
                                  max_model_len=seq, mesh=mesh, max_num_seqs=ro.max_num_seqs)
            # `lower` buckets the sequence count as `generate` does (bucketing twice would
            # round 18 rows on 6 devices up to 36).
            seqs = min(ro.max_num_seqs, rollout_rows)
            B, _, S, _ = generator.shapes(seqs, ro.max_prompt_length, ro.max_generate_length)
            rows = B  # the pool's slots (`Generator.slots`)
            lower = lambda gen=generator, n=seqs: gen.lower(
                engine_params, n, ro.max_prompt_length, ro.max_generate_length)
            resident = masters + moments if in_process else 0.0
            # A copy of half the K (or V) pool in the decode loop is a per-step relayout.
            kv_shards = mesh.shape["tensor"] if model.num_kv_heads % mesh.shape["tensor"] \
                == 0 else 1
            copy_min = S * model.num_layers * B / dp * model.num_kv_heads / kv_shards * \
                model.head_dim * jnp.dtype(ro.model_dtype).itemsize / 2
        else:
            raise TargetError(f"unknown function {name!r}: one of {', '.join(FUNCTIONS)}")
        reports[name] = compile_report(name, lower, target, requested_kernel=requested,
                                       global_rows=rows, local_rows=rows // dp,
                                       resident_bytes=resident,
                                       loop_copy_min_bytes=copy_min if name == "generate"
                                       else math.inf)
        reports[name].remat = remat
        if name == "generate" and not reports[name].error:
            decode_step_report(reports[name], generator, engine_params, seqs, target, s,
                               model, dp)
        if name == "generate" and not in_process:
            reports[name].warnings.append(
                f"the run generates in {ro.sidecar_engine} sidecars (generator.backend="
                f"sidecar): this is the in-process JAX engine at {seqs} sequences of "
                f"{seq} tokens, for reference")
    if reports and replicated:
        next(iter(reports.values())).warnings.extend(replicated)
    return reports
