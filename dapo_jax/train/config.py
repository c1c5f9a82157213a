"""The trainer's configuration: SkyRL key names and defaults, validated before any compute.

Config files in `configs/` start from `default_config()` (locked: setting a key that does
not exist is an error) and change what they need. `validate` checks the combination and
names the offending key in every error.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from ml_collections import ConfigDict

from dapo_jax.models.kernels import check_attention_impl
from dapo_jax.models.qwen import REMAT_ORDER
from dapo_jax.multihost import DistributedConfig
from dapo_jax.sharding import resolve_mesh_shape
from dapo_jax.train import objective
from dapo_jax.train.dynamic_sampling import TYPES as DS_TYPES
from rollout.generation import SamplingParams


class ConfigError(ValueError):
    pass


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict({
        "path": "",  # local HF directory (config.json, safetensors, tokenizer)
        # Master weights and AdamW state. Only float32 trains: optax casts Adam's
        # hyperparameters to the parameter dtype (b2 = 0.999 is 1.0 in bf16) and a bf16 weight
        # near 0.02 cannot take a step below ~1e-4, so "bfloat16" is refused by `validate`.
        "param_dtype": "float32",
        "compute_dtype": "float32",  # float32 | bfloat16: matmuls and activations
        # What the backward pass recomputes (models/qwen.py REMAT_POLICIES, least first):
        # none | dots_saveable | minimal | full, or auto: the least that fits the trainer's
        # memory, decided by compiling the update for its devices (update.choose_remat).
        "remat": "none",
        # Training/prefill attention, decided for the compile target: auto (xla on CPU,
        # splash on TPU, tokamax Mosaic/Triton on GPU) | xla (ours, blocked) | splash |
        # tokamax_{mosaic,triton,xla,xla_chunked} (dapo_jax/models/kernels.py)
        "attention_impl": "auto",
    })
    c.mesh = ConfigDict({
        "shape": (1, -1, 1),  # data x fsdp x tensor; one -1 fills the devices
        # A parameter whose rule splits it over a mesh axis that does not divide it (28
        # query heads on tensor=8) is replicated on every device: a warning per parameter,
        # or with strict an error before anything loads.
        "strict": False,
        # Several processes (one per host): "HOST:PORT" of process 0's coordinator, with
        # num_processes and this process's process_id; "auto": JAX detects all three
        # (SLURM, Cloud TPU, Kubernetes, MPI); "": one process.
        "coordinator_address": "",
        "num_processes": 1,
        "process_id": 0,
        "initialization_timeout_s": 300,  # every process must join within this
        # A process that stops answering for this long ends the job on every other one.
        "heartbeat_timeout_s": 100,
    })
    c.data = ConfigDict({
        "train_data": "",  # .parquet/.jsonl in the DAPO-Math-17k schema, or "builtin:arithmetic"
        "val_data": "",  # likewise (AIME-2024 schema), or "builtin:arithmetic"
        "builtin_train_size": 4096,
        "builtin_val_size": 128,
        "overlong_prompts": "drop",  # drop (counted) | error
    })
    c.reward = ConfigDict({
        "fn": "dapo_math",  # dapo_math | boxed | arithmetic | package.module:function
        "num_workers": 2,
        "timeout_s": 10.0,
        # Failed scores (raised or timed out) above this fraction of a batch stop the run with
        # the first failure's traceback; below it each distinct failure is logged once.
        "max_failure_frac": 0.01,
    })
    c.generator = ConfigDict({
        "backend": "jax",  # jax (in process) | sidecar (rollout.server over HTTP)
        # Sidecars: `python -m dapo_jax.launch` starts `num_inference_engines` of them and
        # fills in sidecar_urls; `python -m dapo_jax.train` needs sidecar_urls set.
        "sidecar_urls": (),
        "sidecar_token": "",  # default: the ROLLOUT_TOKEN environment variable
        "sidecar_engine": "vllm",  # vllm | jax: what the launcher starts
        "sidecar_python": "",  # interpreter with the engine installed ("": this one)
        "num_inference_engines": 1,
        "inference_engine_tensor_parallel_size": 1,
        # Fraction of each engine GPU's memory the sidecar may take (vLLM's setting; a JAX
        # sidecar gets it as XLA_PYTHON_CLIENT_MEM_FRACTION).
        "gpu_memory_utilization": 0.45,
        "sidecar_startup_timeout_s": 900.0,
        "sidecar_max_restarts": 2,  # launcher: restarts of a sidecar that dies mid-run
        # Rollout weights: exports to the sidecars and the in-process engine's copy are cast
        # to this dtype (half the bytes to write, load and stream in bf16).
        "model_dtype": "float32",
        "export_dir": "",  # weight exports for the sidecars (default: <run_dir>/exports)
        # Sequences the in-process JAX engine generates at once (its KV cache holds that many;
        # SkyRL's key and default); a step's rows are generated in calls of at most this.
        "max_num_seqs": 1024,
        "n_samples_per_prompt": 5,
        "eval_n_samples_per_prompt": 1,
        "apply_overlong_filtering": False,
        "sampling_params": ConfigDict({
            "max_generate_length": 1024, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
        }),
        "eval_sampling_params": ConfigDict({
            "max_generate_length": 1024, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
        }),
    })
    c.trainer = ConfigDict({
        "seed": 42,
        "run_dir": "runs/default",
        # JAX's persistent compilation cache: a rerun (or resume) of the same shapes loads
        # its programs instead of compiling them again. "": off. Not used on >1 CPU device
        # (XLA:CPU programs with collectives loaded from it deadlock: loop.use_compilation_cache).
        "compilation_cache_dir": "~/.cache/dapo_jax/jax",
        "max_steps": 0,  # 0: trainer.epochs passes over the training data
        "epochs": 1,
        "max_prompt_length": 512,
        "train_batch_size": 64,  # prompts per step
        "policy_mini_batch_size": 16,  # prompts per optimiser step
        # Whole sequences packed into rows of max_prompt_length + max_generate_length
        # tokens (SkyRL's name), instead of one padded sequence per row.
        "use_sample_packing": True,
        # Rows per device per micro-batch: each row holds up to max_prompt_length +
        # max_generate_length tokens (one padded sequence, or packed ones), so a micro-batch's
        # token budget is this x that length; packed micro-batches per mini-batch vary with
        # the lengths (rounded up to 1, 2, 3, 4, 6, 8, 12, ...: few shapes).
        "micro_train_batch_size_per_gpu": 4,
        # The same for the old/reference log-prob passes (run on each mini-batch's rows).
        "micro_forward_batch_size_per_gpu": 4,
        "update_epochs_per_batch": 1,
        "eval_interval": 5,  # steps; <= 0: never
        "eval_before_train": True,
        "ckpt_interval": 10,
        # The policy as a Hugging Face directory (generator.model_dtype) every this many steps
        # and at the end, to <run_dir>/hf/step_<N>; <= 0: never.
        "hf_save_interval": 0,
        "max_ckpts_to_keep": 3,
        "resume_mode": "latest",  # none | latest | from_path
        "resume_path": "",
        "logger": ("console", "jsonl"),  # plus tensorboard, wandb
        "project_name": "dapo_jax",
        "run_name": "",
        # Fraction of each GPU JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, set
        # before JAX starts; JAX never hands memory back). Colocated with sidecars, it and
        # generator.gpu_memory_utilization must sum to at most 1. 0: follow the placement
        # (`trainer_memory_fraction`: what colocated sidecars leave, else 0.9).
        "xla_memory_fraction": 0.0,
        # XLA's GPU compiler options for the trainer, added to XLA_FLAGS before JAX starts
        # (a flag already in XLA_FLAGS wins): MaxText's set, each justified at GPU_XLA_FLAGS
        # below. () for XLA's defaults. Ignored by the CPU and TPU compilers.
        "xla_gpu_flags": GPU_XLA_FLAGS,
        # Generation runs ahead of the trainer in its own thread (README "Asynchronous
        # training"): a group scheduled at step i is trained at a step j with
        # j - i <= max_staleness_steps (SkyRL's names and default; 0: the synchronous loop's
        # batches exactly). Needs engines on devices the trainer does not use
        # (placement.colocate_all=false).
        "fully_async": ConfigDict({"enabled": False, "max_staleness_steps": 4}),
        "placement": ConfigDict({
            # true: sidecars share the trainer's GPUs (engine i on GPUs i*tp .. (i+1)*tp - 1);
            # false: the trainer takes the first policy_num_gpus_per_node GPUs and the
            # engines the ones after them.
            "colocate_all": True,
            "policy_num_gpus_per_node": 8,
        }),
        "policy": ConfigDict({"optimizer_config": ConfigDict({
            "lr": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0, "num_warmup_steps": 0,
            "scheduler": "constant",  # constant | cosine (after the linear warmup)
            "adam_betas": (0.9, 0.999),
        })}),
        "algorithm": ConfigDict({
            "advantage_estimator": "grpo",  # grpo | rloo
            "grpo_norm_by_std": True,
            "policy_loss_type": "regular",  # any registered: regular | dual_clip | gspo
            "eps_clip_low": 0.2,
            "eps_clip_high": 0.28,  # DAPO's clip-higher
            "clip_ratio_c": 3.0,
            "loss_reduction": "token_mean",
            "max_seq_len": 0,  # seq_mean_token_sum_norm; 0: prompt + generate length
            "use_kl_loss": False,
            "kl_loss_coef": 0.001,
            "kl_estimator_type": "k3",
            "use_entropy_loss": False,
            "entropy_loss_coef": 0.01,
            "use_tis": False,
            "tis_imp_ratio_cap": 2.0,
            "overlong_buffer": ConfigDict({"len": 0, "penalty_factor": 1.0}),  # len 0: off
            "dynamic_sampling": ConfigDict({
                "type": "",  # "" (off) | filter | replace
                "max_sample_batches": 30,
                "min_replace_ratio": 0.3,
            }),
        }),
    })
    c.lock()
    return c


def load_config_file(path: str | Path) -> ConfigDict:
    """`get_config()` of a config file, as `--config path` loads it (the repository root is
    put on sys.path first: config files import `configs.dapo_common`)."""
    path = Path(path).resolve()
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} is not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(cfg: ConfigDict, overrides: dict) -> ConfigDict:
    """Sets dotted keys ({"trainer.algorithm.eps_clip_high": 0.28}); unknown keys fail as
    with --config.a.b on the command line (the config is locked)."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


