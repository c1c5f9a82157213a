"""The DAPO objective: policy losses, loss reductions, KL and entropy terms, TIS.

Specification: shared/reference/DAPO_FACTS.md sections 1 and 6. All arrays are [B, T]
per-token values aligned with the response tokens; `loss_mask` is 1 on tokens that train.
`segment_ids` says which sequence of its row a token belongs to (k > 0; 0 is padding): rows
may hold several packed sequences, and whatever is per sequence (sequence_mean, GSPO's
sequence ratio, the number of sequences) is computed per segment. None means one sequence
per row.

`LossConfig` holds the settings and checks them once, when built: a bad value is an error
naming its key, never a NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- policy losses
class PolicyLossFn(Protocol):
    def __call__(
        self, logprobs: Array, old_logprobs: Array, advantages: Array, loss_mask: Array, *,
        eps_clip_low: float, eps_clip_high: float, clip_ratio_c: float,
        segment_ids: Array | None,
    ) -> tuple[Array, dict[str, Array]]:
        """Per-token loss [B, T] and per-token 0/1 indicator metrics [B, T]."""


POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Adds a policy loss under `name`; the trainer looks it up by
    `trainer.algorithm.policy_loss_type`, so a new loss needs no trainer edit."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def segment_sums(values: Array, segment_ids: Array | None) -> Array:
    """Per token, the sum of `values` over the tokens of its own sequence (same row, same
    segment id); with `segment_ids` None, over its row."""
    if segment_ids is None:
        return jnp.broadcast_to(jnp.sum(values, -1, keepdims=True), values.shape)
    B, T = values.shape
    ids = jnp.arange(B)[:, None] * T + segment_ids.astype(jnp.int32)  # ids < T per row
    sums = jax.ops.segment_sum(values.ravel(), ids.ravel(), num_segments=B * T)
    return sums[ids]


def num_sequences(loss_mask: Array, segment_ids: Array | None) -> Array:
    """Sequences in the batch (also those whose tokens are all masked out): rows number
    their segments 1..k, so a row holds max(segment_ids) of them."""
    if segment_ids is None:
        return jnp.asarray(loss_mask.shape[0], jnp.float32)
    return jnp.sum(jnp.max(segment_ids, axis=-1)).astype(jnp.float32)


def _ratio(logprobs: Array, old_logprobs: Array) -> Array:
    """r = exp(clamp(logp - logp_old, -20, 20))."""
    return jnp.exp(jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _ppo_clip(ratio: Array, advantages: Array, eps_clip_low: float, eps_clip_high: float):
    """L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) with clip indicators."""
    l1 = -advantages * ratio
    l2 = -advantages * jnp.clip(ratio, 1.0 - eps_clip_low, 1.0 + eps_clip_high)
    loss = jnp.maximum(l1, l2)
    metrics = {
        "clip_frac_high": ((ratio > 1.0 + eps_clip_high) & (advantages > 0)).astype(jnp.float32),
        "clip_frac_low": ((ratio < 1.0 - eps_clip_low) & (advantages < 0)).astype(jnp.float32),
        "ratio": ratio,
    }
    return loss, metrics


@register_policy_loss("regular")
def regular_loss(logprobs, old_logprobs, advantages, loss_mask, *, eps_clip_low, eps_clip_high,
                 clip_ratio_c, segment_ids):
    """PPO clip with decoupled bounds (DAPO clip-higher):
    L = max(-A r, -A clip(r, 1 - eps_clip_low, 1 + eps_clip_high))."""
    del loss_mask, clip_ratio_c, segment_ids
    return _ppo_clip(_ratio(logprobs, old_logprobs), advantages, eps_clip_low, eps_clip_high)


@register_policy_loss("dual_clip")
def dual_clip_loss(logprobs, old_logprobs, advantages, loss_mask, *, eps_clip_low, eps_clip_high,
                   clip_ratio_c, segment_ids):
    """Regular loss, and where A < 0 also bounded by the dual clip:
    L = min(L_regular, -A c)   (c = clip_ratio_c > 1)."""
    del loss_mask, segment_ids
    loss, metrics = _ppo_clip(_ratio(logprobs, old_logprobs), advantages, eps_clip_low,
                              eps_clip_high)
    bound = -advantages * clip_ratio_c
    dual = (advantages < 0) & (loss > bound)
    metrics["dual_clip_frac"] = dual.astype(jnp.float32)
    return jnp.where(advantages < 0, jnp.minimum(loss, bound), loss), metrics


@register_policy_loss("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, loss_mask, *, eps_clip_low, eps_clip_high,
              clip_ratio_c, segment_ids):
    """GSPO (sequence-level ratio, token-level gradient form):
    s_i = exp(mean_t m_it (logp_it - logp_old_it)) over the tokens of sequence i,
    r_it = sg(s_i) * exp(logp_it - sg(logp_it)), then the PPO clip on r_it.
    Use GSPO's small clip ranges (e.g. 3e-4 / 4e-4)."""
    del clip_ratio_c
    mask = loss_mask.astype(jnp.float32)
    log_ratio = jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq_log_ratio = segment_sums(log_ratio * mask, segment_ids) / jnp.maximum(
        segment_sums(mask, segment_ids), 1.0)
    log_r = jax.lax.stop_gradient(seq_log_ratio) + logprobs - jax.lax.stop_gradient(logprobs)
    return _ppo_clip(jnp.exp(jnp.clip(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), advantages,
                     eps_clip_low, eps_clip_high)


# ----------------------------------------------------------------------------- reductions
LOSS_REDUCTIONS = ("token_mean", "sequence_mean", "seq_mean_token_sum_norm")


def reduction_weights(loss_mask: Array, loss_reduction: str,
                      segment_ids: Array | None = None) -> Array:
    """Per-token weights w such that the reduced loss is sum(w * L) / denominator.

    token_mean and seq_mean_token_sum_norm: w = m; sequence_mean: w = m / (trainable tokens
    of the token's sequence), so each sequence with a trainable token weighs 1 in total (and
    one without weighs 0 but still counts in the denominator)."""
    m = loss_mask.astype(jnp.float32)
    if loss_reduction == "sequence_mean":
        return m / jnp.maximum(segment_sums(m, segment_ids), 1.0)
    return m


def reduction_denominator(loss_mask: Array, loss_reduction: str,
                          max_seq_len: int | None = None,
                          segment_ids: Array | None = None) -> Array:
    """The normaliser of a whole mini-batch (sum it over micro-batches/devices first, or pass
    the full mini-batch mask):

    token_mean: sum(m); sequence_mean: the number of sequences, also those whose tokens are
    all masked (overlong-filtered: they add 0 and count, SkyRL's and GRPO's 1/G over all
    samples); seq_mean_token_sum_norm: the number of sequences x max_seq_len (Dr. GRPO's
    constant)."""
    m = loss_mask.astype(jnp.float32)
    if loss_reduction == "token_mean":
        return jnp.sum(m)
    if loss_reduction == "sequence_mean":
        return num_sequences(m, segment_ids)
    if loss_reduction == "seq_mean_token_sum_norm":
        return num_sequences(m, segment_ids) * max_seq_len
    raise ValueError(f"loss_reduction {loss_reduction!r} is not one of {LOSS_REDUCTIONS}")


def reduce_loss(values: Array, loss_mask: Array, loss_reduction: str, *,
                max_seq_len: int | None = None, denominator: Array | None = None,
                segment_ids: Array | None = None) -> Array:
    """sum(w * values) / denominator; the denominator defaults to this batch's own."""
    if denominator is None:
        denominator = reduction_denominator(loss_mask, loss_reduction, max_seq_len, segment_ids)
    numerator = jnp.sum(reduction_weights(loss_mask, loss_reduction, segment_ids) * values)
    return numerator / jnp.maximum(denominator, 1.0)


# ----------------------------------------------------------------------------- extra terms
KL_ESTIMATORS = ("k1", "abs", "k2", "k3")


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "k3") -> Array:
    """Per-token KL(pi || pi_ref) estimate with d = logp_ref - logp (differentiable in logp):
    k1 = -d; abs = |d|; k2 = d^2 / 2; k3 = clamp(exp(clamp(d, -20, 20)) - d - 1, -10, 10)."""
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "abs":
        return jnp.abs(d)
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"kl estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def tis_weights(old_logprobs: Array, rollout_logprobs: Array, cap: float) -> Array:
    """Truncated importance sampling for rollout/trainer mismatch (no gradient):
    w = min(exp(logp_old - logp_rollout), cap).

    It is also the off-policy correction of asynchronous training (`trainer.fully_async`):
    the old log-probs are recomputed with the trainer's weights at the step (the proximal
    policy pi_prox of decoupled PPO, Hilton et al. 2021, as AReaL uses it, arXiv
    2505.24298), the rollout log-probs are the behaviour policy pi_behav that generated the
    tokens, possibly some steps older. The per-token loss is then
        -min(exp(logp_old - logp_rollout), cap) * min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
        r = exp(logp - logp_old),
    decoupled PPO with its behaviour weight pi_prox / pi_behav truncated at `cap` (TIS, Yao
    et al. 2025); the trust region is around pi_prox, not around the stale pi_behav."""
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    log_w = jnp.clip(old_logprobs - rollout_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


# ----------------------------------------------------------------------------- the loss
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss's settings: `trainer.algorithm`'s keys under SkyRL's names, and the one place
    of their defaults (`train/config.py` reads them). Checked once, when built: a bad value
    is a ValueError starting with its key, never a NaN."""

    policy_loss_type: str = "regular"  # any registered: regular | dual_clip | gspo
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.28  # DAPO's clip-higher
    clip_ratio_c: float = 3.0  # dual_clip's bound on negative advantages
    loss_reduction: str = "token_mean"
    max_seq_len: int | None = None  # seq_mean_token_sum_norm's constant
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_estimator_type: str = "k3"
    use_entropy_loss: bool = False
    entropy_loss_coef: float = 0.01
    use_tis: bool = False  # truncated importance sampling (`tis_weights`)
    tis_imp_ratio_cap: float = 2.0
    temperature: float = 1.0  # the sampling temperature: log-probs of that distribution

    def __post_init__(self) -> None:
        if self.policy_loss_type not in POLICY_LOSSES:
            raise ValueError(f"policy_loss_type: {self.policy_loss_type!r} is not one of "
                             f"{sorted(POLICY_LOSSES)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: {self.loss_reduction!r} is not one of "
                             f"{LOSS_REDUCTIONS}")
        for key in ("eps_clip_low", "eps_clip_high"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.eps_clip_low >= 1:
            raise ValueError(f"eps_clip_low: must be < 1, got {self.eps_clip_low}")
        if self.policy_loss_type == "dual_clip" and self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c: must be > 1 for dual_clip, got "
                             f"{self.clip_ratio_c}")
        if self.loss_reduction == "seq_mean_token_sum_norm" and (
                self.max_seq_len is None or self.max_seq_len < 1):
            raise ValueError("max_seq_len: loss_reduction seq_mean_token_sum_norm needs "
                             "max_seq_len >= 1")
        if self.kl_estimator_type not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator_type: {self.kl_estimator_type!r} is not one of "
                             f"{KL_ESTIMATORS}")
        if self.use_tis and self.tis_imp_ratio_cap <= 0:
            raise ValueError(f"tis_imp_ratio_cap: must be > 0, got {self.tis_imp_ratio_cap}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")

    @property
    def kl_coef(self) -> float:
        return self.kl_loss_coef if self.use_kl_loss else 0.0

    @property
    def entropy_coef(self) -> float:
        return self.entropy_loss_coef if self.use_entropy_loss else 0.0

    @property
    def tis_cap(self) -> float | None:
        return self.tis_imp_ratio_cap if self.use_tis else None


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    loss_mask: Array,
    cfg: LossConfig,
    *,
    token_weights: Array | None = None,
    denominator: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Reduced policy-gradient loss (a scalar) and metrics (masked token means, except
    `num_tokens`): `cfg.policy_loss_type`'s per-token loss, reduced by `cfg.loss_reduction`.

    `token_weights` multiplies the per-token loss (TIS weights); `denominator` is the
    mini-batch-wide normaliser from `reduction_denominator` when this call sees only a
    micro-batch (so gradients do not depend on how the mini-batch is split).
    """
    shapes = {"logprobs": logprobs.shape, "old_logprobs": old_logprobs.shape,
              "advantages": advantages.shape, "loss_mask": loss_mask.shape}
    if token_weights is not None:
        shapes["token_weights"] = token_weights.shape
    if len(set(shapes.values())) != 1 or logprobs.ndim != 2:
        raise ValueError(f"policy_loss needs equal [B, T] shapes, got {shapes}")
    per_token, indicators = POLICY_LOSSES[cfg.policy_loss_type](
        logprobs, old_logprobs, advantages, loss_mask, eps_clip_low=cfg.eps_clip_low,
        eps_clip_high=cfg.eps_clip_high, clip_ratio_c=cfg.clip_ratio_c,
        segment_ids=segment_ids)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = reduce_loss(per_token, loss_mask, cfg.loss_reduction, max_seq_len=cfg.max_seq_len,
                       denominator=denominator, segment_ids=segment_ids)
    indicators["approx_kl"] = old_logprobs - logprobs
    indicators.setdefault("dual_clip_frac", jnp.zeros_like(logprobs))
    metrics = {k: masked_mean(v, loss_mask) for k, v in indicators.items()}
    metrics["num_tokens"] = jnp.sum(loss_mask.astype(jnp.float32))
    return loss, metrics


def masked_mean(values: Array, mask: Array) -> Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(jax.lax.stop_gradient(values) * m) / jnp.maximum(jnp.sum(m), 1.0)


def total_loss(
    logprobs: Array,
    entropy: Array,
    batch: dict[str, Array],
    cfg: LossConfig,
    *,
    denominator: Array,
    num_sequences_total: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """policy_loss + kl_coef * KL - entropy_coef * entropy (`cfg`: the coefficients where
    use_kl_loss / use_entropy_loss, else 0; TIS weights where use_tis).

    The policy loss and the entropy bonus use `loss_reduction` with the mini-batch's
    `denominator`. The KL term is a sequence mean whatever `loss_reduction` is, as SkyRL
    reduces it: KL = (1/S) sum_i (sum_t m_it kl_it / sum_t m_it) over all S sequences of the
    mini-batch (`num_sequences_total`; default: this batch's), each sequence's per-token KL
    weighing 1 however long it is.

    `batch` holds old_logprobs, advantages, loss_mask, optionally segment_ids (packed rows),
    ref_logprobs (KL) and rollout_logprobs (TIS weights; always the `rollout_abs_diff`
    metric, mean |old - rollout| over the loss mask's tokens)."""
    mask = batch["loss_mask"]
    segments = batch.get("segment_ids")
    weights = None
    if cfg.tis_cap is not None:
        weights = tis_weights(batch["old_logprobs"], batch["rollout_logprobs"], cfg.tis_cap)
    loss, metrics = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                cfg, token_weights=weights, denominator=denominator,
                                segment_ids=segments)
    metrics["pg_loss"] = loss
    if cfg.kl_coef:
        if num_sequences_total is None:
            num_sequences_total = num_sequences(mask, segments)
        kl = reduce_loss(kl_penalty(logprobs, batch["ref_logprobs"], cfg.kl_estimator_type),
                         mask, "sequence_mean", denominator=num_sequences_total,
                         segment_ids=segments)
        loss = loss + cfg.kl_coef * kl
        metrics["kl_loss"] = kl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * reduce_loss(
            entropy, mask, cfg.loss_reduction, max_seq_len=cfg.max_seq_len,
            denominator=denominator, segment_ids=segments)
    metrics["entropy"] = masked_mean(entropy, mask)
    if weights is not None:
        metrics["tis_weight"] = masked_mean(weights, mask)
    if "rollout_logprobs" in batch:  # the trainer vs the sampler, on the tokens that train
        metrics["rollout_abs_diff"] = masked_mean(
            jnp.abs(batch["old_logprobs"] - batch["rollout_logprobs"]), mask)
    return loss, metrics
