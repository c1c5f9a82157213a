"""Architecture of a Qwen2/Qwen2.5/Qwen3 decoder, read from (and written to) HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """The shape of the network. Qwen2 vs Qwen3 differ only in `qkv_bias` and `qk_norm`."""

    model_type: str  # "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v projections
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a tuple keeps the config hashable

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {list(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d + (2 * h if self.qk_norm else 0)
        layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> QwenConfig:
        """Builds the config from a HF config dict; unsupported features are errors."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"{source}: model_type {model_type!r} (architectures "
                f"{hf.get('architectures')}) is not supported; expected one of "
                f"{list(ARCHITECTURES)}"
            )
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
        # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{source}: rope type {rope_type!r} is not supported (only default RoPE); "
                "refusing to run with silently wrong positions"
            )
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        is_qwen3 = model_type == "qwen3"
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else True,
            qk_norm=is_qwen3,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos := hf.get("eos_token_id"), list) else eos,
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers and vLLM load unchanged."""
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.qkv_bias
        elif self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError("Qwen2 requires head_dim * num_attention_heads == hidden_size")
        return hf


def _qwen3(**kw: Any) -> QwenConfig:
    base = dict(
        model_type="qwen3",
        vocab_size=151936,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qkv_bias=False,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    return QwenConfig(**{**base, **kw})


def _qwen2(**kw: Any) -> QwenConfig:
    base = dict(
        model_type="qwen2",
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
    )
    return QwenConfig(**{**base, **kw})


# Shapes for random init and memory planning without weights. The tiny presets keep
# head_dim 64 because vLLM's CPU attention rejects smaller heads.
PRESETS: dict[str, QwenConfig] = {
    "qwen2.5-math-7b": _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=4096,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen3-0.6b": _qwen3(
        hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8
    ),
    "qwen3-1.7b": _qwen3(
        hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8
    ),
    "qwen3-4b": _qwen3(
        hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8
    ),
    "qwen3-tiny": _qwen3(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=None,
    ),
    "qwen2-tiny": _qwen2(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=1024,
    ),
    # The CPU benchmark shapes of ENVIRONMENT.md.
    "bench-small": _qwen3(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=None,
    ),
    "bench-medium": _qwen3(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
        num_kv_heads=4, head_dim=64, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=None,
    ),
}


def preset(name: str, **overrides: Any) -> QwenConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
