"""Memory plan of a run on 8 x H100 80 GB: the trainer's shards and peaks and the vLLM
sidecar's share of each GPU, and whether the configured split fits.

    python -m dapo_jax.experiments.memory --config configs/dapo_qwen3_4b.py \\
        [--preset qwen3-4b] [--target h100x8] [--out bench/memory] [--config.a.b=value ...]

Trainer, per device, from the H100 compiler's own memory analysis of the run's jitted
functions (`dapo_jax.experiments.targets`: the CUDA plugin with the shipped H100 target
description, abstract weights, nothing allocated): the update of one mini-batch in the
config's micro-batches (its arguments hold the float32 masters and AdamW moments) and the
old-log-prob pass over the rollout batch in forward micro-batches, with the AdamW moments
resident beside it. The trainer's peak is the larger of the two; it must fit in
`trainer.xla_memory_fraction` of the GPU (JAX preallocates exactly that pool), and the
suggested fraction is the smallest multiple of 0.05 that holds the peak with
`MEMORY_HEADROOM` to spare. Without the aot extra the compile falls back to simulated CPU devices
and says so (XLA:CPU's figures were 6-10 GiB per GPU above the H100 compiler's).

The sidecar, per GPU, with vLLM's own accounting (vllm/v1/worker/gpu_worker.py): it asks
for `gpu_memory_utilization` x total; the KV cache gets what is left after the bf16
weights (/ tensor parallel), the profiled activation peak (estimated here for vLLM's
defaults on an H100: 16,384 batched tokens, 1,024 sequences) and non-torch memory. CUDA
graphs and each process's CUDA context come on top of both budgets.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dapo_jax.experiments import targets  # noqa: E402
from dapo_jax.experiments.lengths import row_efficiency  # noqa: E402
from dapo_jax.models.config import QwenConfig  # noqa: E402
from dapo_jax.train import config as config_lib  # noqa: E402
from dapo_jax.train.settings import Settings  # noqa: E402
from dapo_jax.train.update import MEMORY_HEADROOM  # noqa: E402

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # per process, outside both budgets
CUDA_GRAPHS_GIB = 1.0  # vLLM's captured graphs: not counted in its utilisation by default
VLLM_BATCHED_TOKENS = 16384  # vLLM's LLM-class defaults on a >= 70 GB GPU (not A100)
VLLM_MAX_SEQS = 1024
VLLM_NON_TORCH_GIB = 0.5  # NCCL buffers and allocator slack, measured by vLLM at start


def kv_bytes_per_token(cfg: QwenConfig, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def vllm_activation_peak(cfg: QwenConfig, tp: int) -> float:
    """vLLM's profile run: one forward of `VLLM_BATCHED_TOKENS` tokens (bf16 activations of
    the widest layer: MLP gate/up/act, q/k/v and attention output; a few live at once) plus
    the sampler's float32 logits and their softmax for `VLLM_MAX_SEQS` sequences."""
    t = VLLM_BATCHED_TOKENS
    per_token = (3 * cfg.intermediate_size + (cfg.num_heads + 2 * cfg.num_kv_heads) *
                 cfg.head_dim + 4 * cfg.hidden_size) * 2 / tp
    logits = 2 * VLLM_MAX_SEQS * cfg.vocab_size * 4
    return t * per_token + logits