DTYPES = ("float32", "bfloat16")


def distributed_config(cfg: ConfigDict) -> DistributedConfig:
    m = cfg.mesh
    return DistributedConfig(
        coordinator_address=m.coordinator_address or None, num_processes=m.num_processes,
        process_id=m.process_id, initialization_timeout_s=m.initialization_timeout_s,
        heartbeat_timeout_s=m.heartbeat_timeout_s)


def _validate_multihost(cfg: ConfigDict) -> None:
    m = cfg.mesh
    for key in ("initialization_timeout_s", "heartbeat_timeout_s"):
        if m[key] < 1:
            _fail(f"mesh.{key}", f"must be >= 1 second, got {m[key]}")
    if m.coordinator_address in ("", "auto"):
        if m.coordinator_address == "" and (m.num_processes != 1 or m.process_id != 0):
            _fail("mesh.coordinator_address", f"num_processes={m.num_processes} / process_id="
                  f"{m.process_id} need the coordinator's HOST:PORT (or \"auto\")")
        return
    host, _, port = m.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail("mesh.coordinator_address", f"{m.coordinator_address!r} is not HOST:PORT")
    if m.num_processes < 1:
        _fail("mesh.num_processes", f"must be >= 1, got {m.num_processes}")
    if not 0 <= m.process_id < m.num_processes:
        _fail("mesh.process_id", f"{m.process_id} is not in [0, num_processes "
              f"{m.num_processes})")


