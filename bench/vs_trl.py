"""The main job's DAPO step, dapo_jax vs TRL's GRPOTrainer on the same work, side by side.

    python bench/vs_trl.py [--steps 20] [--sides ours,trl] [--out bench/vs_trl]

Both sides train the embedded base model (dapo_jax/assets/arith_base) on the same 32 prompts
per step, in the same order (our sampler's draw), 8 samples each at temperature 1, 64 new
tokens, with the same reward (the arithmetic reward + DAPO's soft overlong punishment,
buffer 12, factor 1), overlong filtering (TRL: mask_truncated_completions), clip-higher
eps 0.2 / 0.28, dual clip c = 10 (TRL: `delta`), no KL (beta 0), token-mean loss over each
mini-batch of 16 prompts x 8 = 128 sequences (TRL: loss_type="bnpo" with
gradient_accumulation_steps=1 on one process is exactly that normaliser; "dapo" divides by
half the whole generation batch's tokens instead), 2 optimiser steps per batch with the old
log-probs recomputed before them (TRL: steps_per_generation=2, num_iterations=1), AdamW lr
1e-4 constant, betas (0.9, 0.999), no weight decay, grad-norm clip 1.0, float32 on CPU, GRPO
advantages normalised by the group's (unbiased) std. Dynamic sampling is off on our side
(TRL has none). Differences left: TRL adds 1e-4 to the std (we 1e-6) and generates with
`transformers`' `generate`; we pack the update's rows.

Each side runs in its own process, one after the other, `--steps` steps: median s/step over
steps 2 .. steps-1 (the first step compiles, the last one saves), start-up (launch to the
first step), the first step, and every phase of our step (timing/* metrics). Each final
policy is scored by the same held-out evaluator (256 held-out problems x 16 samples,
temperature 1; 4 samples move by ~0.05), as is the base model. The CPU time other processes
used during each run is measured from /proc/stat; above 0.2 cores no ratio is reported (TRL's
torch threads spin under contention, and it then looks 2-4x slower than it is).

TRL comes from the `bench` extra (trl==1.16.0): `pip install -e ".[test,bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "arith_tiny.py"
PROMPTS_PER_STEP, SAMPLES, MINI_PROMPTS = 32, 8, 16
MAX_NEW, BUFFER = 64, 12
EVAL_SAMPLES = 16
MAX_OTHER_CORES = 0.2
PHASES = ("generate", "reward", "layout", "transfer", "logprobs", "update", "metrics", "sync")


def main_config(steps: int, run_dir: str):
    """The main job's config, dynamic sampling off, no in-loop eval, HF policy at the end."""
    from dapo_jax.train.config import load_config_file

    cfg = load_config_file(str(CONFIG))
    t = cfg.trainer
    t.run_dir, t.max_steps, t.resume_mode = run_dir, steps, "none"
    t.eval_before_train, t.eval_interval = False, 0
    t.ckpt_interval, t.hf_save_interval = 0, steps
    t.algorithm.dynamic_sampling.type = ""
    t.compilation_cache_dir = str(Path(run_dir) / "jax_cache")  # cold: the first step compiles
    assert (t.train_batch_size, t.policy_mini_batch_size) == (PROMPTS_PER_STEP, MINI_PROMPTS)
    assert cfg.generator.n_samples_per_prompt == SAMPLES
    assert cfg.generator.sampling_params.max_generate_length == MAX_NEW
    assert t.algorithm.overlong_buffer.len == BUFFER
    return cfg


# ----------------------------------------------------------------------------- the work
def write_work(steps: int, path: Path) -> None:
    """The prompts (chat-rendered text and token ids) and answers each step trains on, in
    our sampler's order, for TRL to read."""
    from transformers import AutoTokenizer

    from dapo_jax.prompts import PromptSampler
    from dapo_jax.train.loop import prompt_set
    from dapo_jax.train.settings import Settings

    cfg = main_config(steps, "unused")
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train = prompt_set(Settings.from_config(cfg).data, tok, "train")
    sampler = PromptSampler(len(train.examples), seed=cfg.trainer.seed)
    order = [i for _ in range(steps) for i in sampler.next_batch(PROMPTS_PER_STEP)]
    texts = [tok.apply_chat_template([{"role": r, "content": c} for r, c in
                                      train.examples[i].messages],
                                     add_generation_prompt=True, tokenize=False) for i in order]
    for i, text in zip(order, texts, strict=True):  # TRL tokenizes the text: same ids
        assert tok(text, add_special_tokens=False)["input_ids"] == train.ids[i], text
    path.write_text(json.dumps({"prompts": texts,
                                "answers": [train.examples[i].ground_truth for i in order]}))


