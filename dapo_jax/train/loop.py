"""The DAPO training loop (host side). One step:

    generate -> rewards -> dynamic sampling -> soft overlong punishment -> overlong filtering
    -> advantages -> old log-probs (recomputed; TIS against rollout log-probs) -> mini-batch
    updates -> weight sync -> metrics, checkpoint, eval

Everything inside jit lives in `update.py`; this file moves data between the pieces.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from dapo_jax.generation import Generator, Sample, SamplingParams, stop_token_ids
from dapo_jax.models import load_pretrained
from dapo_jax.prompts import (
    Example,
    PromptSampler,
    SamplerState,
    arithmetic_examples,
    encode_prompts,
    filter_by_length,
    load_examples,
)
from dapo_jax.rewards import RewardPool
from dapo_jax.sharding import DistributedConfig, initialize_distributed, make_mesh
from dapo_jax.train import advantages as adv_lib
from dapo_jax.train import config as config_lib
from dapo_jax.train.batch import pack_sequences, place_response_values
from dapo_jax.train.checkpointing import Checkpointer, resolve_resume
from dapo_jax.train.dynamic_sampling import DynamicSamplingState, accumulate
from dapo_jax.train.metrics_log import MetricsLog
from dapo_jax.train.shaping import overlong_filter, soft_overlong_penalty
from dapo_jax.train.update import (
    LossConfig,
    OptimizerConfig,
    init_optimizer,
    make_optimizer,
    make_train_fns,
    mini_batches,
)


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class PromptSet:
    examples: list[Example]
    ids: list[list[int]]
    dropped_overlong: int
    duplicates: int


def load_prompt_set(spec: str, tokenizer: Any, cfg: ConfigDict, split: str) -> PromptSet:
    if spec == "builtin:arithmetic":
        size = cfg.data.builtin_train_size if split == "train" else cfg.data.builtin_val_size
        examples, dups = arithmetic_examples(size, seed=cfg.trainer.seed, split=split), 0
    else:
        examples, dups = load_examples(spec)
    ids = encode_prompts(tokenizer, examples)
    examples, ids, dropped = filter_by_length(examples, ids, cfg.trainer.max_prompt_length,
                                              cfg.data.overlong_prompts, spec)
    return PromptSet(examples, ids, dropped, dups)


# ----------------------------------------------------------------------------- engines
class InProcessEngine:
    """The JAX generation engine in this process; weight sync is a pointer swap."""

    def __init__(self, generator: Generator):
        self.generator = generator

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 n: int) -> list[list[Sample]]:
        return self.generator.generate(prompts, sampling, n)

    def sync(self, model: Any, params: Any, step: int, version: int) -> None:
        del model, step
        self.generator.set_params(params, version)


class SidecarEngine:
    """Rollout sidecars over HTTP; weight sync is an orbax export pushed to each."""

    def __init__(self, urls: list[str], token: str, export_dir: Path):
        from dapo_jax.rollout_client import RolloutClient

        self.client = RolloutClient(urls, token=token or None)
        self.export_dir = export_dir

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 n: int) -> list[list[Sample]]:
        return self.client.generate(prompts, sampling, n)

    def sync(self, model: Any, params: Any, step: int, version: int) -> None:
        from dapo_jax.weight_export import export_weights

        nnx.update(model, params)
        path = export_weights(model, self.export_dir, step=step, version=version)
        self.client.update_weights(str(path), version)


# ----------------------------------------------------------------------------- rollouts
def rollout(engine: Any, prompt_set: PromptSet, indices: list[int], sampling: SamplingParams,
            n: int, tokenizer: Any, rewards: RewardPool, version: int,
            timings: dict[str, float]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Generates n responses per prompt and scores them: one row per response, groups
    contiguous, and the reward pool's failure counts. Refuses samples generated with another
    weight version than `version`."""
    start = time.perf_counter()
    groups = engine.generate([prompt_set.ids[i] for i in indices], sampling, n)
    timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - start
    samples = [s for g in groups for s in g]
    stale = {s.weight_version for s in samples} - {version}
    if stale:
        raise RuntimeError(f"rollout generated with weight version(s) {sorted(stale)}, "
                           f"expected {version}: refusing stale weights")
    rows = np.repeat(np.asarray(indices), n)
    start = time.perf_counter()
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
    results, stats = rewards.score(texts, [prompt_set.examples[i].ground_truth for i in rows])
    timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - start
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # ragged rows, kept as lists
    return {
        "prompt_index": rows,
        "prompt_ids": obj([prompt_set.ids[i] for i in rows]),
        "response_ids": obj([s.token_ids for s in samples]),
        "rollout_logprobs": obj([s.logprobs for s in samples]),
        "text": obj(texts),
        "score": np.array([r.score for r in results], np.float32),
        "acc": np.array([r.acc for r in results], bool),
        "truncated": np.array([s.finish_reason == "length" for s in samples], bool),
    }, stats