def validate(cfg: ConfigDict, num_devices: int | None) -> dict[str, int]:
    """Checks a full config before any compute. Returns derived sizes (sequences per
    mini-batch, rows per update and forward micro-batch over all devices, data-parallel size,
    max_seq_len).

    `num_devices` is the trainer's JAX device count. None is the launcher's check, which must
    not start JAX: it takes the data-parallel size from the mesh shape where that has no -1
    (skipping the batch-split checks otherwise) and does not ask for sidecar URLs, which the
    launcher fills in."""
    t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
    if num_devices is None:
        shape = tuple(cfg.mesh.shape)
        if len(shape) != 3:
            _fail("mesh.shape", f"must have 3 entries (data, fsdp, tensor), got {shape}")
    else:
        try:
            shape = resolve_mesh_shape(cfg.mesh.shape, num_devices)
        except ValueError as e:
            _fail("mesh.shape", str(e))
    dp = shape[0] * shape[1] if -1 not in shape else None
    if not cfg.model.path:
        _fail("model.path", "a local HF model directory is required")
    config_file = Path(cfg.model.path) / "config.json"
    if not config_file.exists():
        _fail("model.path", f"{config_file} does not exist")
    max_pos = json.loads(config_file.read_text()).get("max_position_embeddings", 0)
    _validate_precision(cfg)
    _validate_multihost(cfg)
    n = g.n_samples_per_prompt
    for key in ("train_batch_size", "policy_mini_batch_size", "micro_train_batch_size_per_gpu",
                "micro_forward_batch_size_per_gpu", "update_epochs_per_batch",
                "max_prompt_length", "max_ckpts_to_keep"):
        if t[key] < 1:
            _fail(f"trainer.{key}", f"must be >= 1, got {t[key]}")
    if n < 1 or g.eval_n_samples_per_prompt < 1:
        _fail("generator.n_samples_per_prompt", "n_samples_per_prompt and "
              "eval_n_samples_per_prompt must be >= 1")
    if t.train_batch_size % t.policy_mini_batch_size:
        _fail("trainer.train_batch_size", f"{t.train_batch_size} is not divisible by "
              f"trainer.policy_mini_batch_size {t.policy_mini_batch_size}")
    mini_rows = t.policy_mini_batch_size * n
    rollout_rows = t.train_batch_size * n
    sizes = {"dp": dp or 0, "mini_rows": mini_rows, "micro_rows": 0, "forward_micro_rows": 0}
    if dp is not None:
        sizes["micro_rows"] = micro_rows = t.micro_train_batch_size_per_gpu * dp
        sizes["forward_micro_rows"] = forward_rows = t.micro_forward_batch_size_per_gpu * dp
    if dp is not None and not t.use_sample_packing:  # packed batches round their rows up
        if mini_rows % micro_rows:
            _fail("trainer.micro_train_batch_size_per_gpu", f"a mini-batch of "
                  f"{t.policy_mini_batch_size} prompts x {n} samples = {mini_rows} sequences "
                  f"does not split into micro-batches of {t.micro_train_batch_size_per_gpu} "
                  f"per device x {dp} data-parallel devices")
        if rollout_rows % forward_rows:
            _fail("trainer.micro_forward_batch_size_per_gpu", f"a rollout batch of "
                  f"{t.train_batch_size} prompts x {n} samples = {rollout_rows} sequences does "
                  f"not split into forward micro-batches of "
                  f"{t.micro_forward_batch_size_per_gpu} per device x {dp} data-parallel "
                  "devices")
    for name in ("sampling_params", "eval_sampling_params"):
        sp = g[name]
        try:
            SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                           max_tokens=sp.max_generate_length)
        except ValueError as e:
            _fail(f"generator.{name}", str(e))
        if t.max_prompt_length + sp.max_generate_length > max_pos:
            _fail(f"generator.{name}.max_generate_length", f"trainer.max_prompt_length "
                  f"{t.max_prompt_length} + max_generate_length {sp.max_generate_length} "
                  f"exceeds the model's max_position_embeddings {max_pos}")
    _validate_generator(cfg)
    if num_devices is not None:
        sidecars_required(cfg)
    if alg.advantage_estimator not in ("grpo", "rloo"):
        _fail("trainer.algorithm.advantage_estimator", f"{alg.advantage_estimator!r} is not "
              "grpo or rloo")
    max_seq_len = alg.max_seq_len or t.max_prompt_length + g.sampling_params.max_generate_length
    sizes["max_seq_len"] = max_seq_len
    try:
        objective.validate(policy_loss_type=alg.policy_loss_type, eps_clip_low=alg.eps_clip_low,
                           eps_clip_high=alg.eps_clip_high, clip_ratio_c=alg.clip_ratio_c,
                           loss_reduction=alg.loss_reduction, max_seq_len=max_seq_len)
    except ValueError as e:
        _fail("trainer.algorithm", str(e))
    if alg.kl_estimator_type not in objective.KL_ESTIMATORS:
        _fail("trainer.algorithm.kl_estimator_type", f"{alg.kl_estimator_type!r} is not one of "
              f"{objective.KL_ESTIMATORS}")
    ds = alg.dynamic_sampling
    if (ds.type or None) not in DS_TYPES:
        _fail("trainer.algorithm.dynamic_sampling.type", f"{ds.type!r} is not '', filter or "
              "replace")
    if not 0 <= ds.min_replace_ratio <= 1:
        _fail("trainer.algorithm.dynamic_sampling.min_replace_ratio", "must be in [0, 1]")
    ob = alg.overlong_buffer
    if ob.len < 0 or ob.len > g.sampling_params.max_generate_length:
        _fail("trainer.algorithm.overlong_buffer.len", f"{ob.len} must be in [0, "
              f"max_generate_length {g.sampling_params.max_generate_length}]")
    if ob.penalty_factor < 0:
        _fail("trainer.algorithm.overlong_buffer.penalty_factor", "must be >= 0")
    if alg.use_tis and alg.tis_imp_ratio_cap <= 0:
        _fail("trainer.algorithm.tis_imp_ratio_cap", "must be > 0")
    if not 0 <= cfg.reward.max_failure_frac <= 1:
        _fail("reward.max_failure_frac", f"must be in [0, 1], got {cfg.reward.max_failure_frac}")
    if t.resume_mode not in ("none", "latest", "from_path"):
        _fail("trainer.resume_mode", f"{t.resume_mode!r} is not none, latest or from_path")
    if t.resume_mode == "from_path" and not Path(t.resume_path).exists():
        _fail("trainer.resume_path", f"{t.resume_path!r} does not exist")
    for logger in t.logger:
        if logger not in ("console", "jsonl", "tensorboard", "wandb"):
            _fail("trainer.logger", f"unknown logger {logger!r}")
    for key in ("train_data", "val_data"):
        path = cfg.data[key]
        if key == "train_data" and not path:
            _fail("data.train_data", "a dataset file or builtin:arithmetic is required")
        if path and not path.startswith("builtin:") and not Path(path).exists():
            _fail(f"data.{key}", f"{path} does not exist")
        if path.startswith("builtin:") and path != "builtin:arithmetic":
            _fail(f"data.{key}", f"unknown built-in task {path!r} (builtin:arithmetic)")
    opt = t.policy.optimizer_config
    if opt.scheduler not in ("constant", "cosine"):
        _fail("trainer.policy.optimizer_config.scheduler", f"{opt.scheduler!r} is not constant "
              "or cosine")
    if opt.lr <= 0:
        _fail("trainer.policy.optimizer_config.lr", "must be > 0")
    if t.max_steps < 0:
        _fail("trainer.max_steps", "must be >= 0 (0: derive from trainer.epochs)")
    return sizes


