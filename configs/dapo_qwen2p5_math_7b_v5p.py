"""The seed's Qwen2.5-Math-7B run on a Cloud TPU v5p-8 (4 chips, one host, 95 GiB each): the same
recipe as configs/dapo_qwen2p5_math_7b.py, generation in process (configs/dapo_common.py:on_tpu).
Memory per chip from the v5p compile: bench/RESULTS.md ("The seed's runs on TPU")."""

from configs.dapo_common import on_tpu
from configs.dapo_qwen2p5_math_7b import get_config as gpu_config


def get_config():
    return on_tpu(gpu_config(), run_dir="runs/dapo_qwen2p5_math_7b_v5p", max_num_seqs=256)
