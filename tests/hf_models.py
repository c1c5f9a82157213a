"""Tiny random Qwen2/Qwen3 models built with transformers, and RL-shaped padded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

COMMON = dict(
    vocab_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-6,
)
VARIANTS: dict[str, tuple[type, dict]] = {
    # Qwen3: q/k norm, no bias, tied embeddings, GQA 4:2.
    "qwen3_tied": (transformers.Qwen3Config, dict(
        hidden_size=128, intermediate_size=256, tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3_untied": (transformers.Qwen3Config, dict(
        hidden_size=128, intermediate_size=256, tie_word_embeddings=False,
        rope_theta=1_000_000.0)),
    # Qwen2 / Qwen2.5-Math: q/k/v bias, untied lm_head, GQA 4:2.
    "qwen2_bias_untied": (transformers.Qwen2Config, dict(
        hidden_size=256, intermediate_size=512, tie_word_embeddings=False, rope_theta=10000.0)),
}


def _config(name: str):
    cls, kw = VARIANTS[name]
    kw = {**COMMON, **kw}
    theta = kw.pop("rope_theta")
    return cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})


def make_random(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random model whose norms and biases are perturbed too (HF inits them to 1 and 0,
    which would hide a mis-mapped norm or bias)."""
    torch.manual_seed(seed)
    cfg = _config(name)
    cls = transformers.Qwen3ForCausalLM if cfg.model_type == "qwen3" else (
        transformers.Qwen2ForCausalLM)
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_random(name: str, path: Path, seed: int = 0) -> str:
    make_random(name, seed).save_pretrained(path)
    return str(path)


def load_hf(path: str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray):
    """float32 logits with positions derived from the mask (as generation does)."""
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(positions).long())
    return out.logits.float().numpy()


def rl_batch(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts followed by right-padded responses, varied per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        left = int(rng.integers(0, length // 3))
        right = int(rng.integers(0, length // 3))
        mask[b, :left] = 0
        mask[b, length - right:] = 0
    mask[0] = 1  # one row without padding
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask
