"""The one reader of the config: `Settings.from_config(cfg)` turns the ConfigDict into frozen,
typed settings, one per concern, each checked once with its config key in every error.
Nothing below the command line sees the ConfigDict.

    model | mesh | placement | data | reward | rollout | schedule | algorithm | loss
    | optimizer | checkpoint | logging

`Settings.sizes(num_devices)` adds what depends on the trainer's devices (the batch splits).
The defaults live in `config.default_config()`, except the loss's and the optimiser's, which
live in `objective.LossConfig` and `update.OptimizerConfig` (the config reads them there).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from dapo_jax.models.config import QwenConfig
from dapo_jax.models.kernels import check_attention_impl
from dapo_jax.models.qwen import REMAT_ORDER, Precision
from dapo_jax.multihost import DistributedConfig
from dapo_jax.sharding import resolve_mesh_shape
from dapo_jax.train.config import ALONE_MEMORY_FRACTION, COLOCATED_TOTAL, ConfigError
from dapo_jax.train.dynamic_sampling import TYPES as DS_TYPES
from dapo_jax.train.objective import LossConfig
from dapo_jax.train.update import OptimizerConfig
from rollout.generation import SamplingParams

DTYPES = ("float32", "bfloat16")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _at_least(section: Any, prefix: str, keys: tuple[str, ...], low: float) -> None:
    for key in keys:
        if section[key] < low:
            _fail(f"{prefix}.{key}", f"must be >= {low}, got {section[key]}")


def _typed(prefix: str, build: Any) -> Any:
    """`build()`, a ValueError from a typed class ("key: message") re-raised with the
    section's prefix ("trainer.algorithm.key: message")."""
    try:
        return build()
    except ValueError as e:
        raise ConfigError(f"{prefix}.{e}") from None


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str  # a local Hugging Face directory
    param_dtype: str
    compute_dtype: str
    remat: str  # auto | one of REMAT_ORDER
    attention_impl: str
    max_position_embeddings: int  # the checkpoint's, from its config.json

    @property
    def precision(self) -> Precision:
        return Precision(self.param_dtype, self.compute_dtype)

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSettings:
        m = cfg.model
        if not m.path:
            _fail("model.path", "a local HF model directory is required")
        config_file = Path(m.path) / "config.json"
        if not config_file.exists():
            _fail("model.path", f"{config_file} does not exist")
        for key in ("param_dtype", "compute_dtype"):
            if m[key] not in DTYPES:
                _fail(f"model.{key}", f"{m[key]!r} is not one of {DTYPES}")
        if m.param_dtype != "float32":
            _fail("model.param_dtype", "the trained weights and AdamW state must be float32 "
                  "(bfloat16 master weights turn NaN at step 1 and cannot take steps below "
                  "~1e-4 of a weight); for bf16 compute set model.compute_dtype=bfloat16, and "
                  "generator.model_dtype=bfloat16 for bf16 rollout weights")
        if m.remat not in ("auto", *REMAT_ORDER):
            _fail("model.remat", f"{m.remat!r} is not auto or one of {', '.join(REMAT_ORDER)}")
        try:
            check_attention_impl(m.attention_impl)
        except (ValueError, ImportError) as e:
            _fail("model.attention_impl", str(e))
        max_pos = json.loads(config_file.read_text()).get("max_position_embeddings", 0)
        return cls(m.path, m.param_dtype, m.compute_dtype, m.remat, m.attention_impl, max_pos)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    shape: tuple[int, int, int]  # data x fsdp x tensor; one -1 fills the devices
    strict: bool  # replication against a rule is an error, not a warning
    distributed: DistributedConfig

    @classmethod
    def from_config(cls, cfg: Any) -> MeshSettings:
        m = cfg.mesh
        shape = tuple(m.shape)
        if len(shape) != 3:
            _fail("mesh.shape", f"must have 3 entries (data, fsdp, tensor), got {shape}")
        _at_least(m, "mesh", ("initialization_timeout_s", "heartbeat_timeout_s"), 1)
        if m.coordinator_address in ("", "auto"):
            if m.coordinator_address == "" and (m.num_processes != 1 or m.process_id != 0):
                _fail("mesh.coordinator_address", f"num_processes={m.num_processes} / "
                      f"process_id={m.process_id} need the coordinator's HOST:PORT (or "
                      "\"auto\")")
        else:
            host, _, port = m.coordinator_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                _fail("mesh.coordinator_address", f"{m.coordinator_address!r} is not "
                      "HOST:PORT")
            if m.num_processes < 1:
                _fail("mesh.num_processes", f"must be >= 1, got {m.num_processes}")
            if not 0 <= m.process_id < m.num_processes:
                _fail("mesh.process_id", f"{m.process_id} is not in [0, num_processes "
                      f"{m.num_processes})")
        return cls(shape, bool(m.strict), DistributedConfig(
            coordinator_address=m.coordinator_address or None, num_processes=m.num_processes,
            process_id=m.process_id, initialization_timeout_s=m.initialization_timeout_s,
            heartbeat_timeout_s=m.heartbeat_timeout_s))

    @property
    def process_label(self) -> int | str:
        """This process's number for its log file name ("auto": not known before JAX)."""
        d = self.distributed
        return "auto" if d.coordinator_address == "auto" else d.process_id or 0


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_data: str  # a .parquet/.jsonl file, or builtin:arithmetic
    val_data: str  # "" for none
    builtin_train_size: int
    builtin_val_size: int
    overlong_prompts: str  # drop | error
    max_prompt_length: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Any) -> DataSettings:
        d = cfg.data
        for key in ("train_data", "val_data"):
            path = d[key]
            if key == "train_data" and not path:
                _fail("data.train_data", "a dataset file or builtin:arithmetic is required")
            if path and not path.startswith("builtin:") and not Path(path).exists():
                _fail(f"data.{key}", f"{path} does not exist")
            if path.startswith("builtin:") and path != "builtin:arithmetic":
                _fail(f"data.{key}", f"unknown built-in task {path!r} (builtin:arithmetic)")
        if d.overlong_prompts not in ("drop", "error"):
            _fail("data.overlong_prompts", f"{d.overlong_prompts!r} is not drop or error")
        _at_least(d, "data", ("builtin_train_size", "builtin_val_size"), 1)
        _at_least(cfg.trainer, "trainer", ("max_prompt_length",), 1)
        return cls(d.train_data, d.val_data, d.builtin_train_size, d.builtin_val_size,
                   d.overlong_prompts, cfg.trainer.max_prompt_length, cfg.trainer.seed)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    fn: str  # dapo_math | boxed | arithmetic | package.module:function
    num_workers: int
    timeout_s: float
    max_failure_frac: float

    @classmethod
    def from_config(cls, cfg: Any) -> RewardSettings:
        r = cfg.reward
        _at_least(r, "reward", ("num_workers",), 1)
        if r.timeout_s <= 0:
            _fail("reward.timeout_s", f"must be > 0, got {r.timeout_s}")
        if not 0 <= r.max_failure_frac <= 1:
            _fail("reward.max_failure_frac", f"must be in [0, 1], got {r.max_failure_frac}")
        return cls(r.fn, r.num_workers, float(r.timeout_s), float(r.max_failure_frac))


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """`generator.*`: the engines and what they sample."""

    backend: str  # jax | sidecar
    sidecar_urls: tuple[str, ...]
    sidecar_token: str
    sidecar_engine: str  # vllm | jax
    sidecar_python: str
    num_inference_engines: int
    inference_engine_tensor_parallel_size: int
    gpu_memory_utilization: float
    sidecar_startup_timeout_s: float
    sidecar_max_restarts: int
    model_dtype: str
    export_dir: str
    max_num_seqs: int
    n_samples_per_prompt: int
    eval_n_samples_per_prompt: int
    apply_overlong_filtering: bool
    sampling: SamplingParams  # seeded per batch by the worker
    eval_sampling: SamplingParams  # seeded with trainer.seed
    max_prompt_length: int

    @property
    def max_generate_length(self) -> int:
        return self.sampling.max_tokens

    @property
    def max_model_len(self) -> int:
        """The longest sequence an engine serves: the prompt limit plus the longer of the
        training and eval generation limits."""
        return self.max_prompt_length + max(self.sampling.max_tokens,
                                            self.eval_sampling.max_tokens)

    @classmethod
    def from_config(cls, cfg: Any, max_position_embeddings: int) -> RolloutSettings:
        g, t = cfg.generator, cfg.trainer
        if g.backend not in ("jax", "sidecar"):
            _fail("generator.backend", f"must be 'jax' or 'sidecar', got {g.backend!r}")
        if g.sidecar_engine not in ("vllm", "jax"):
            _fail("generator.sidecar_engine", f"must be 'vllm' or 'jax', got "
                  f"{g.sidecar_engine!r}")
        _at_least(g, "generator", ("num_inference_engines",
                                   "inference_engine_tensor_parallel_size", "max_num_seqs"), 1)
        if g.n_samples_per_prompt < 1 or g.eval_n_samples_per_prompt < 1:
            _fail("generator.n_samples_per_prompt", "n_samples_per_prompt and "
                  "eval_n_samples_per_prompt must be >= 1")
        _at_least(g, "generator", ("sidecar_max_restarts",), 0)
        if g.sidecar_startup_timeout_s <= 0:
            _fail("generator.sidecar_startup_timeout_s", "must be > 0")
        if not 0 < g.gpu_memory_utilization < 1:
            _fail("generator.gpu_memory_utilization", f"must be in (0, 1), got "
                  f"{g.gpu_memory_utilization}")
        if g.model_dtype not in DTYPES:
            _fail("generator.model_dtype", f"{g.model_dtype!r} is not one of {DTYPES}")
        sampling = {}
        for name in ("sampling_params", "eval_sampling_params"):
            sp = g[name]
            sampling[name] = _typed(f"generator.{name}", lambda sp=sp: SamplingParams(
                temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                max_tokens=sp.max_generate_length, seed=t.seed))
            if t.max_prompt_length + sp.max_generate_length > max_position_embeddings:
                _fail(f"generator.{name}.max_generate_length", f"trainer.max_prompt_length "
                      f"{t.max_prompt_length} + max_generate_length {sp.max_generate_length} "
                      f"exceeds the model's max_position_embeddings {max_position_embeddings}")
        return cls(
            g.backend, tuple(g.sidecar_urls), g.sidecar_token, g.sidecar_engine,
            g.sidecar_python, g.num_inference_engines, g.inference_engine_tensor_parallel_size,
            float(g.gpu_memory_utilization), float(g.sidecar_startup_timeout_s),
            g.sidecar_max_restarts, g.model_dtype, g.export_dir, g.max_num_seqs,
            g.n_samples_per_prompt, g.eval_n_samples_per_prompt, g.apply_overlong_filtering,
            sampling["sampling_params"], sampling["eval_sampling_params"],
            t.max_prompt_length)


