"""The GPU path measured on one accelerator, in one call (under 8 minutes on an H200): each
part in its own process under its own timeout, its JSON written the moment it ends.

    python bench/gpu.py [--out DIR] [--parts attention,update,arith,decode,step,launch]
        [--smoke] [--peak-tflops F] [--hbm-gbps G]
    python bench/gpu.py --part update --attention auto --rows 2 --seq-len 4096   # one part

Parts (in this order: the kernel's numbers first, the long runs last):
- attention: log-probs and their gradients on packed grouped-query rows (2 x 4,096 tokens
  in segments of 64-1,500; a Qwen3-1.7B-wide model of 4 layers, float32 masters, bf16
  compute) with the fused kernel `auto` picks and with XLA attention, both against XLA
  attention in float32 at the highest matmul precision: max |log-prob error|, median and
  max relative gradient error over the parameters, and the kernel in the compiled program.
- update: the Qwen3-1.7B DAPO update (float32 masters and AdamW, bf16 compute, remat full
  or each policy of `--update-remat`) at 2 x 4,096 and 1 x 10,240 tokens, with XLA
  attention and with `auto`:
  tokens/s, MFU (`dapo_jax.experiments.timing.train_flops_per_token`: the causal mask not
  credited, remat's recompute not counted) of the device's peak bf16 FLOP/s, the device's
  peak memory against the compiled program's own memory analysis. One process each.
- arith: `python -m dapo_jax.train --config configs/arith_tiny.py` for 10 steps with
  `auto` in bf16 (the kernel in the update, the log-prob pass and the engine's prefill):
  held-out accuracy before and after, step times, peak memory.
- decode: the JAX engine's generated tokens/s at batch 64 and 256 (prompt 512, 512 new
  tokens, no early stop, bf16) against the bandwidth bound batch x bandwidth / (weight
  bytes + mean KV bytes a step needs).
- step: one DAPO step at the Qwen3-1.7B shape through `python -m dapo_jax.train` (random
  weights, 16 prompts x 8 samples x up to 1,024 tokens, the in-process engine, `auto`
  attention): the second step's timing/* (the first compiles).
- launch: `python -m dapo_jax.launch` with a JAX sidecar colocated on the one GPU (arith_tiny,
  3 steps): the memory split the launcher sets (trainer 0.97 - 0.45, sidecar 0.45 of the GPU),
  read back from the trainer's `memory/limit_gib` and from nvidia-smi per process.

`--smoke` runs every part at toy sizes on whatever JAX has (CPU here: tokamax's XLA op
stands in for the kernel), to check the script before a GPU is lent. Peak FLOP/s and HBM
bandwidth default from the device kind (H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s; H200:
989, 4.8); pass them for anything else. DIR/summary.md gets the tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # bf16 dense FLOP/s, bytes/s
PARTS = ("attention", "update", "arith", "decode", "step", "launch")
TIMEOUTS = {"attention": 120, "update": 75, "arith": 150, "decode": 150, "step": 240,
            "launch": 180}  # seconds, per process
UPDATE_SHAPES = ((2, 4096), (1, 10240))
GIB = 2**30


def device_peaks(kind: str) -> tuple[float | None, float | None]:
    for name, peaks in PEAKS.items():
        if name in kind:
            return peaks
    return None, None


def peak_memory() -> dict[str, float]:
    import jax

    from dapo_jax.train.metrics_log import device_memory

    return device_memory(jax.local_devices()[:1])


def kernel_in(compiled: Any) -> str:
    from dapo_jax.experiments.hlo import kernel_calls

    return ",".join(sorted({c for c, _ in kernel_calls(compiled.as_text())})) or "xla"


# --------------------------------------------------------------------------- parts
def part_attention(a: argparse.Namespace) -> dict[str, Any]:
    """Kernel and bf16 XLA attention against float32 XLA attention on packed GQA rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dapo_jax.models import Precision, init_model, preset, token_logprobs

    rows, T = (2, 320) if a.smoke else (2, 4096)
    base = "qwen3-tiny" if a.smoke else "qwen3-1.7b"
    cfg = preset(base, num_layers=2 if a.smoke else 4, max_position_embeddings=T)
    rng = np.random.default_rng(0)
    seg = np.zeros((rows, T), np.int32)
    pos = np.zeros((rows, T), np.int32)
    for r in range(rows):
        start, k = 0, 1
        while start < T - 16:  # the row's tail stays padding (segment 0)
            n = min(int(rng.integers(64 if not a.smoke else 20, 1500 if not a.smoke else 90)),
                    T - 16 - start)
            seg[r, start:start + n], pos[r, start:start + n] = k, np.arange(n)
            start, k = start + n, k + 1
    ids = rng.integers(0, cfg.vocab_size, (rows, T)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    real = (seg > 0) & (np.roll(seg, -1, axis=1) == seg)  # the next token is in the segment
    kernel = "tokamax_xla" if a.smoke else "auto"

    def run(impl: str, dtype: str, precision: str) -> tuple[np.ndarray, list[np.ndarray], str]:
        model = init_model(cfg, seed=0, precision=Precision("float32", dtype),
                           attention_impl=impl)
        graphdef, params = nnx.split(model)

        def mean_logprob(p):
            m = nnx.merge(graphdef, p)
            lp, _ = token_logprobs(m.hidden_states(ids, seg, pos), m.lm_head_weight(),
                                   targets)
            return jnp.sum(jnp.where(real, lp, 0.0)) / real.sum(), lp

        fn = jax.jit(jax.value_and_grad(mean_logprob, has_aux=True))
        with jax.default_matmul_precision(precision):
            compiled = fn.lower(params).compile()
            (_, lp), grads = compiled(params)
        return (np.asarray(lp), [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)],
                kernel_in(compiled))

    ref_lp, ref_g, _ = run("xla", "float32", "highest")
    out: dict[str, Any] = {"shape": f"{rows} x {T}", "model": f"{base} x {cfg.num_layers} layers",
                           "heads": f"{cfg.num_heads} q / {cfg.num_kv_heads} kv x "
                                    f"{cfg.head_dim}", "segments": int(seg.max())}
    for name, impl in (("xla_bf16", "xla"), ("kernel_bf16", kernel)):
        lp, grads, program = run(impl, "bfloat16", "default")
        rel = [np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
               for g, r in zip(grads, ref_g, strict=True)]
        out[name] = {"attention": program,
                     "logprob_max_abs_err": float(np.abs(lp - ref_lp)[real].max()),
                     "logprob_mean_abs_err": float(np.abs(lp - ref_lp)[real].mean()),
                     "grad_rel_err_median": float(np.median(rel)),
                     "grad_rel_err_max": float(np.max(rel)),
                     "finite": bool(np.isfinite(lp[real]).all())}
    return out