def trainer_plan(s: Settings, model: QwenConfig, target: targets.Target) -> dict[str, float]:
    """Per-device bytes of the trainer (see the module docstring)."""
    t = s.schedule
    reports = targets.compile_config(s, model, target, functions=("update", "logprobs"))
    update, forward = reports["update"], reports["logprobs"]
    seq = s.rollout.max_prompt_length + s.rollout.max_generate_length
    sizes = dict(mini_rows=t.policy_mini_batch_size * s.rollout.n_samples_per_prompt,
                 micro_rows=t.micro_train_batch_size_per_gpu * len(target.devices))
    padded, packed = row_efficiency(sizes["mini_rows"], sizes["micro_rows"],
                                    scale=max(seq // 1280, 1))
    return {
        "useful_padded": padded, "useful_packed": packed,
        "rows_per_device_update": t.micro_train_batch_size_per_gpu,
        "rows_per_device_forward": t.micro_forward_batch_size_per_gpu,
        "seq_len": seq, "remat": update.remat, "update_arguments": update.argument_bytes,
        "update_peak": update.peak_bytes, "update_temp": update.temp_bytes,
        "forward_peak": forward.peak_bytes + forward.resident_bytes,
        "peak": max(update.peak_bytes + update.resident_bytes,
                    forward.peak_bytes + forward.resident_bytes),
    }


def suggested_fraction(peak: float, gpu: float) -> float:
    """The smallest multiple of 0.05 of the GPU that holds `peak` x (1 + MEMORY_HEADROOM)."""
    return math.ceil(peak * (1 + MEMORY_HEADROOM) / gpu / 0.05 - 1e-9) * 0.05


def sidecar_plan(s: Settings, model: QwenConfig, gpu_bytes: float) -> dict[str, float]:
    """Per-GPU bytes of one vLLM engine (see the module docstring)."""
    g, t = s.rollout, s.schedule
    tp = g.inference_engine_tensor_parallel_size
    weights = model.num_params * 2 / tp
    activation = vllm_activation_peak(model, tp)
    requested = g.gpu_memory_utilization * gpu_bytes
    kv = requested - weights - activation - VLLM_NON_TORCH_GIB * GIB
    per_token = kv_bytes_per_token(model) / tp
    max_len = g.max_prompt_length + g.max_generate_length
    share = t.train_batch_size * g.n_samples_per_prompt / g.num_inference_engines
    return {"requested": requested, "weights": weights, "activation": activation,
            "kv": kv, "kv_tokens": kv / per_token, "concurrency": kv / per_token / max_len,
            "share": share, "kv_all_at_once": share * max_len * per_token,
            "waves": math.ceil(share / max(kv / per_token / max_len, 1e-9))}


def plan(s: Settings, model: QwenConfig, target: targets.Target) -> dict[str, object]:
    gpu = target.memory_bytes
    trainer = trainer_plan(s, model, target)
    sidecar = sidecar_plan(s, model, gpu)
    fraction = s.trainer_memory_fraction()
    budget = fraction * gpu
    colocated = s.placement.colocate_all
    outside = 2 * CUDA_CONTEXT_GIB * GIB + CUDA_GRAPHS_GIB * GIB
    used = budget + sidecar["requested"] + outside if colocated else max(
        budget + CUDA_CONTEXT_GIB * GIB, sidecar["requested"] + outside - CUDA_CONTEXT_GIB * GIB)
    return {"trainer": trainer, "sidecar": sidecar, "trainer_budget": budget, "gpu": gpu,
            "gpu_used": used, "trainer_fits": trainer["peak"] <= budget,
            "suggested_fraction": suggested_fraction(trainer["peak"], gpu),
            "trainer_fraction": fraction,
            "kv_fits": sidecar["concurrency"] >= 1, "gpu_fits": used <= gpu,
            "target": target.label}


def table(name: str, s: Settings, p: dict) -> str:
    tr, sc = p["trainer"], p["sidecar"]
    g = s.rollout
    gb = lambda b: f"{b / GIB:.1f}"
    ok = lambda b: "yes" if b else "**no**"
    lines = [
        f"### {name}", "",
        f"Compiled for {p['target']}. Mesh {s.mesh.shape}, remat {tr['remat']}"
        f"{' (model.remat=auto)' if s.model.remat == 'auto' else ''}, "
        f"float32 masters + AdamW, {s.model.compute_dtype} compute, rows of {tr['seq_len']} "
        f"tokens (one padded sequence, or several packed); update micro-batch "
        f"{tr['rows_per_device_update']} and forward micro-batch "
        f"{tr['rows_per_device_forward']} rows per device (the shapes, and so the memory, are "
        f"the same packed or padded); vLLM engine "
        f"{g.inference_engine_tensor_parallel_size} GPU(s), {g.model_dtype} weights. GiB per GPU "
        f"of {gb(p['gpu'])}:", "",
        "| part | GiB |", "|---|---|",
        f"| trainer: update arguments (float32 masters, AdamW moments, mini-batch; shards) | "
        f"{gb(tr['update_arguments'])} |",
        f"| trainer: update temporaries (gradients, compute copies, activations) | "
        f"{gb(tr['update_temp'])} |",
        f"| trainer: update peak (arguments + outputs - donated + temporaries) | "
        f"{gb(tr['update_peak'])} |",
        f"| trainer: log-prob pass peak, with the AdamW moments beside it | "
        f"{gb(tr['forward_peak'])} |",
        f"| **trainer peak** | {gb(tr['peak'])} |",
        f"| trainer budget: xla_memory_fraction {p['trainer_fraction']} | "
        f"{gb(p['trainer_budget'])} |",
        f"| vLLM: requested, gpu_memory_utilization {g.gpu_memory_utilization} | "
        f"{gb(sc['requested'])} |",
        f"| vLLM: bf16 weights | {gb(sc['weights'])} |",
        f"| vLLM: profiled activation peak (estimate) + non-torch | "
        f"{gb(sc['activation'] + VLLM_NON_TORCH_GIB * GIB)} |",
        f"| **vLLM: KV cache** | {gb(sc['kv'])} |",
        f"| CUDA contexts (2) and vLLM's CUDA graphs, outside both budgets | "
        f"{2 * CUDA_CONTEXT_GIB + CUDA_GRAPHS_GIB:.1f} |",
        f"| **GPU total** | {gb(p['gpu_used'])} of {gb(p['gpu'])} |", "",
        f"KV cache: {sc['kv_tokens'] / 1e3:.0f}k tokens = {sc['concurrency']:.1f} sequences of "
        f"{tr['seq_len']} tokens at once; this engine's share of a step is {sc['share']:.0f} "
        f"sequences ({gb(sc['kv_all_at_once'])} GiB of KV if all were full length at once), "
        f"so vLLM runs them in waves (at most {sc['waves']} at full length; responses average "
        f"far below the limit).", "",
        f"Tokens per device and update micro-batch: {tr['rows_per_device_update']} x "
        f"{tr['seq_len']} = {tr['rows_per_device_update'] * tr['seq_len']} computed; useful "
        f"(not padding) on a DAPO-shaped length mix (`experiments.lengths`): "
        f"{tr['useful_padded']:.0%} padded, "
        f"{tr['useful_packed']:.0%} packed (trainer.use_sample_packing="
        f"{s.schedule.use_sample_packing}), so a mini-batch needs about "
        f"{tr['useful_padded'] / tr['useful_packed']:.2f}x the padded micro-batches.", "",
        f"Fits: trainer peak within its budget: {ok(p['trainer_fits'])}; at least one "
        f"full-length sequence of KV cache (vLLM's start condition): {ok(p['kv_fits'])}; "
        f"the GPU: {ok(p['gpu_fits'])}. Suggested trainer.xla_memory_fraction (peak + "
        f"{MEMORY_HEADROOM:.0%}): {p['suggested_fraction']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a config file, e.g. configs/dapo_qwen3_4b.py")
    p.add_argument("--preset", default="", help="model shape when model.path is not on this "
                   "machine (qwen2.5-math-7b, qwen3-1.7b, qwen3-4b, ...)")
    p.add_argument("--target", default="h100x8", help="h100x8 or a GPU target description")
    p.add_argument("--out", default="", help="also write <out>/<config name>.md")
    a, rest = p.parse_known_args()
    try:
        s, model = targets.load_run(a.config, targets.parse_overrides(rest), a.preset)
        target = targets.get_target(a.target, cpu_fallback=True,
                                    gpu_flags=s.placement.xla_gpu_flags)
        result = plan(s, model, target)
    except (targets.TargetError, config_lib.ConfigError) as e:
        sys.exit(f"error: {e}")
    text = table(Path(a.config).stem, s, result)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{Path(a.config).stem}.md").write_text(text)


if __name__ == "__main__":
    main()
