"""DAPO on Qwen3-1.7B-Base (seed: AIME24 pass@32 0.4, avg -0.702 at 225 steps, 8xH100)."""

from configs.dapo_common import dapo_config


def get_config():
    return dapo_config(model_path="/models/Qwen3-1.7B-Base", run_dir="runs/dapo_qwen3_1p7b",
                       eval_interval=5, max_steps=225,
                       xla_memory_fraction=0.15, micro_forward_batch_size_per_gpu=8)