def part_update(a: argparse.Namespace) -> dict[str, Any]:
    """One update configuration (`--attention`, `--rows`, `--seq-len`) in this process."""
    import jax
    from flax import nnx

    from dapo_jax.experiments.timing import (
        BENCH_LOSS,
        BENCH_OPTIMIZER,
        synthetic_batch,
        train_flops_per_token,
    )
    from dapo_jax.models import Precision, init_model, preset
    from dapo_jax.train.update import (
        compiled_peak_bytes,
        init_optimizer,
        make_optimizer,
        make_train_fns,
    )

    cfg = preset(a.preset, max_position_embeddings=a.seq_len)
    graphdef, params = nnx.split(init_model(cfg, seed=0, precision=Precision(
        "float32", "bfloat16"), remat=a.remat, attention_impl=a.attention))
    optimizer = make_optimizer(BENCH_OPTIMIZER)
    opt_state = init_optimizer(optimizer, params)
    fns = make_train_fns(graphdef, params, optimizer, BENCH_LOSS)
    batch = fns.put(synthetic_batch(cfg, a.rows, a.seq_len))
    start = time.perf_counter()
    compiled = fns.lower_update(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
    compiled_peak = compiled_peak_bytes(compiled)
    params, opt_state, m = compiled(params, opt_state, batch)  # the first call warms up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(a.steps):
        params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - start) / a.steps
    tokens_s = a.rows * a.seq_len / step_s
    achieved = tokens_s * train_flops_per_token(cfg, a.seq_len)
    peak_flops = a.peak_tflops * 1e12 if a.peak_tflops else \
        device_peaks(jax.devices()[0].device_kind)[0]
    memory = peak_memory()
    return {"preset": a.preset, "remat": a.remat, "attention_impl": a.attention,
            "attention": kernel_in(compiled),
            "rows": a.rows, "seq_len": a.seq_len, "step_s": step_s, "tokens_s": tokens_s,
            "model_tflops": achieved / 1e12,
            "mfu": achieved / peak_flops if peak_flops else None, "compile_s": compile_s,
            "compiled_peak_gib": compiled_peak / GIB,
            "device_peak_gib": memory.get("memory/peak_gib"),
            "finite_loss": bool(jax.numpy.isfinite(m["loss"]))}