def _validate_precision(cfg: ConfigDict) -> None:
    m = cfg.model
    for key in ("param_dtype", "compute_dtype"):
        if m[key] not in DTYPES:
            _fail(f"model.{key}", f"{m[key]!r} is not one of {DTYPES}")
    if m.param_dtype != "float32":
        _fail("model.param_dtype", "the trained weights and AdamW state must be float32 "
              "(bfloat16 master weights turn NaN at step 1 and cannot take steps below ~1e-4 "
              "of a weight); for bf16 compute set model.compute_dtype=bfloat16, and "
              "generator.model_dtype=bfloat16 for bf16 rollout weights")
    if m.remat not in ("auto", *REMAT_ORDER):
        _fail("model.remat", f"{m.remat!r} is not auto or one of {', '.join(REMAT_ORDER)}")
    try:
        check_attention_impl(m.attention_impl)
    except (ValueError, ImportError) as e:
        _fail("model.attention_impl", str(e))
    if cfg.generator.model_dtype not in DTYPES:
        _fail("generator.model_dtype", f"{cfg.generator.model_dtype!r} is not one of {DTYPES}")


def _validate_generator(cfg: ConfigDict) -> None:
    g, t = cfg.generator, cfg.trainer
    if g.backend not in ("jax", "sidecar"):
        _fail("generator.backend", f"must be 'jax' or 'sidecar', got {g.backend!r}")
    if g.sidecar_engine not in ("vllm", "jax"):
        _fail("generator.sidecar_engine", f"must be 'vllm' or 'jax', got {g.sidecar_engine!r}")
    for key in ("num_inference_engines", "inference_engine_tensor_parallel_size",
                "max_num_seqs"):
        if g[key] < 1:
            _fail(f"generator.{key}", f"must be >= 1, got {g[key]}")
    if g.sidecar_max_restarts < 0:
        _fail("generator.sidecar_max_restarts", "must be >= 0")
    if g.sidecar_startup_timeout_s <= 0:
        _fail("generator.sidecar_startup_timeout_s", "must be > 0")
    if not 0 < g.gpu_memory_utilization < 1:
        _fail("generator.gpu_memory_utilization", f"must be in (0, 1), got "
              f"{g.gpu_memory_utilization}")
    if not 0 <= t.xla_memory_fraction <= 1:
        _fail("trainer.xla_memory_fraction", f"must be in [0, 1] (0: follow the placement), "
              f"got {t.xla_memory_fraction}")
    if t.placement.policy_num_gpus_per_node < 1:
        _fail("trainer.placement.policy_num_gpus_per_node", "must be >= 1")
    fa = t.fully_async
    if fa.max_staleness_steps < 0:
        _fail("trainer.fully_async.max_staleness_steps", f"must be >= 0, got "
              f"{fa.max_staleness_steps}")
    if fa.enabled and t.placement.colocate_all:
        _fail("trainer.placement.colocate_all", "trainer.fully_async needs the engines on "
              "devices the trainer does not use, or generation and training cannot overlap: "
              "set trainer.placement.colocate_all=false")
    if g.backend == "sidecar" and t.placement.colocate_all:
        fraction = trainer_memory_fraction(cfg)
        if fraction <= 0:
            _fail("generator.gpu_memory_utilization", f"{g.gpu_memory_utilization} of each GPU "
                  f"for colocated sidecars leaves the trainer nothing (trainer."
                  f"xla_memory_fraction=0 gives it {COLOCATED_TOTAL} minus that): lower it")
        total = fraction + g.gpu_memory_utilization
        if total > 1:
            _fail("trainer.xla_memory_fraction", f"colocated trainer and sidecars share each GPU:"
                  f" trainer.xla_memory_fraction {t.xla_memory_fraction} + "
                  f"generator.gpu_memory_utilization {g.gpu_memory_utilization} = {total:.3g} "
                  "> 1 (lower one, or set trainer.placement.colocate_all=false to give the "
                  "engines their own GPUs)")
        engine_gpus = g.num_inference_engines * g.inference_engine_tensor_parallel_size
        if engine_gpus > t.placement.policy_num_gpus_per_node:
            _fail("generator.num_inference_engines", f"colocated: {g.num_inference_engines} "
                  f"engines x tensor parallel {g.inference_engine_tensor_parallel_size} need "
                  f"{engine_gpus} GPUs but the trainer has "
                  f"trainer.placement.policy_num_gpus_per_node="
                  f"{t.placement.policy_num_gpus_per_node}")