@dataclasses.dataclass(frozen=True)
class PlacementSettings:
    """Which devices and how much of each the trainer takes (`trainer.placement`,
    `trainer.xla_*`)."""

    colocate_all: bool
    policy_num_gpus_per_node: int
    xla_memory_fraction: float  # 0: follow the placement
    xla_gpu_flags: tuple[str, ...]
    compilation_cache_dir: str

    @classmethod
    def from_config(cls, cfg: Any) -> PlacementSettings:
        t = cfg.trainer
        if not 0 <= t.xla_memory_fraction <= 1:
            _fail("trainer.xla_memory_fraction", f"must be in [0, 1] (0: follow the "
                  f"placement), got {t.xla_memory_fraction}")
        _at_least(t.placement, "trainer.placement", ("policy_num_gpus_per_node",), 1)
        return cls(t.placement.colocate_all, t.placement.policy_num_gpus_per_node,
                   float(t.xla_memory_fraction), tuple(t.xla_gpu_flags),
                   t.compilation_cache_dir)


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """How many prompts a step trains and how they split: `trainer.*` batch keys, and the
    asynchronous bound."""

    seed: int
    max_steps: int  # 0: epochs passes over the training data
    epochs: float
    train_batch_size: int  # prompts per step
    policy_mini_batch_size: int  # prompts per optimiser step
    micro_train_batch_size_per_gpu: int
    micro_forward_batch_size_per_gpu: int
    update_epochs_per_batch: int
    use_sample_packing: bool
    max_staleness_steps: int  # trainer.fully_async's bound; 0 when it is off

    @classmethod
    def from_config(cls, cfg: Any) -> ScheduleSettings:
        t = cfg.trainer
        _at_least(t, "trainer", ("train_batch_size", "policy_mini_batch_size",
                                 "micro_train_batch_size_per_gpu",
                                 "micro_forward_batch_size_per_gpu",
                                 "update_epochs_per_batch"), 1)
        if t.train_batch_size % t.policy_mini_batch_size:
            _fail("trainer.train_batch_size", f"{t.train_batch_size} is not divisible by "
                  f"trainer.policy_mini_batch_size {t.policy_mini_batch_size}")
        if t.max_steps < 0:
            _fail("trainer.max_steps", "must be >= 0 (0: derive from trainer.epochs)")
        if t.epochs <= 0:
            _fail("trainer.epochs", f"must be > 0, got {t.epochs}")
        fa = t.fully_async
        if fa.max_staleness_steps < 0:
            _fail("trainer.fully_async.max_staleness_steps", f"must be >= 0, got "
                  f"{fa.max_staleness_steps}")
        if fa.enabled and t.placement.colocate_all:
            _fail("trainer.placement.colocate_all", "trainer.fully_async needs the engines "
                  "on devices the trainer does not use, or generation and training cannot "
                  "overlap: set trainer.placement.colocate_all=false")
        return cls(t.seed, t.max_steps, t.epochs, t.train_batch_size,
                   t.policy_mini_batch_size, t.micro_train_batch_size_per_gpu,
                   t.micro_forward_batch_size_per_gpu, t.update_epochs_per_batch,
                   t.use_sample_packing, fa.max_staleness_steps if fa.enabled else 0)

    def total_steps(self, num_train_prompts: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.floor(self.epochs * num_train_prompts / self.train_batch_size))

    @property
    def updates_per_step(self) -> int:
        return self.train_batch_size // self.policy_mini_batch_size * \
            self.update_epochs_per_batch


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings:
    """What happens to a batch before the loss: advantages, reward shaping, filters."""

    advantage_estimator: str  # grpo | rloo
    grpo_norm_by_std: bool
    overlong_buffer_len: int  # 0: no soft overlong punishment
    overlong_penalty_factor: float
    dynamic_sampling: str | None  # None (off) | filter | replace
    max_sample_batches: int
    min_replace_ratio: float

    @classmethod
    def from_config(cls, cfg: Any) -> AlgorithmSettings:
        alg, g = cfg.trainer.algorithm, cfg.generator
        if alg.advantage_estimator not in ("grpo", "rloo"):
            _fail("trainer.algorithm.advantage_estimator", f"{alg.advantage_estimator!r} is "
                  "not grpo or rloo")
        ds = alg.dynamic_sampling
        if (ds.type or None) not in DS_TYPES:
            _fail("trainer.algorithm.dynamic_sampling.type", f"{ds.type!r} is not '', filter "
                  "or replace")
        if not 0 <= ds.min_replace_ratio <= 1:
            _fail("trainer.algorithm.dynamic_sampling.min_replace_ratio", "must be in [0, 1]")
        _at_least(ds, "trainer.algorithm.dynamic_sampling", ("max_sample_batches",), 1)
        ob, limit = alg.overlong_buffer, g.sampling_params.max_generate_length
        if ob.len < 0 or ob.len > limit:
            _fail("trainer.algorithm.overlong_buffer.len", f"{ob.len} must be in [0, "
                  f"max_generate_length {limit}]")
        if ob.penalty_factor < 0:
            _fail("trainer.algorithm.overlong_buffer.penalty_factor", "must be >= 0")
        return cls(alg.advantage_estimator, alg.grpo_norm_by_std, ob.len,
                   float(ob.penalty_factor), ds.type or None, ds.max_sample_batches,
                   float(ds.min_replace_ratio))


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    run_dir: Path
    ckpt_interval: int  # steps; <= 0: never
    hf_save_interval: int  # steps; <= 0: never
    max_ckpts_to_keep: int
    resume_mode: str  # none | latest | from_path
    resume_path: str

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointSettings:
        t = cfg.trainer
        _at_least(t, "trainer", ("max_ckpts_to_keep",), 1)
        if t.resume_mode not in ("none", "latest", "from_path"):
            _fail("trainer.resume_mode", f"{t.resume_mode!r} is not none, latest or from_path")
        if t.resume_mode == "from_path" and not Path(t.resume_path).exists():
            _fail("trainer.resume_path", f"{t.resume_path!r} does not exist")
        return cls(Path(t.run_dir), t.ckpt_interval, t.hf_save_interval, t.max_ckpts_to_keep,
                   t.resume_mode, t.resume_path)


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    logger: tuple[str, ...]
    project_name: str
    run_name: str
    eval_interval: int  # steps; <= 0: never
    eval_before_train: bool

    @classmethod
    def from_config(cls, cfg: Any) -> LoggingSettings:
        t = cfg.trainer
        for logger in t.logger:
            if logger not in LOGGERS:
                _fail("trainer.logger", f"unknown logger {logger!r}")
        return cls(tuple(t.logger), t.project_name, t.run_name, t.eval_interval,
                   t.eval_before_train)