def part_decode(a: argparse.Namespace) -> dict[str, Any]:
    """The JAX engine at each decode batch, against the bandwidth bound."""
    import jax
    import numpy as np
    from flax import nnx

    from dapo_jax.models import Precision, init_model, preset
    from rollout.generation import Generator, SamplingParams

    prompt, new = (16, 16) if a.smoke else (512, 512)
    cfg = preset(a.preset, max_position_embeddings=prompt + new)
    graphdef, params = nnx.split(init_model(cfg, seed=0, precision=Precision("bfloat16",
                                                                             "bfloat16")))
    bandwidth = a.hbm_gbps * 1e9 if a.hbm_gbps else \
        device_peaks(jax.devices()[0].device_kind)[1]
    out: dict[str, Any] = {"preset": a.preset, "prompt": prompt, "new_tokens": new, "runs": []}
    for batch in ((4, 8) if a.smoke else (64, 256)):
        gen = Generator(graphdef, params, stop_token_ids=[cfg.vocab_size - 1],
                        max_model_len=prompt + new, max_num_seqs=batch)
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size - 1,
                                                    (batch, prompt)).tolist()
        sampling = SamplingParams(temperature=1.0, max_tokens=new, seed=0)
        start = time.perf_counter()
        gen.generate(prompts, sampling)  # compiles
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        samples = gen.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(len(s.token_ids) for group in samples for s in group)
        weight_bytes = cfg.num_params * 2
        # Each step reads every weight and each row's KV up to its current length.
        kv_bytes = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * \
            (prompt + new / 2) * 2
        bound = batch * bandwidth / (weight_bytes + kv_bytes) if bandwidth else None
        out["runs"].append({"batch": batch, "tokens": tokens, "seconds": seconds,
                            "first_call_s": first_s, "tokens_s": tokens / seconds,
                            "bound_tokens_s": bound,
                            "of_bound": tokens / seconds / bound if bound else None})
    return out


def tiny_overrides(run_dir: Path) -> dict[str, Any]:
    return {"trainer.run_dir": str(run_dir), "trainer.resume_mode": "none",
            "trainer.ckpt_interval": 0, "trainer.compilation_cache_dir": ""}


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the rest kept: the device
    machine's carried wheels are there)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def train(config: str, overrides: dict[str, Any], timeout: float, launch: bool = False
          ) -> tuple[list[dict[str, Any]], str]:
    """`python -m dapo_jax.train` (or `.launch`) with overrides; its metrics and stderr."""
    module = "dapo_jax.launch" if launch else "dapo_jax.train"
    cmd = [sys.executable, "-m", module, "--config", config,
           *[f"--config.{k}={v}" for k, v in overrides.items()]]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    metrics_file = Path(overrides["trainer.run_dir"]) / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()] if \
        metrics_file.exists() else []
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited with {proc.returncode}: {proc.stderr[-3000:]}")
    return rows, proc.stderr