# What each changes in the 8x H100 compile of the 1.7B seed update (remat full; every
# flag but one against all of them: bench/gpu_flags.py, table in bench/RESULTS.md): XLA's
# default schedule overlaps 16 asynchronous collectives with compute; with these, 150, at
# +0.8 GiB of peak (8.46 -> 9.28 GiB). Not taken: the pipelined reduce-scatter (this program
# has none: its gradients reduce with all-reduce; the program was identical without it).
GPU_XLA_FLAGS = (
    # Schedules asynchronous collectives around independent compute (XLA's default now: the
    # program is the same without it; pinned so the trainer does not depend on the default).
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # The next layer's FSDP weight all-gather during this layer's compute (without it: a
    # 12.21 GiB peak, not 9.28), the gradient all-reduces likewise (99 instead of 150
    # overlapped collectives); both across iterations of the double-buffered layer loop
    # (without it: 89).
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # Collectives on a stream of their own at the highest priority (a runtime setting: the
    # program is the same).
    "--xla_gpu_enable_highest_priority_async_stream=true",
    # Matmuls as cuBLAS calls (336 of them) instead of generated Triton GEMM fusions
    # (MaxText's choice: cuBLAS is at least as fast on a transformer's large bf16 shapes, and
    # the program compiles without autotuning Triton tiles).
    "--xla_gpu_enable_triton_gemm=false",
)
# A trainer alone on its GPUs (the in-process engine, or sidecars on GPUs of their own)
# takes this much of each (JAX's default is 0.75; the rest is the CUDA context's and
# cuDNN/cuBLAS workspaces'). Colocated with sidecars, trainer + sidecars take
# COLOCATED_TOTAL, as the seed configs split it (CUDA contexts and vLLM's CUDA graphs use
# the rest).
ALONE_MEMORY_FRACTION = 0.9
COLOCATED_TOTAL = 0.97


