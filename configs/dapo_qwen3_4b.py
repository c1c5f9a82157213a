"""DAPO on Qwen3-4B-Base (seed: AIME24 pass@32 0.6, avg -0.51 at 90 steps, 8xH100)."""

from configs.dapo_common import dapo_config


def get_config():
    return dapo_config(model_path="/models/Qwen3-4B-Base", run_dir="runs/dapo_qwen3_4b",
                       eval_interval=5, max_steps=90,
                       xla_memory_fraction=0.25, micro_forward_batch_size_per_gpu=4)