def part_arith(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        over = {**tiny_overrides(Path(tmp) / "run"), "trainer.max_steps": 3 if a.smoke else 10,
                "trainer.eval_interval": 3 if a.smoke else 10,
                "model.compute_dtype": "bfloat16",
                "model.attention_impl": "tokamax_xla" if a.smoke else "auto"}
        if a.smoke:
            over.update({"data.builtin_val_size": 32, "trainer.train_batch_size": 8,
                         "trainer.policy_mini_batch_size": 8})
        rows, stderr = train("configs/arith_tiny.py", over, TIMEOUTS["arith"] - 10)
    steps = [r for r in rows if r["step"] >= 1]
    evals = [(r["step"], r["eval/all/accuracy"]) for r in rows if "eval/all/accuracy" in r]
    return {"steps": len(steps), "eval_accuracy": evals,
            "first_step_s": steps[0]["timing/step"] if steps else None,
            "median_step_s": sorted(r["timing/step"] for r in steps[1:])[len(steps[1:]) // 2]
            if len(steps) > 1 else None,
            "memory": {k: v for k, v in steps[-1].items() if k.startswith("memory/")}
            if steps else {},
            "warnings": [ln for ln in stderr.splitlines() if "attention" in ln.lower()][:5]}


def random_model(preset_name: str, path: Path) -> Path:
    """A random model of `preset_name` saved as an HF directory (bf16), with the embedded
    tiny model's tokenizer: ids it does not know decode to nothing (rewards stay 0)."""
    from dapo_jax.models import Precision, init_model, preset, save_pretrained

    cfg = preset(preset_name, max_position_embeddings=4096)
    save_pretrained(init_model(cfg, seed=0, precision=Precision("bfloat16", "bfloat16")), path)
    asset = ROOT / "dapo_jax" / "assets" / "arith_base"
    for f in asset.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(f, path / f.name)
    return path


def part_step(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = random_model("qwen3-tiny" if a.smoke else "qwen3-1.7b", Path(tmp) / "model")
        write_s = time.perf_counter() - start
        over = {**tiny_overrides(Path(tmp) / "run"), "model.path": str(model),
                "data.train_data": "builtin:arithmetic", "data.val_data": "",
                "reward.fn": "arithmetic", "generator.backend": "jax",
                "mesh.shape": "(1,-1,1)", "trainer.placement.policy_num_gpus_per_node": 1,
                "trainer.xla_memory_fraction": 0.0, "trainer.max_steps": 2,
                "trainer.eval_before_train": False, "trainer.eval_interval": 0,
                "trainer.max_prompt_length": 64,
                "generator.sampling_params.max_generate_length": 64 if a.smoke else 1024,
                "generator.eval_sampling_params.max_generate_length": 64 if a.smoke else 1024,
                "trainer.algorithm.overlong_buffer.len": 16 if a.smoke else 256,
                "trainer.train_batch_size": 4 if a.smoke else 16,
                "trainer.policy_mini_batch_size": 4 if a.smoke else 16,
                "generator.n_samples_per_prompt": 8,
                "trainer.micro_train_batch_size_per_gpu": 8,
                "trainer.micro_forward_batch_size_per_gpu": 16,
                "trainer.algorithm.dynamic_sampling.type": "",  # random weights: rewards 0
                "model.attention_impl": "tokamax_xla" if a.smoke else "auto"}
        rows, _ = train("configs/dapo_qwen3_1p7b.py", over, TIMEOUTS["step"] - 10 - write_s)
    first, second = rows[0], rows[-1]
    return {"write_model_s": write_s, "first_step_s": first["timing/step"],
            "step": {k: v for k, v in second.items() if k.startswith(("timing/", "memory/"))},
            "avg_response_length": second["generate/avg_response_length"]}


def gpu_processes() -> list[dict[str, Any]]:
    """nvidia-smi's compute processes (pid, MiB used); [] where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return [{"pid": int(p), "used_mib": float(m)} for p, m in
            (line.split(",") for line in out.stdout.strip().splitlines() if "," in line)]


def gpu_total_mib() -> float | None:
    """The GPU's memory from nvidia-smi (this process must not start a JAX GPU client: it
    would take 75% of the GPU from the processes it measures)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True)
    return float(out.stdout.split()[0]) if out.stdout.strip() else None


def part_launch(a: argparse.Namespace) -> dict[str, Any]:
    from dapo_jax.train.config import apply_overrides, load_config_file, trainer_memory_fraction

    with tempfile.TemporaryDirectory() as tmp:
        over = {**tiny_overrides(Path(tmp) / "run"), "trainer.max_steps": 3,
                "trainer.eval_before_train": False, "trainer.eval_interval": 0,
                "generator.backend": "sidecar", "generator.sidecar_engine": "jax",
                "generator.num_inference_engines": 1,
                "trainer.placement.policy_num_gpus_per_node": 1, "mesh.shape": "(1,-1,1)",
                "generator.sidecar_startup_timeout_s": 120}
        cfg = apply_overrides(load_config_file(str(ROOT / "configs/arith_tiny.py")), {
            k: v for k, v in over.items() if k != "mesh.shape"})
        seen: list[list[dict[str, Any]]] = []
        proc = subprocess.Popen(
            [sys.executable, "-m", "dapo_jax.launch", "--config", "configs/arith_tiny.py",
             *[f"--config.{k}={v}" for k, v in over.items()]], cwd=ROOT,
            env=child_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUTS["launch"] - 20
        while proc.poll() is None and time.monotonic() < deadline:
            if len(seen) < 20:
                seen.append(gpu_processes())
            time.sleep(3)
        if proc.poll() is None:
            proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        metrics_file = Path(tmp) / "run" / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics_file.read_text().splitlines()] if \
            metrics_file.exists() else []
        if proc.returncode != 0:
            raise RuntimeError(f"launch exited with {proc.returncode}: {stderr[-3000:]}")
    total = gpu_total_mib()
    most = max(seen, key=len) if seen else []
    return {"trainer_fraction": trainer_memory_fraction(cfg),
            "sidecar_fraction": cfg.generator.gpu_memory_utilization,
            "gpu_gib": total / 1024 if total else None,
            "trainer_limit_gib": rows[-1].get("memory/limit_gib") if rows else None,
            "trainer_peak_gib": rows[-1].get("memory/peak_gib") if rows else None,
            "nvidia_smi_processes_mib": most, "steps": len([r for r in rows if r["step"] >= 1])}


RUN = {"attention": part_attention, "update": part_update, "arith": part_arith,
       "decode": part_decode, "step": part_step, "launch": part_launch}


# --------------------------------------------------------------------------- driver
def jobs(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(json name, arguments of one part's process)."""
    common = ["--preset", a.preset] + (["--smoke"] if a.smoke else []) + \
        (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []) + \
        (["--hbm-gbps", str(a.hbm_gbps)] if a.hbm_gbps else [])
    out = []
    for part in a.parts.split(","):
        if part not in PARTS:
            sys.exit(f"error: unknown part {part!r}: one of {', '.join(PARTS)}")
        if part == "update":
            shapes = ((2, 128), (1, 256)) if a.smoke else UPDATE_SHAPES
            kernel = "tokamax_xla" if a.smoke else "auto"
            for remat in a.update_remat.split(","):
                for impl in ("xla", kernel):
                    for rows, seq in shapes:
                        suffix = "" if remat == "full" else f"_{remat}"
                        out.append((f"update_{impl}_{rows}x{seq}{suffix}", [
                            "--part", "update", "--attention", impl, "--rows", str(rows),
                            "--seq-len", str(seq), "--remat", remat,
                            "--steps", "1" if a.smoke else "3", *common]))
        else:
            out.append((part, ["--part", part, *common]))
    return out


def summary(results: dict[str, Any]) -> str:
    lines = ["| part | result |", "|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | **failed**: {r['error'][:300]} |")
        elif name.startswith("update"):
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
            lines.append(f"| {name} | {r['attention']}, remat {r['remat']}: "
                         f"{r['step_s'] * 1e3:.0f} ms/step, "
                         f"{r['tokens_s']:.0f} tok/s, MFU {mfu}; peak {r['device_peak_gib']} "
                         f"GiB vs compiled {r['compiled_peak_gib']:.2f} GiB |")
        else:
            lines.append(f"| {name} | {json.dumps(r)[:600]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--part", choices=PARTS, help="run one part in this process")
    p.add_argument("--out", default="bench/gpu_out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default="")
    p.add_argument("--attention", default="auto")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="full", help="the update part's recompute policy")
    p.add_argument("--update-remat", default="full",
                   help="policies the driver times the update with (none, dots_saveable, "
                   "minimal, full; comma-separated: each policy x attention x shape)")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--hbm-gbps", type=float)
    a = p.parse_args()
    a.preset = a.preset or ("qwen3-tiny" if a.smoke else "qwen3-1.7b")
    if a.part:
        print(json.dumps(RUN[a.part](a)))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # In a process of its own: a JAX GPU client here would hold 75% of the GPU throughout.
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__, "
                            "jax.devices()[0].device_kind)"], capture_output=True, text=True)
    device = probe.stdout.strip() or probe.stderr.strip()[-300:]
    print(f"jax, device: {device}; parts to {out}", flush=True)
    results: dict[str, Any] = {}
    for name, args in jobs(a):
        part = args[args.index("--part") + 1]
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT,
                                  capture_output=True, text=True, timeout=TIMEOUTS[part])
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-2000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception as e:  # the part failed or ran out of time: say so, go on
            result = {"error": f"{type(e).__name__}: {e}"}
        result["wall_s"] = time.perf_counter() - start
        results[name] = result
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {json.dumps(result)[:800]}", flush=True)
    text = f"jax, device: {device}\n\n{summary(results)}\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