def trainer_memory_fraction(cfg: ConfigDict) -> float:
    """The trainer's XLA_PYTHON_CLIENT_MEM_FRACTION: `trainer.xla_memory_fraction`, or when
    that is 0 what the placement leaves it: COLOCATED_TOTAL - generator.gpu_memory_utilization
    beside colocated sidecars, else ALONE_MEMORY_FRACTION."""
    t, g = cfg.trainer, cfg.generator
    if t.xla_memory_fraction:
        return float(t.xla_memory_fraction)
    if g.backend == "sidecar" and t.placement.colocate_all:
        return round(COLOCATED_TOTAL - g.gpu_memory_utilization, 2)
    return ALONE_MEMORY_FRACTION


def trainer_devices(cfg: ConfigDict, num_devices: int) -> int:
    """How many of this process's `num_devices` JAX devices the trainer's mesh takes: all,
    unless the in-process engine has its own generation mesh (backend jax, placement not
    colocated), which gets the rest in tensor-parallel groups of
    generator.inference_engine_tensor_parallel_size."""
    t, g = cfg.trainer, cfg.generator
    if g.backend != "jax" or t.placement.colocate_all:
        return num_devices
    trainer = t.placement.policy_num_gpus_per_node
    if trainer >= num_devices:
        _fail("trainer.placement.policy_num_gpus_per_node", f"{trainer} of the {num_devices} "
              "devices leaves none for the generation mesh (colocate_all=false)")
    tp = g.inference_engine_tensor_parallel_size
    if (num_devices - trainer) % tp:
        _fail("generator.inference_engine_tensor_parallel_size", f"{tp} does not divide the "
              f"{num_devices - trainer} devices of the generation mesh ({num_devices} devices, "
              f"{trainer} for the trainer)")
    return trainer


