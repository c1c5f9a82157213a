"""Settings shared by the seed's three DAPO runs (DAPO_FACTS section 5): 8xH100, DAPO-Math-17k
for training and AIME-2024 for evaluation, one vLLM sidecar per GPU colocated with the
FSDP trainer. Model and data paths are local directories/files: set them with
--config.model.path=..., --config.data.train_data=..., --config.data.val_data=...

    python -m dapo_jax.launch --config configs/dapo_qwen3_4b.py

Precision: float32 master weights and AdamW state, bf16 compute, bf16 rollout weights
(exports half the bytes). Memory: each H100 holds the trainer's shards and activations
(`trainer.xla_memory_fraction`) next to one vLLM engine (`generator.gpu_memory_utilization`);
the split and what it leaves for vLLM's KV cache are in bench/RESULTS.md ("GPU memory split").
"""

from dapo_jax.train.config import default_config


def dapo_config(*, model_path: str, run_dir: str, eval_interval: int, max_steps: int,
                xla_memory_fraction: float, micro_forward_batch_size_per_gpu: int):
    c = default_config()
    c.model.path = model_path
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    # The least recompute whose update fits the trainer's share of each chip, decided by
    # compiling it for the run's own devices at start (update.choose_remat).
    c.model.remat = "auto"
    c.mesh.shape = (1, 8, 1)  # FSDP over the 8 GPUs
    c.data.train_data = "/data/dapo-math-17k.parquet"
    c.data.val_data = "/data/aime-2024.parquet"
    c.reward.fn = "dapo_math"
    c.reward.num_workers = 16

    t = c.trainer
    t.run_dir = run_dir
    t.max_steps = max_steps
    t.max_prompt_length = 2048
    t.train_batch_size = 512
    t.policy_mini_batch_size = 32
    t.use_sample_packing = True  # rows of 2048 + 8192 tokens filled with whole sequences
    t.micro_train_batch_size_per_gpu = 2
    t.micro_forward_batch_size_per_gpu = micro_forward_batch_size_per_gpu
    t.update_epochs_per_batch = 1
    t.eval_before_train = True
    t.eval_interval = eval_interval
    t.ckpt_interval = 10
    t.max_ckpts_to_keep = 3
    o = t.policy.optimizer_config
    o.lr = 1e-6
    o.num_warmup_steps = 160
    o.weight_decay = 0.1
    o.max_grad_norm = 1.0

    a = t.algorithm
    a.advantage_estimator = "grpo"
    a.policy_loss_type = "dual_clip"
    a.clip_ratio_c = 10.0
    a.eps_clip_low = 0.2
    a.eps_clip_high = 0.28
    a.loss_reduction = "token_mean"
    a.use_kl_loss = False
    a.overlong_buffer.len = 4096
    a.overlong_buffer.penalty_factor = 1.0
    a.dynamic_sampling.type = ""  # the seed's runs are "w/o dynamic sampling"

    t.xla_memory_fraction = xla_memory_fraction
    t.placement.colocate_all = True
    t.placement.policy_num_gpus_per_node = 8

    g = c.generator
    g.backend = "sidecar"
    g.sidecar_engine = "vllm"
    g.num_inference_engines = 8
    g.inference_engine_tensor_parallel_size = 1
    # What the trainer leaves, less 3% (2.4 GiB) for the two processes' CUDA contexts and
    # vLLM's CUDA graphs, which neither budget counts.
    g.gpu_memory_utilization = round(0.97 - xla_memory_fraction, 2)
    g.model_dtype = "bfloat16"
    g.n_samples_per_prompt = 16
    g.apply_overlong_filtering = True
    g.sampling_params.max_generate_length = 8192
    g.sampling_params.temperature = 1.0
    g.sampling_params.top_p = 1.0
    g.eval_n_samples_per_prompt = 32
    g.eval_sampling_params.max_generate_length = 8192
    g.eval_sampling_params.temperature = 1.0
    g.eval_sampling_params.top_p = 0.7
    return c


def on_tpu(c, *, run_dir: str, max_num_seqs: int):
    """A seed config for a single-host Cloud TPU slice: the same recipe, FSDP over every
    chip of the host, and generation by the in-process JAX engine on the trainer's chips
    (`max_num_seqs` sequences per call, what the KV cache next to the trainer's state
    holds; from `python -m dapo_jax.experiments.compile`). No sidecars: vLLM's TPU build
    (vllm-tpu / tpu-inference 0.32) pins jax 0.11.2 and libtpu 0.0.48, so it needs its own
    process and chips, and the weights would go through disk each step; in process they are
    cast on device.

        python -m dapo_jax.train --config configs/<name>_v5p.py --config.model.path=...
    """
    c.trainer.run_dir = run_dir
    c.mesh.shape = (1, -1, 1)
    g = c.generator
    g.backend = "jax"
    g.max_num_seqs = max_num_seqs
    return c
