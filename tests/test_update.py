"""The jitted update step: micro-batch and device invariance, learning sign, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dapo_jax.models import init_model, preset
from dapo_jax.sharding import batch_sharding, make_mesh
from dapo_jax.train.objective import LossConfig
from dapo_jax.train.update import (
    OptimizerConfig,
    choose_remat,
    init_optimizer,
    lr_schedule,
    make_optimizer,
    make_train_fns,
)
from tests import hf_models
from tests.compiles import counting_compiles

CFG = preset("qwen3-tiny")


def make_batch(seed: int = 0, n: int = 8, t: int = 16) -> dict[str, np.ndarray]:
    ids, mask = hf_models.rl_batch(batch=n, length=t, vocab=CFG.vocab_size, seed=seed)
    rng = np.random.default_rng(seed)
    # Response = the real tokens after the 5th position: prompts are left-padded to col 5.
    loss_mask = (mask * (np.arange(t)[None, :] >= 5)).astype(np.float32)
    return {
        "input_ids": ids, "segment_ids": mask,
        "positions": np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32),
        "loss_mask": loss_mask,
        "old_logprobs": rng.normal(-6.3, 0.3, (n, t)).astype(np.float32),
        "advantages": (rng.normal(size=(n, 1)) * loss_mask).astype(np.float32),
        "ref_logprobs": rng.normal(-6.3, 0.3, (n, t)).astype(np.float32),
        "rollout_logprobs": rng.normal(-6.3, 0.3, (n, t)).astype(np.float32),
    }


def sgd_gradient(loss_cfg, num_micro, mesh=None, batch=None):
    """The mini-batch gradient, read off one SGD(lr=1) step: g = params_before - params_after."""
    model = init_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    before = jax.tree.map(np.asarray, params)
    opt = optax.sgd(1.0)
    fns = make_train_fns(graphdef, params, opt, loss_cfg, micro_batch_rows=8 // num_micro,
                         mesh=mesh)
    batch = batch if batch is not None else make_batch()
    if mesh is not None:
        sh = batch_sharding(mesh)
        batch = {k: jax.device_put(v, sh) for k, v in batch.items()}
    params, _, metrics = fns.update(params, init_optimizer(opt, params), batch)
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, params)
    return jax.tree.leaves(grads), metrics


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gradient_independent_of_micro_batches(reduction):
    cfg = LossConfig(policy_loss_type="dual_clip", loss_reduction=reduction, use_tis=True)
    g1, m1 = sgd_gradient(cfg, 1)
    for num_micro in (2, 4):
        g, m = sgd_gradient(cfg, num_micro)
        for a, b in zip(g1, g, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["clip_frac_low"], m1["clip_frac_low"], rtol=1e-5)
    assert float(m1["grad_norm"]) > 0


def test_gradient_same_on_8_devices():
    cfg = LossConfig(loss_reduction="token_mean")
    g1, m1 = sgd_gradient(cfg, 2)
    g8, m8 = sgd_gradient(cfg, 2, mesh=make_mesh((2, 2, 2)))
    for a, b in zip(g1, g8, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_kl_loss_changes_the_gradient():
    base, _ = sgd_gradient(LossConfig(), 1)
    with_kl, m = sgd_gradient(LossConfig(use_kl_loss=True, kl_loss_coef=1.0,
                                         kl_estimator_type="k3"), 1)
    assert float(m["kl_loss"]) > 0
    diff = sum(float(np.abs(a - b).sum()) for a, b in zip(base, with_kl, strict=True))
    assert diff > 1e-3


def test_training_raises_logprobs_of_positive_advantage_tokens():
    """Sign check of the whole chain: log-prob recompute -> loss -> grad -> AdamW."""
    model = init_model(CFG, seed=1)
    graphdef, params = nnx.split(model)
    opt = make_optimizer(OptimizerConfig(lr=3e-3, weight_decay=0.0))
    fns = make_train_fns(graphdef, params, opt, LossConfig(), micro_batch_rows=4)
    batch = make_batch(seed=2)
    logp0 = fns.logprobs(params, batch["input_ids"], batch["segment_ids"], batch["positions"])
    batch["old_logprobs"] = np.asarray(logp0)
    adv = np.where(np.arange(8)[:, None] % 2 == 0, 1.0, -1.0) * batch["loss_mask"]
    batch["advantages"] = adv.astype(np.float32)
    opt_state = init_optimizer(opt, params)
    params, opt_state, metrics = fns.update(params, opt_state, batch)
    with counting_compiles() as compiled:
        for _ in range(4):
            params, opt_state, metrics = fns.update(params, opt_state, batch)
    assert compiled[0] == 0  # no recompiles after the first step
    logp1 = fns.logprobs(params, batch["input_ids"], batch["segment_ids"], batch["positions"])
    delta = np.asarray(logp1 - logp0)
    pos, neg = adv > 0, adv < 0
    assert delta[pos].mean() > 0.1, delta[pos].mean()
    assert delta[neg].mean() < -0.1, delta[neg].mean()
    assert float(metrics["lr"]) == pytest.approx(3e-3)


def test_optimizer_state_follows_parameter_sharding():
    mesh = make_mesh((1, 4, 2))
    model = init_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    opt = make_optimizer(OptimizerConfig(lr=1e-3))
    opt_state = init_optimizer(opt, params)

    def check(params, opt_state):
        mu = opt_state[1].inner_state[0].mu
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mu), strict=True):
            assert p.sharding.is_equivalent_to(m.sharding, p.ndim)
        assert jax.tree.leaves(params)[0].sharding.spec == jax.sharding.PartitionSpec(
            "tensor", "fsdp")

    check(params, opt_state)
    fns = make_train_fns(graphdef, params, opt, LossConfig(), mesh=mesh)
    sh = batch_sharding(mesh)
    batch = {k: jax.device_put(v, sh) for k, v in make_batch().items()}
    params, opt_state, _ = fns.update(params, opt_state, batch)
    check(params, opt_state)  # the step keeps both layouts


def test_lr_schedule_warmup_constant_and_cosine():
    s = lr_schedule(OptimizerConfig(lr=1.0, num_warmup_steps=4))
    np.testing.assert_allclose([s(t) for t in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])
    c = lr_schedule(OptimizerConfig(lr=1.0, num_warmup_steps=2, scheduler="cosine",
                                    total_steps=6))
    np.testing.assert_allclose([c(t) for t in (0, 1, 2, 4, 6)], [0.5, 1.0, 1.0, 0.5, 0.0],
                               rtol=1e-6, atol=1e-7)


def test_batch_errors_are_clear():
    model = init_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    opt = optax.sgd(1.0)
    fns = make_train_fns(graphdef, params, opt, LossConfig(use_kl_loss=True, kl_loss_coef=0.1))
    batch = make_batch()
    del batch["ref_logprobs"]
    with pytest.raises(ValueError, match="missing.*ref_logprobs"):
        fns.update(params, init_optimizer(opt, params), batch)
    batch = make_batch()
    batch["advantages"] = batch["advantages"][:, :-1]
    with pytest.raises(ValueError, match="advantages"):
        fns.update(params, init_optimizer(opt, params), batch)
    with pytest.raises(ValueError, match="micro-batches"):
        make_train_fns(graphdef, params, opt, LossConfig(), micro_batch_rows=3).update(
            params, init_optimizer(opt, params), make_batch())
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossConfig(policy_loss_type="dual_clip", clip_ratio_c=0.5)


def test_weight_decay_mask_and_float32_hyperparameters():
    """The optimiser state holds the hyperparameters in float32 and no `mask` entry (it is
    static, not a schedule); with zero gradients one AdamW step shrinks exactly the weight
    matrices by (1 - lr * weight_decay) and leaves norm scales alone."""
    params = nnx.split(init_model(CFG, seed=0))[1]
    opt = make_optimizer(OptimizerConfig(lr=0.5, weight_decay=0.1))
    state = init_optimizer(opt, params)
    hyper = state[1].hyperparams
    assert "mask" not in hyper
    assert {k: v.dtype for k, v in hyper.items()} == {k: np.dtype("float32") for k in hyper}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = opt.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    for (path, before), (_, after) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new),
                                          strict=True):
        a, b = np.asarray(before.get_value()), np.asarray(after.get_value())
        decayed = "norm" not in "/".join(map(str, path))
        np.testing.assert_allclose(b, a * (0.95 if decayed else 1.0), rtol=1e-6,
                                   err_msg=str(path))


def test_float32_master_weights_move_at_the_seed_learning_rate():
    """At the seed runs' first warmup step (lr 1e-6 / 160) float32 master weights change;
    the same step rounded to bf16 leaves (nearly) every weight where it was, which is why
    bf16 master weights are refused."""
    model = init_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    opt = make_optimizer(OptimizerConfig(lr=1e-6, num_warmup_steps=160, weight_decay=0.1))
    fns = make_train_fns(graphdef, params, opt, LossConfig())
    before = np.asarray(params["layers"]["mlp"]["up_proj"].get_value())
    new, _, _ = fns.update(params, init_optimizer(opt, params), make_batch())
    after = np.asarray(new["layers"]["mlp"]["up_proj"].get_value())
    assert after.dtype == np.float32
    assert np.mean(after != before) > 0.9
    as_bf16 = lambda x: np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16))
    assert np.mean(as_bf16(after) != as_bf16(before)) < 0.01


def test_remat_auto_takes_the_least_recompute_that_fits():
    """choose_remat compiles (here: looks up) each policy's update peak, least recompute
    first, and keeps the first whose peak + 10% fits; full when none does."""
    peaks = {"none": 10.0, "dots_saveable": 8.0, "minimal": 6.0, "full": 4.0}
    asked = []

    def peak(policy):
        asked.append(policy)
        return peaks[policy]

    choice = choose_remat(peak, budget_bytes=7.0)
    assert choice.policy == "minimal" and asked == ["none", "dots_saveable", "minimal"]
    assert choose_remat(peaks.get, budget_bytes=11.0).policy == "none"
    assert choose_remat(peaks.get, budget_bytes=10.5).policy == "dots_saveable"  # headroom
    nothing = choose_remat(peaks.get, budget_bytes=1.0)
    assert nothing.policy == "full" and list(nothing.peaks) == list(peaks)
    assert "nothing fits" in nothing.describe() and "nothing fits" not in choice.describe()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_never_holds_the_buffers_the_update_donates(dtype):
    """The in-process engine's weights are a cast or a copy of the trainer's: the update
    donates the trainer's parameters, and the engine still serves the old weights after it
    (a shared buffer would be deleted under it, or silently overwritten)."""
    from rollout.engines import InProcessEngine

    mesh = make_mesh((1, -1, 1))
    graphdef, params = nnx.split(init_model(CFG, seed=0, mesh=mesh))
    engine = InProcessEngine(graphdef, params, dtype, mesh=mesh, own_mesh=False,
                             stop_token_ids=[0], max_model_len=32, pad_token_id=0,
                             max_num_seqs=8)
    served = engine.prepare(graphdef, params, 1, 1)
    pointers = lambda tree: {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
                             for s in x.addressable_shards}
    assert not pointers(served) & pointers(params)
    # Read on the host from a copy: a host read of `params` itself would pin their buffers
    # (JAX keeps the NumPy view), and XLA does not donate a pinned buffer.
    before = jax.tree.map(lambda x: np.asarray(jnp.copy(x).astype(dtype)), params)
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    fns = make_train_fns(graphdef, params, opt, LossConfig(), mesh=mesh)
    batch = make_batch()
    batch["old_logprobs"] = np.asarray(fns.logprobs(params, batch["input_ids"],
                                                    batch["segment_ids"], batch["positions"]))
    new_params, _, _ = fns.update(params, init_optimizer(opt, params), batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # donated
    for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert not pointers(engine.prepare(graphdef, new_params, 2, 2)) & pointers(new_params)
