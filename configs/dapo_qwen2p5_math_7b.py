"""DAPO on Qwen2.5-Math-7B (seed: AIME24 pass@32 0.633, avg -0.304 at 320 steps, 8xH100).
Its config.json must have max_position_embeddings raised to 32768 (prompt + response = 10240
exceeds the shipped 4096)."""

from configs.dapo_common import dapo_config


def get_config():
    return dapo_config(model_path="/models/Qwen2.5-Math-7B", run_dir="runs/dapo_qwen2p5_math_7b",
                       eval_interval=10, max_steps=320,
                       xla_memory_fraction=0.45, micro_forward_batch_size_per_gpu=4)
