"""The trainer's configuration: SkyRL key names and defaults, validated before any compute.

Config files in `configs/` start from `default_config()` (locked: setting a key that does
not exist is an error) and change what they need. `settings.Settings.from_config` is the one
reader: it checks the combination, naming the offending key in every error, and turns it
into typed settings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ml_collections import ConfigDict

from dapo_jax.train.objective import LossConfig
from dapo_jax.train.update import OptimizerConfig


class ConfigError(ValueError):
    pass


def default_config() -> ConfigDict:
    loss, opt = LossConfig(), OptimizerConfig()
    c = ConfigDict()
    c.model = ConfigDict({
        "path": "",  # local HF directory (config.json, safetensors, tokenizer)
        # Master weights and AdamW state. Only float32 trains: optax casts Adam's
        # hyperparameters to the parameter dtype (b2 = 0.999 is 1.0 in bf16) and a bf16 weight
        # near 0.02 cannot take a step below ~1e-4, so "bfloat16" is refused (settings.py).
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
        # AdamW's settings; their defaults are update.OptimizerConfig's.
        "policy": ConfigDict({"optimizer_config": ConfigDict({
            k: getattr(opt, k) for k in ("lr", "weight_decay", "max_grad_norm",
                                         "num_warmup_steps", "scheduler", "adam_betas")})}),
        "algorithm": ConfigDict({
            "advantage_estimator": "grpo",  # grpo | rloo
            "grpo_norm_by_std": True,
            # The loss's settings (objective.LossConfig: its defaults, what each means);
            # max_seq_len 0: prompt + generate length (seq_mean_token_sum_norm).
            **{k: getattr(loss, k) for k in (
                "policy_loss_type", "eps_clip_low", "eps_clip_high", "clip_ratio_c",
                "loss_reduction", "use_kl_loss", "kl_loss_coef", "kl_estimator_type",
                "use_entropy_loss", "entropy_loss_coef", "use_tis", "tis_imp_ratio_cap")},
            "max_seq_len": 0,
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
