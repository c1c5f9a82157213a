"""The seed's Qwen3-4B-Base run on a Cloud TPU v6e-8 (8 chips, one host, 32 GiB each): the same
recipe as configs/dapo_qwen3_4b.py, generation in process (configs/dapo_common.py:on_tpu).
Memory per chip from the v6e compile: bench/RESULTS.md ("The seed's runs on TPU"). The
Qwen2.5-Math-7B run does not fit a v6e chip (update at micro-batch 1: 31.8 GiB + 1.8 GiB of
rollout weights > 32 GiB): use configs/dapo_qwen2p5_math_7b_v5p.py."""

from configs.dapo_common import on_tpu
from configs.dapo_qwen3_4b import get_config as gpu_config


def get_config():
    return on_tpu(gpu_config(), run_dir="runs/dapo_qwen3_4b_v6e", max_num_seqs=64)
