"""Qwen2/Qwen2.5/Qwen3 in Flax NNX, HF checkpoint I/O and memory-lean log-probs."""

from dapo_jax.models.checkpoint import load_pretrained, read_config, save_pretrained
from dapo_jax.models.config import PRESETS, QwenConfig, preset
from dapo_jax.models.logprobs import token_logprobs
from dapo_jax.models.qwen import Precision, Qwen, init_model, state_shardings

__all__ = [
    "PRESETS",
    "Precision",
    "Qwen",
    "QwenConfig",
    "init_model",
    "load_pretrained",
    "preset",
    "read_config",
    "save_pretrained",
    "state_shardings",
    "token_logprobs",
]