def sidecars_required(cfg: ConfigDict) -> None:
    """`python -m dapo_jax.train` with the sidecar backend talks to running sidecars."""
    if cfg.generator.backend == "sidecar" and not cfg.generator.sidecar_urls:
        _fail("generator.sidecar_urls", "the sidecar backend needs at least one URL (or start "
              "the run with `python -m dapo_jax.launch`, which starts the sidecars)")


def total_steps(cfg: ConfigDict, num_train_prompts: int) -> int:
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return max(1, math.floor(cfg.trainer.epochs * num_train_prompts /
                             cfg.trainer.train_batch_size))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `--config path --config.a.b=value` (an `app.run`
    `flags_parser`): a key the config does not have, or a value it cannot take, is one line
    naming it (with ml_collections' suggestion for a misspelt key) and exit code 2, no
    traceback: the user's mistake, not a bug."""
    import re

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        text = str(e)
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        overrides = [a.removeprefix("--").split("=")[0] for a in argv[1:]
                     if a.startswith("--config.")]
        missing = re.match(r"""^\W*(\w+)""", text)
        key = next((o for o in overrides if missing and
                    missing.group(1) in o.split(".")[1:]), None)
        if isinstance(e, (AttributeError, KeyError)) and key:
            message = f"unknown config key {key.removeprefix('config.')}"
            if suggestion:
                message += f' (did you mean "{suggestion.group(1)}"?)'
        else:
            message = " ".join(text.split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