def reward_metrics(drawn: list[tuple[dict[str, np.ndarray], dict[str, float]]],
                   n: int) -> dict[str, float]:
    """Reward metrics over EVERY response generated this step. (The batch dynamic sampling
    keeps holds only groups with mixed outcomes, so its accuracy drifts towards the middle
    whatever the policy does; it is reported separately as reward/kept_accuracy.)"""
    acc = np.concatenate([batch["acc"] for batch, _ in drawn])
    score = np.concatenate([batch["score"] for batch, _ in drawn])
    out = {"reward/avg_raw_reward": float(score.mean()), "reward/accuracy": float(acc.mean()),
           f"reward/avg_pass_at_{n}": pass_at(acc, n)}
    for key in ("reward/timeouts", "reward/errors"):
        out[key] = float(sum(stats[key] for _, stats in drawn))
    return out


def pass_at(acc: np.ndarray, group_size: int) -> float:
    """Fraction of prompts with at least one correct response among its `group_size`."""
    return float(acc.reshape(-1, group_size).any(axis=1).mean())


# ----------------------------------------------------------------------------- the run
def run(cfg: ConfigDict) -> dict[str, float]:
    """Trains per `cfg`; returns the last step's metrics."""
    initialize_distributed(DistributedConfig(cfg.mesh.coordinator_address or None,
                                             cfg.mesh.num_processes or None,
                                             cfg.mesh.process_id))
    sizes = config_lib.validate(cfg, jax.device_count())
    t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
    primary = jax.process_index() == 0
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    mesh = make_mesh(cfg.mesh.shape)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set = load_prompt_set(cfg.data.train_data, tokenizer, cfg, "train")
    val_set = load_prompt_set(cfg.data.val_data, tokenizer, cfg, "eval") if \
        cfg.data.val_data else None
    max_steps = config_lib.total_steps(cfg, len(train_set.examples))

    load = lambda: load_pretrained(cfg.model.path, dtype=cfg.model.dtype,
                                   compute_dtype=cfg.model.compute_dtype or None,
                                   remat=cfg.model.remat, mesh=mesh)
    model = load()
    graphdef, params = nnx.split(model)
    ref_params = nnx.split(load())[1] if alg.use_kl_loss else None
    P, R = t.max_prompt_length, g.sampling_params.max_generate_length
    loss_cfg = LossConfig(
        policy_loss_type=alg.policy_loss_type, eps_clip_low=alg.eps_clip_low,
        eps_clip_high=alg.eps_clip_high, clip_ratio_c=alg.clip_ratio_c,
        loss_reduction=alg.loss_reduction, max_seq_len=sizes["max_seq_len"],
        use_kl_loss=alg.use_kl_loss, kl_loss_coef=alg.kl_loss_coef,
        kl_estimator=alg.kl_estimator_type,
        entropy_coef=alg.entropy_loss_coef if alg.use_entropy_loss else 0.0,
        tis_cap=alg.tis_imp_ratio_cap if alg.use_tis else None,
        temperature=g.sampling_params.temperature or 1.0)
    opt = t.policy.optimizer_config
    updates_per_step = (t.train_batch_size // t.policy_mini_batch_size) * \
        t.update_epochs_per_batch
    optimizer = make_optimizer(OptimizerConfig(
        lr=opt.lr, warmup_steps=opt.num_warmup_steps, schedule=opt.scheduler,
        total_steps=max(max_steps * updates_per_step, opt.num_warmup_steps + 1),
        weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm,
        b1=opt.adam_betas[0], b2=opt.adam_betas[1]))
    opt_state = init_optimizer(optimizer, params)
    fns = make_train_fns(graphdef, params, optimizer, loss_cfg,
                         num_micro_batches=sizes["num_micro"], mesh=mesh)

    stops = stop_token_ids(cfg.model.path)
    if g.backend == "jax":
        engine: Any = InProcessEngine(Generator(
            graphdef, params, stop_token_ids=stops, max_model_len=P + max(
                R, g.eval_sampling_params.max_generate_length), pad_token_id=pad_id, mesh=mesh))
    else:
        engine = SidecarEngine(list(g.sidecar_urls), g.sidecar_token,
                               Path(g.export_dir or run_dir / "exports"))
    rewards = RewardPool(cfg.reward.fn, workers=cfg.reward.num_workers,
                         timeout_s=cfg.reward.timeout_s)

    # ------------------------------------------------------------------ resume
    ckpt = Checkpointer(run_dir / "checkpoints", keep=t.max_ckpts_to_keep)
    sampler = PromptSampler(len(train_set.examples), seed=t.seed)
    start_step, version = 0, 0
    resume = resolve_resume(t.resume_mode, run_dir / "checkpoints", t.resume_path)
    if resume is not None:
        source = ckpt if resume[0] == ckpt.directory else Checkpointer(resume[0], keep=10**6)
        params, opt_state, host = source.restore(resume[1], params, opt_state)
        start_step, version = host["step"], host["weight_version"]
        sampler.state = SamplerState(**host["sampler"])
        print(f"resumed from {resume[0]}/{resume[1]} (step {start_step})")
        # A fresh run needs no sync: the generator holds the base weights and sidecars start
        # on them as version 0.
        engine.sync(model, params, start_step, version)

    log = MetricsLog(run_dir, t.logger, project=t.project_name, run_name=t.run_name,
                     config=json.loads(cfg.to_json_best_effort()), write=primary)
    train_sampling = SamplingParams(
        temperature=g.sampling_params.temperature, top_p=g.sampling_params.top_p,
        top_k=g.sampling_params.top_k, max_tokens=R)
    eval_sampling = SamplingParams(
        temperature=g.eval_sampling_params.temperature, top_p=g.eval_sampling_params.top_p,
        top_k=g.eval_sampling_params.top_k,
        max_tokens=g.eval_sampling_params.max_generate_length)
    data_metrics = {"data/train_prompts": len(train_set.examples),
                    "data/dropped_overlong_prompts": train_set.dropped_overlong,
                    "data/duplicates_removed": train_set.duplicates}

    def evaluate(step: int) -> dict[str, float]:
        if val_set is None:
            return {}
        k = g.eval_n_samples_per_prompt
        sp = dataclasses.replace(eval_sampling, seed=t.seed)
        out, stats = rollout(engine, val_set, list(range(len(val_set.examples))), sp, k,
                             tokenizer, rewards, version, {})
        if primary:
            (run_dir / "eval").mkdir(exist_ok=True)
            with open(run_dir / "eval" / f"step_{step}.jsonl", "w") as f:
                for i in range(len(out["score"])):
                    ex = val_set.examples[out["prompt_index"][i]]
                    f.write(json.dumps({"prompt": ex.messages[-1][1], "response": out["text"][i],
                                        "ground_truth": ex.ground_truth,
                                        "score": float(out["score"][i]),
                                        "acc": bool(out["acc"][i])}) + "\n")
        return {"eval/all/avg_score": float(out["score"].mean()),
                "eval/all/reward_failures": stats["reward/timeouts"] + stats["reward/errors"],
                "eval/all/accuracy": float(out["acc"].mean()),
                f"eval/all/pass_at_{k}": pass_at(out["acc"], k)}

    if start_step == 0 and t.eval_before_train:
        log.log(0, {**evaluate(0), **data_metrics}, echo=tqdm.write)

    n = g.n_samples_per_prompt
    ds_kind = alg.dynamic_sampling.type or None
    metrics: dict[str, float] = {}
    bar = tqdm(total=max_steps, initial=start_step, desc="steps", disable=not primary)
    try:
        for step in range(start_step + 1, max_steps + 1):
            step_start = time.perf_counter()
            timings: dict[str, float] = {}
            state = DynamicSamplingState()
            drawn: list[Any] = []  # every generation batch and its reward stats, for metrics
            batches = tqdm(desc="generation batches", leave=False, disable=not primary)
            while True:  # dynamic sampling: draw until train_batch_size groups are kept
                sp = dataclasses.replace(train_sampling, seed=t.seed * 100_003 + step * 1009 +
                                         state.batches_drawn)
                gen, stats = rollout(engine, train_set, sampler.next_batch(t.train_batch_size),
                                     sp, n, tokenizer, rewards, version, timings)
                drawn.append((gen, stats))
                # The filter looks at correctness: raw scores, before overlong punishment.
                state, batch = accumulate(
                    state, gen, gen["score"], kind=ds_kind, group_size=n,
                    train_batch_size=t.train_batch_size,
                    max_sample_batches=alg.dynamic_sampling.max_sample_batches,
                    min_replace_ratio=alg.dynamic_sampling.min_replace_ratio,
                    rng=np.random.default_rng([t.seed, step]))
                batches.update(1)
                if batch is not None:
                    break
            batches.close()
            params, opt_state, metrics = train_step(
                batch, params=params, opt_state=opt_state, ref_params=ref_params, fns=fns,
                cfg=cfg, P=P, R=R, pad_id=pad_id, sizes=sizes, timings=timings)
            version += 1
            start = time.perf_counter()
            engine.sync(model, params, step, version)
            timings["sync"] = time.perf_counter() - start
            metrics.update(state.metrics())
            metrics.update(reward_metrics(drawn, n))
            metrics.update({f"timing/{k}": v for k, v in timings.items()})
            if t.ckpt_interval > 0 and (step % t.ckpt_interval == 0 or step == max_steps):
                ckpt.save(step, params, opt_state, {
                    "step": step, "weight_version": version,
                    "sampler": dataclasses.asdict(sampler.state),
                    # Saved between steps, so it holds only the finished step's counters.
                    "dynamic_sampling": state.to_dict()})
            if t.eval_interval > 0 and (step % t.eval_interval == 0 or step == max_steps):
                metrics.update(evaluate(step))
            metrics["timing/step"] = time.perf_counter() - step_start
            metrics["throughput/tokens_per_s"] = (metrics["generate/avg_response_length"] *
                                                  len(batch["score"]) / metrics["timing/step"])
            log.log(step, metrics, echo=tqdm.write)
            bar.update(1)
    finally:
        bar.close()
        log.close()
        rewards.close()
        ckpt.close()
    return metrics


def train_step(batch: dict[str, np.ndarray], *, params: Any, opt_state: Any, ref_params: Any,
               fns: Any, cfg: ConfigDict, P: int, R: int, pad_id: int, sizes: dict[str, int],
               timings: dict[str, float]) -> tuple[Any, Any, dict[str, float]]:
    """Shaping, advantages, old log-probs and the mini-batch updates of one step; returns
    the new parameters, optimiser state and the step's metrics."""
    t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
    n = g.n_samples_per_prompt
    lengths = np.array([len(r) for r in batch["response_ids"]])
    rewards = batch["score"].astype(np.float32)
    if alg.overlong_buffer.len > 0:
        rewards = rewards + np.asarray(soft_overlong_penalty(
            lengths, R, alg.overlong_buffer.len, alg.overlong_buffer.penalty_factor))
    group_ids = np.repeat(np.arange(len(rewards) // n), n)
    if alg.advantage_estimator == "grpo":
        adv = adv_lib.grpo_advantages(rewards, group_ids, norm_by_std=alg.grpo_norm_by_std)
    else:
        adv = adv_lib.rloo_advantages(rewards, group_ids)
    tensors = pack_sequences(list(batch["prompt_ids"]), list(batch["response_ids"]), P, R,
                             pad_id)
    response_mask = tensors["loss_mask"]
    if g.apply_overlong_filtering:
        tensors["loss_mask"] = np.asarray(overlong_filter(response_mask, batch["truncated"]))
    tensors["advantages"] = np.asarray(adv_lib.token_advantages(adv, tensors["loss_mask"]))
    tensors["rollout_logprobs"] = place_response_values(batch["rollout_logprobs"], P, R)

    start = time.perf_counter()
    old, _ = fns.logprobs(params, tensors["input_ids"], tensors["attention_mask"])
    tensors["old_logprobs"] = np.asarray(old)
    if ref_params is not None:
        ref, _ = fns.logprobs(ref_params, tensors["input_ids"], tensors["attention_mask"])
        tensors["ref_logprobs"] = np.asarray(ref)
    timings["logprobs"] = time.perf_counter() - start
    mismatch = np.abs(tensors["rollout_logprobs"] - tensors["old_logprobs"])[response_mask > 0]
    if not alg.use_kl_loss:
        tensors.pop("ref_logprobs", None)
    if not alg.use_tis:
        tensors.pop("rollout_logprobs")

    start = time.perf_counter()
    step_metrics: list[dict[str, float]] = []
    for mb in mini_batches(tensors, sizes["mini_rows"], epochs=t.update_epochs_per_batch):
        params, opt_state, m = fns.update(params, opt_state, mb)
        step_metrics.append({k: float(v) for k, v in m.items()})
    timings["update"] = time.perf_counter() - start
    for k, v in step_metrics[-1].items():
        if not np.isfinite(v):
            raise FloatingPointError(f"update produced non-finite {k}={v}; stopping before "
                                     "anything is written")
    mean = lambda k: float(np.mean([m[k] for m in step_metrics]))
    out: dict[str, float] = {
        "reward/kept_accuracy": float(batch["acc"].mean()),
        "reward/avg_shaped_reward": float(rewards.mean()),
        "generate/avg_response_length": float(lengths.mean()),
        "generate/max_response_length": float(lengths.max()),
        "generate/truncated_frac": float(batch["truncated"].mean()),
        "rollout/logprob_abs_diff": float(mismatch.mean()) if mismatch.size else 0.0,
        "policy/pg_loss": mean("pg_loss"),
        "policy/loss": mean("loss"),
        "policy/grad_norm": mean("grad_norm"),
        "policy/lr": step_metrics[-1]["lr"],
        "policy/entropy": mean("entropy"),
        "policy/approx_kl": mean("approx_kl"),
        "policy/clip_frac_high": mean("clip_frac_high"),
        "policy/clip_frac_low": mean("clip_frac_low"),
        "policy/dual_clip_frac": mean("dual_clip_frac"),
        "policy/ratio": mean("ratio"),
    }
    if "kl_loss" in step_metrics[-1]:
        out["policy/kl_loss"] = mean("kl_loss")
    if "tis_weight" in step_metrics[-1]:
        out["policy/tis_weight"] = mean("tis_weight")
    return params, opt_state, out