# ----------------------------------------------------------------------------- our side
def ours(steps: int, run_dir: str, launched: float) -> dict:
    from dapo_jax.train import loop
    from dapo_jax.train.settings import Settings

    setup, marks = loop.setup, {}

    def timed_setup(cfg):
        r = setup(cfg)
        marks["ready"] = time.time()
        return r

    loop.setup = timed_setup
    loop.run(Settings.from_config(main_config(steps, run_dir)))
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    return {"startup_s": marks["ready"] - launched,
            "step_s": [r["timing/step"] for r in rows],
            "phases": {p: [r.get(f"timing/{p}", 0.0) for r in rows] for p in PHASES},
            "train_accuracy": [r["reward/accuracy"] for r in rows],
            "policy": str(Path(run_dir) / "hf" / f"step_{steps}")}


# ----------------------------------------------------------------------------- TRL's side
def trl(steps: int, run_dir: str, launched: float, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    from dapo_jax.rewards import arithmetic

    data = json.loads(work.read_text())
    cfg = main_config(steps, run_dir)
    t, opt = cfg.trainer, cfg.trainer.policy.optimizer_config

    def correctness(prompts, completions, ground_truth, **_):
        return [arithmetic(c, gt).score for c, gt in zip(completions, ground_truth, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.marks, self.acc = 0.0, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "rewards/correctness/mean" in logs and state.global_step % 2 == 1:
                self.acc.append((logs["rewards/correctness/mean"] + 1) / 2)  # score is +-1

    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    args = GRPOConfig(
        output_dir=run_dir, max_steps=2 * steps, per_device_train_batch_size=MINI_PROMPTS * SAMPLES,
        gradient_accumulation_steps=1, steps_per_generation=PROMPTS_PER_STEP // MINI_PROMPTS,
        num_iterations=1, num_generations=SAMPLES, max_completion_length=MAX_NEW,
        temperature=1.0, top_p=1.0, learning_rate=opt.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm,
        adam_beta1=opt.adam_betas[0], adam_beta2=opt.adam_betas[1],
        epsilon=t.algorithm.eps_clip_low, epsilon_high=t.algorithm.eps_clip_high,
        delta=t.algorithm.clip_ratio_c, beta=0.0, loss_type="bnpo", scale_rewards="group",
        mask_truncated_completions=True, shuffle_dataset=False, seed=t.seed, use_cpu=True,
        bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    clock = Clock()
    trainer = GRPOTrainer(
        model=model, processing_class=tok, args=args,
        reward_funcs=[correctness, get_soft_overlong_punishment(MAX_NEW, BUFFER)],
        train_dataset=Dataset.from_dict({"prompt": data["prompts"],
                                         "ground_truth": data["answers"]}),
        callbacks=[clock])
    trainer.train()
    policy = Path(run_dir) / "final"
    trainer.save_model(str(policy))
    tok.save_pretrained(str(policy))
    ends = [clock.begin] + clock.marks[1::2]  # a DAPO step is two optimiser steps
    return {"startup_s": clock.begin - launched,
            "step_s": [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)],
            "train_accuracy": clock.acc, "policy": str(policy)}


# ----------------------------------------------------------------------------- held-out eval
def held_out(model_dir: str) -> dict:
    """Held-out accuracy of an HF policy: the main job's held-out split and eval sampling
    (temperature 1, seeded), EVAL_SAMPLES samples per prompt, with our evaluator."""

    from flax import nnx
    from transformers import AutoTokenizer

    from dapo_jax.evaluation import evaluate
    from dapo_jax.models import load_pretrained
    from dapo_jax.rewards import RewardPool
    from dapo_jax.train.loop import prompt_set
    from dapo_jax.train.settings import Settings
    from rollout.generation import Generator, stop_token_ids

    cfg = main_config(1, "unused")
    settings = Settings.from_config(cfg)
    base = cfg.model.path
    tok = AutoTokenizer.from_pretrained(base)
    val = prompt_set(settings.data, tok, "eval")
    graphdef, params = nnx.split(load_pretrained(model_dir, dtype="float32"))
    gen = Generator(graphdef, params, stop_token_ids=stop_token_ids(base),
                    max_model_len=cfg.trainer.max_prompt_length + MAX_NEW,
                    pad_token_id=tok.pad_token_id or 0)
    sp = settings.rollout.eval_sampling
    rewards = RewardPool(cfg.reward.fn, workers=cfg.reward.num_workers)
    try:
        result = evaluate(gen.generate, val.ids, val.examples, sp, EVAL_SAMPLES, tok, rewards)
    finally:
        rewards.close()
    return {"accuracy": result.metrics()["eval/all/accuracy"]}


# ----------------------------------------------------------------------------- the driver
def busy_s() -> float:
    """CPU seconds every process on the machine has used (/proc/stat, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_s() -> float:
    self_, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                    resource.RUSAGE_CHILDREN))
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def side(name: str, *extra: str) -> tuple[dict, float]:
    """Runs one side in its own process: (its result, cores other processes used)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        busy0, own0, wall0 = busy_s(), own_s(), time.time()
        proc = subprocess.run([sys.executable, __file__, "--side", name, "--result", str(out),
                               "--launched", repr(wall0), *extra], check=False)
        wall = time.time() - wall0
        other = max(0.0, (busy_s() - busy0) - (own_s() - own0)) / wall
        if proc.returncode:
            sys.exit(f"{name} side failed (exit {proc.returncode})")
        return json.loads(out.read_text()), other


def summary(res: dict) -> dict:
    steps = res["step_s"]
    out = {"median_step_s": statistics.median(steps[1:-1]), "first_step_s": steps[0],
           "startup_s": res["startup_s"]}
    if "phases" in res:
        out["phases"] = {p: statistics.median(v[1:-1]) for p, v in res["phases"].items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sides", default="ours,trl")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 3:
        p.error("--steps must be >= 3 (the first and last steps are not in the median)")
    if a.side:  # a child process
        res = {"ours": lambda: ours(a.steps, a.run_dir, a.launched),
               "trl": lambda: trl(a.steps, a.run_dir, a.launched, Path(a.work)),
               "eval": lambda: held_out(a.model)}[a.side]()
        Path(a.result).write_text(json.dumps(res))
        return

    sides = a.sides.split(",")
    if not set(sides) <= {"ours", "trl"}:
        p.error(f"--sides: ours and/or trl, got {a.sides!r}")
    report: dict = {"steps": a.steps, "sides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work.json"
        write_work(a.steps, work)
        for name in sides:
            run_dir = str(Path(tmp) / name)
            res, other = side(name, "--steps", str(a.steps), "--run-dir", run_dir,
                              "--work", str(work))
            evald, _ = side("eval", "--model", res["policy"])
            report["sides"][name] = {**summary(res), "other_cores": other,
                                     "held_out_after": evald["accuracy"],
                                     "train_accuracy": res["train_accuracy"]}
            print(f"{name}: {json.dumps(report['sides'][name])}", flush=True)
        base, _ = side("eval", "--model", str(main_config(1, "unused").model.path))
        report["held_out_before"] = base["accuracy"]
    s = report["sides"]
    print(f"\nheld-out accuracy before: {report['held_out_before']:.3f} "
          f"({EVAL_SAMPLES} samples x 256 prompts)")
    print(f"{'side':6} {'s/step':>8} {'first':>7} {'start-up':>9} {'held-out':>9} "
          f"{'other cores':>12}")
    for name, r in s.items():
        print(f"{name:6} {r['median_step_s']:8.3f} {r['first_step_s']:7.2f} "
              f"{r['startup_s']:9.1f} {r['held_out_after']:9.3f} {r['other_cores']:12.2f}")
    if "phases" in s.get("ours", {}):
        print("our phases (median s): " + " ".join(
            f"{k}={v:.3f}" for k, v in s["ours"]["phases"].items()))
    if {"ours", "trl"} <= set(s):
        busy = max(s["ours"]["other_cores"], s["trl"]["other_cores"])
        if busy > MAX_OTHER_CORES:
            print(f"no ratio: other processes used {busy:.2f} cores (> {MAX_OTHER_CORES})")
            report["speedup"] = None
        else:
            report["speedup"] = s["trl"]["median_step_s"] / s["ours"]["median_step_s"]
            print(f"speed-up (TRL s/step / ours): {report['speedup']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
