"""Overlong handling (DAPO_FACTS section 3): reward shaping and loss-mask filtering.

Like `advantages`, each function computes in its input's namespace (numpy on the host)."""

from __future__ import annotations

from dapo_jax.train.advantages import Array, xp


def soft_overlong_penalty(lengths: Array, max_generate_length: int, buffer_len: int,
                          penalty_factor: float) -> Array:
    """Soft overlong punishment, lengths in TOKENS:

        expected = L_max - L_cache
        penalty  = min(-(|y| - expected) / L_cache * f, 0)      in [-f, 0] for |y| <= L_max
        penalty  = -f                                           for |y| > L_max

    (a sidecar whose limit differs can return a longer response: the paper's R - 1 for
    f = 1, where SkyRL sets the reward to 0 and the formula alone would go below -f).
    Added to the correctness reward (after dynamic sampling has looked at correctness)."""
    if not 0 < buffer_len <= max_generate_length:
        raise ValueError(f"overlong_buffer.len must be in (0, max_generate_length="
                         f"{max_generate_length}], got {buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"overlong_buffer.penalty_factor must be >= 0, got {penalty_factor}")
    np_ = xp(lengths)
    excess = lengths.astype(np_.float32) - np_.float32(max_generate_length - buffer_len)
    f = np_.float32(penalty_factor)
    return np_.clip(-excess / np_.float32(buffer_len) * f, -f, np_.float32(0))


def overlong_filter(loss_mask: Array, truncated: Array) -> Array:
    """Overlong filtering: the tokens of responses whose finish reason is not `stop`
    (`length`: no stop token within max_generate_length; or an aborted request, as SkyRL
    filters) get loss mask 0. `truncated` is per token (true on
    every token of such a response, see `batch.place_sequence_values`), so padded and packed
    rows work alike. Those responses still count in their group's advantage statistics;
    only their tokens stop training."""
    if truncated.shape != loss_mask.shape:
        raise ValueError(f"truncated must be per token like loss_mask {loss_mask.shape}, got "
                         f"{truncated.shape}")
    np_ = xp(loss_mask)
    return np_.where(truncated, np_.zeros_like(loss_mask), loss_mask)