# ----------------------------------------------------------------------------- the whole
@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the batch splits come to on the trainer's devices."""

    dp: int  # data-parallel devices (data x fsdp); 0: not known (a -1 in the launcher's check)
    mini_rows: int  # sequences per optimiser step
    micro_rows: int  # rows of one update micro-batch, all devices
    forward_micro_rows: int  # rows of one log-prob micro-batch, all devices


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelSettings
    mesh: MeshSettings
    placement: PlacementSettings
    data: DataSettings
    reward: RewardSettings
    rollout: RolloutSettings
    schedule: ScheduleSettings
    algorithm: AlgorithmSettings
    loss: LossConfig
    optimizer: OptimizerConfig  # total_steps filled in by `for_run` once the data is read
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    config_json: str  # the config as given, for the run directory and the loggers

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """Every check that does not need the devices; a ConfigError names the key."""
        model = ModelSettings.from_config(cfg)
        t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
        # Checked in this order (the first error is the one said): the model and mesh, the
        # engines and batches, the loss, then the data files (a run's paths come last).
        mesh, placement = MeshSettings.from_config(cfg), PlacementSettings.from_config(cfg)
        rollout = RolloutSettings.from_config(cfg, model.max_position_embeddings)
        schedule, algorithm = ScheduleSettings.from_config(cfg), AlgorithmSettings.from_config(cfg)
        opt = t.policy.optimizer_config
        loss = _typed("trainer.algorithm", lambda: LossConfig(
            policy_loss_type=alg.policy_loss_type, eps_clip_low=alg.eps_clip_low,
            eps_clip_high=alg.eps_clip_high, clip_ratio_c=alg.clip_ratio_c,
            loss_reduction=alg.loss_reduction,
            max_seq_len=alg.max_seq_len or t.max_prompt_length +
            g.sampling_params.max_generate_length,
            use_kl_loss=alg.use_kl_loss, kl_loss_coef=alg.kl_loss_coef,
            kl_estimator_type=alg.kl_estimator_type, use_entropy_loss=alg.use_entropy_loss,
            entropy_loss_coef=alg.entropy_loss_coef, use_tis=alg.use_tis,
            tis_imp_ratio_cap=alg.tis_imp_ratio_cap,
            temperature=g.sampling_params.temperature or 1.0))
        optimizer = _typed("trainer.policy.optimizer_config", lambda: OptimizerConfig(
            lr=opt.lr, weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm,
            num_warmup_steps=opt.num_warmup_steps, scheduler=opt.scheduler,
            adam_betas=tuple(opt.adam_betas)))
        reward, logging = RewardSettings.from_config(cfg), LoggingSettings.from_config(cfg)
        checkpoint = CheckpointSettings.from_config(cfg)
        s = cls(model=model, mesh=mesh, placement=placement, data=DataSettings.from_config(cfg),
                reward=reward, rollout=rollout, schedule=schedule, algorithm=algorithm,
                loss=loss, optimizer=optimizer, checkpoint=checkpoint, logging=logging,
                config_json=cfg.to_json_best_effort(indent=2))
        s._check_memory_split()
        return s

    @classmethod
    def for_shapes(cls, cfg: Any, model: QwenConfig) -> Settings:
        """`from_config` for a run compiled or planned without its checkpoint or data
        (`dapo_jax.experiments`): `model`'s shape stands for the checkpoint's config.json,
        the built-in task for the data files, placeholder URLs for the sidecars; model.path
        stays as given."""
        cfg = copy.deepcopy(cfg)
        path = cfg.model.path
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(model.to_hf("bfloat16")))
            cfg.model.path = tmp
            cfg.data.train_data = cfg.data.val_data = "builtin:arithmetic"
            if cfg.generator.backend == "sidecar":
                cfg.generator.sidecar_urls = ("http://unused",)
            s = cls.from_config(cfg)
        return dataclasses.replace(s, model=dataclasses.replace(s.model, path=path))

    def _check_memory_split(self) -> None:
        r, p = self.rollout, self.placement
        if r.backend != "sidecar" or not p.colocate_all:
            return
        fraction = self.trainer_memory_fraction()
        if fraction <= 0:
            _fail("generator.gpu_memory_utilization", f"{r.gpu_memory_utilization} of each "
                  f"GPU for colocated sidecars leaves the trainer nothing (trainer."
                  f"xla_memory_fraction=0 gives it {COLOCATED_TOTAL} minus that): lower it")
        total = fraction + r.gpu_memory_utilization
        if total > 1:
            _fail("trainer.xla_memory_fraction", f"colocated trainer and sidecars share each "
                  f"GPU: trainer.xla_memory_fraction {p.xla_memory_fraction} + "
                  f"generator.gpu_memory_utilization {r.gpu_memory_utilization} = {total:.3g} "
                  "> 1 (lower one, or set trainer.placement.colocate_all=false to give the "
                  "engines their own GPUs)")
        engine_gpus = r.num_inference_engines * r.inference_engine_tensor_parallel_size
        if engine_gpus > p.policy_num_gpus_per_node:
            _fail("generator.num_inference_engines", f"colocated: {r.num_inference_engines} "
                  f"engines x tensor parallel {r.inference_engine_tensor_parallel_size} need "
                  f"{engine_gpus} GPUs but the trainer has "
                  f"trainer.placement.policy_num_gpus_per_node={p.policy_num_gpus_per_node}")

    def require_sidecars(self) -> None:
        """`python -m dapo_jax.train` with the sidecar backend talks to running sidecars
        (the launcher fills their URLs in, so its own check skips this)."""
        if self.rollout.backend == "sidecar" and not self.rollout.sidecar_urls:
            _fail("generator.sidecar_urls", "the sidecar backend needs at least one URL (or "
                  "start the run with `python -m dapo_jax.launch`, which starts the sidecars)")

    def trainer_memory_fraction(self) -> float:
        """The trainer's XLA_PYTHON_CLIENT_MEM_FRACTION: `trainer.xla_memory_fraction`, or
        when that is 0 what the placement leaves it: COLOCATED_TOTAL -
        generator.gpu_memory_utilization beside colocated sidecars, else
        ALONE_MEMORY_FRACTION."""
        p, r = self.placement, self.rollout
        if p.xla_memory_fraction:
            return p.xla_memory_fraction
        if r.backend == "sidecar" and p.colocate_all:
            return round(COLOCATED_TOTAL - r.gpu_memory_utilization, 2)
        return ALONE_MEMORY_FRACTION

    def trainer_devices(self, num_devices: int) -> int:
        """How many of this process's `num_devices` JAX devices the trainer's mesh takes:
        all, unless the in-process engine has its own generation mesh (backend jax,
        placement not colocated), which gets the rest in tensor-parallel groups of
        generator.inference_engine_tensor_parallel_size."""
        p, r = self.placement, self.rollout
        if r.backend != "jax" or p.colocate_all:
            return num_devices
        trainer = p.policy_num_gpus_per_node
        if trainer >= num_devices:
            _fail("trainer.placement.policy_num_gpus_per_node", f"{trainer} of the "
                  f"{num_devices} devices leaves none for the generation mesh "
                  "(colocate_all=false)")
        tp = r.inference_engine_tensor_parallel_size
        if (num_devices - trainer) % tp:
            _fail("generator.inference_engine_tensor_parallel_size", f"{tp} does not divide "
                  f"the {num_devices - trainer} devices of the generation mesh ({num_devices} "
                  f"devices, {trainer} for the trainer)")
        return trainer

    def sizes(self, num_devices: int | None) -> Sizes:
        """The batch splits over the trainer's `num_devices` devices (all processes), each
        checked. None is the launcher's check, which must not start JAX: the data-parallel
        size comes from the mesh shape where that has no -1 (the split checks are skipped
        otherwise)."""
        s, n = self.schedule, self.rollout.n_samples_per_prompt
        if num_devices is None:
            shape = self.mesh.shape
        else:
            try:
                shape = resolve_mesh_shape(self.mesh.shape, num_devices)
            except ValueError as e:
                _fail("mesh.shape", str(e))
        if -1 in shape:
            return Sizes(0, s.policy_mini_batch_size * n, 0, 0)
        dp = shape[0] * shape[1]
        sizes = Sizes(dp, s.policy_mini_batch_size * n, s.micro_train_batch_size_per_gpu * dp,
                      s.micro_forward_batch_size_per_gpu * dp)
        rollout_rows = s.train_batch_size * n
        if not s.use_sample_packing:  # packed batches round their rows up
            if sizes.mini_rows % sizes.micro_rows:
                _fail("trainer.micro_train_batch_size_per_gpu", f"a mini-batch of "
                      f"{s.policy_mini_batch_size} prompts x {n} samples = {sizes.mini_rows} "
                      f"sequences does not split into micro-batches of "
                      f"{s.micro_train_batch_size_per_gpu} per device x {dp} data-parallel "
                      "devices")
            if rollout_rows % sizes.forward_micro_rows:
                _fail("trainer.micro_forward_batch_size_per_gpu", f"a rollout batch of "
                      f"{s.train_batch_size} prompts x {n} samples = {rollout_rows} sequences "
                      f"does not split into forward micro-batches of "
                      f"{s.micro_forward_batch_size_per_gpu} per device x {dp} data-parallel "
                      "devices")
        return sizes


def validate(cfg: Any, num_devices: int | None = None) -> Settings:
    """`Settings.from_config(cfg)` with its batch splits checked on `num_devices` trainer
    devices (None: the launcher's check, before JAX) and, when the devices are known, the
    sidecar URLs required."""
    s = Settings.from_config(cfg)
    s.sizes(num_devices)
    if num_devices is not None:
        s.require_sidecars()
    return s
