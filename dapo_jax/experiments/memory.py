"""Memory plan of a run on 8 x H100 80 GB: the trainer's shards and peaks and the vLLM
sidecar's share of each GPU, and whether the configured split fits.

    python -m dapo_jax.experiments.memory --config configs/dapo_qwen3_4b.py \\
        [--preset qwen3-4b] [--out bench/memory]

Trainer, per device, from XLA's memory analysis of the run's own jitted functions compiled
on abstract parameters over 8 simulated CPU devices (nothing allocated; XLA:CPU's fusion
and scheduling differ from the GPU's, so these are estimates):
- float32 master weights and AdamW moments (their shards, exact);
- the update of one mini-batch in the config's micro-batches: XLA's temporaries, split
  into float32 gradients (sharded like the masters), the bf16 compute copies (one decoder
  layer gathered at a time, and the embedding table gathered for the lookup) and the rest
  (activations of a training micro-batch, remat recomputation, attention blocks);
- the old/reference log-prob pass over the whole rollout batch in forward micro-batches:
  its temporaries plus its [rows, T] float32 outputs.
The trainer's peak is masters + optimiser + the larger of the two; it must fit in
`trainer.xla_memory_fraction` of the GPU (JAX preallocates exactly that pool).

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
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from ml_collections import ConfigDict  # noqa: E402

from dapo_jax.experiments.lengths import row_efficiency  # noqa: E402
from dapo_jax.experiments.mesh import (  # noqa: E402
    abstract_batch,
    abstract_train_state,
    per_device_bytes,
)
from dapo_jax.models import Precision, preset, read_config  # noqa: E402
from dapo_jax.models.config import QwenConfig  # noqa: E402
from dapo_jax.sharding import make_mesh  # noqa: E402
from dapo_jax.train import config as config_lib  # noqa: E402
from dapo_jax.train.loop import loss_config, optimizer_config  # noqa: E402
from dapo_jax.train.update import make_optimizer, make_train_fns  # noqa: E402

GIB = 2**30
H100_GIB = 79.65  # what the driver reports for an H100 80 GB (81,559 MiB)
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


def trainer_plan(cfg: ConfigDict, model: QwenConfig) -> dict[str, float]:
    """Per-device bytes of the trainer (see the module docstring)."""
    sizes = config_lib.validate(cfg, num_devices=8)
    t, g = cfg.trainer, cfg.generator
    mesh = make_mesh(cfg.mesh.shape)
    precision = Precision(cfg.model.param_dtype, cfg.model.compute_dtype)
    optimizer = make_optimizer(optimizer_config(cfg, max(t.max_steps, 1)))
    graphdef, params, opt_state = abstract_train_state(model, precision, cfg.model.remat,
                                                       optimizer, mesh)
    seq = t.max_prompt_length + g.sampling_params.max_generate_length
    fns = make_train_fns(graphdef, params, optimizer, loss_config(cfg, sizes["max_seq_len"]),
                         micro_batch_rows=sizes["micro_rows"],
                         forward_micro_batch_rows=sizes["forward_micro_rows"], mesh=mesh)
    update = fns.lower_update(params, opt_state, abstract_batch(
        sizes["mini_rows"], seq, mesh)).compile().memory_analysis()
    rollout = abstract_batch(t.train_batch_size * g.n_samples_per_prompt, seq, mesh,
                             keys=("input_ids", "segment_ids", "positions"))
    forward = fns.lower_logprobs(params, rollout["input_ids"], rollout["segment_ids"],
                                 rollout["positions"]).compile().memory_analysis()
    masters, moments = per_device_bytes(params), per_device_bytes(opt_state)
    itemsize = precision.dtype.itemsize
    shard = lambda n: n / (mesh.shape["tensor"])
    layer = model.num_params - model.vocab_size * model.hidden_size * (
        1 if model.tie_word_embeddings else 2) - model.hidden_size
    copies = (shard(layer / model.num_layers) + shard(model.vocab_size * model.hidden_size)) \
        * itemsize
    update_temp = update.temp_size_in_bytes
    forward_peak = forward.temp_size_in_bytes + forward.output_size_in_bytes
    padded, packed = row_efficiency(sizes["mini_rows"], sizes["micro_rows"],
                                    scale=max(seq // 1280, 1))
    return {
        "useful_padded": padded, "useful_packed": packed,
        "rows_per_device_update": t.micro_train_batch_size_per_gpu,
        "rows_per_device_forward": t.micro_forward_batch_size_per_gpu,
        "seq_len": seq,
        "masters": masters, "adamw": moments, "update_temp": update_temp,
        "gradients": masters, "compute_copies": copies,
        "activations": max(update_temp - masters - copies, 0.0),
        "forward_peak": forward_peak,
        "peak": masters + moments + max(update_temp, forward_peak),
    }


def sidecar_plan(cfg: ConfigDict, model: QwenConfig, gpu_bytes: float) -> dict[str, float]:
    """Per-GPU bytes of one vLLM engine (see the module docstring)."""
    g, t = cfg.generator, cfg.trainer
    tp = g.inference_engine_tensor_parallel_size
    weights = model.num_params * 2 / tp
    activation = vllm_activation_peak(model, tp)
    requested = g.gpu_memory_utilization * gpu_bytes
    kv = requested - weights - activation - VLLM_NON_TORCH_GIB * GIB
    per_token = kv_bytes_per_token(model) / tp
    max_len = t.max_prompt_length + g.sampling_params.max_generate_length
    share = t.train_batch_size * g.n_samples_per_prompt / g.num_inference_engines
    return {"requested": requested, "weights": weights, "activation": activation,
            "kv": kv, "kv_tokens": kv / per_token, "concurrency": kv / per_token / max_len,
            "share": share, "kv_all_at_once": share * max_len * per_token,
            "waves": math.ceil(share / max(kv / per_token / max_len, 1e-9))}


def plan(cfg: ConfigDict, model: QwenConfig, gpu_gib: float = H100_GIB) -> dict[str, object]:
    gpu = gpu_gib * GIB
    trainer = trainer_plan(cfg, model)
    sidecar = sidecar_plan(cfg, model, gpu)
    budget = cfg.trainer.xla_memory_fraction * gpu
    colocated = cfg.trainer.placement.colocate_all
    outside = 2 * CUDA_CONTEXT_GIB * GIB + CUDA_GRAPHS_GIB * GIB
    used = budget + sidecar["requested"] + outside if colocated else max(
        budget + CUDA_CONTEXT_GIB * GIB, sidecar["requested"] + outside - CUDA_CONTEXT_GIB * GIB)
    return {"trainer": trainer, "sidecar": sidecar, "trainer_budget": budget, "gpu": gpu,
            "gpu_used": used, "trainer_fits": trainer["peak"] <= budget,
            "kv_fits": sidecar["concurrency"] >= 1, "gpu_fits": used <= gpu}


def table(name: str, cfg: ConfigDict, p: dict) -> str:
    tr, sc = p["trainer"], p["sidecar"]
    g, t = cfg.generator, cfg.trainer
    gb = lambda b: f"{b / GIB:.1f}"
    ok = lambda b: "yes" if b else "**no**"
    lines = [
        f"### {name}", "",
        f"mesh {tuple(cfg.mesh.shape)}, remat {cfg.model.remat}, float32 masters + AdamW, "
        f"{cfg.model.compute_dtype} compute, rows of {tr['seq_len']} tokens (one padded "
        f"sequence, or several packed); update micro-batch {tr['rows_per_device_update']} and "
        f"forward micro-batch {tr['rows_per_device_forward']} rows per device (the shapes, "
        f"and so the memory, are the same packed or padded); vLLM engine "
        f"{g.inference_engine_tensor_parallel_size} GPU(s), {g.model_dtype} weights. GiB per GPU "
        f"of {gb(p['gpu'])}:", "",
        "| part | GiB |", "|---|---|",
        f"| trainer: float32 master weights (shard) | {gb(tr['masters'])} |",
        f"| trainer: AdamW moments (shard) | {gb(tr['adamw'])} |",
        f"| trainer: update temporaries (XLA) | {gb(tr['update_temp'])} |",
        f"| - of which float32 gradients (shard) | {gb(tr['gradients'])} |",
        f"| - of which bf16 compute copies (1 layer + embedding, gathered) | "
        f"{gb(tr['compute_copies'])} |",
        f"| - of which activations of a micro-batch and the rest | {gb(tr['activations'])} |",
        f"| trainer: forward (log-prob) pass peak, temporaries + outputs | "
        f"{gb(tr['forward_peak'])} |",
        f"| **trainer peak** (masters + AdamW + max(update, forward)) | {gb(tr['peak'])} |",
        f"| trainer budget: xla_memory_fraction {t.xla_memory_fraction} | "
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
        f"{cfg.trainer.use_sample_packing}), so a mini-batch needs about "
        f"{tr['useful_padded'] / tr['useful_packed']:.2f}x the padded micro-batches.", "",
        f"Fits: trainer peak within its budget: {ok(p['trainer_fits'])}; at least one "
        f"full-length sequence of KV cache (vLLM's start condition): {ok(p['kv_fits'])}; "
        f"the GPU: {ok(p['gpu_fits'])}.", ""]
    return "\n".join(lines)


def with_model(cfg: ConfigDict, model: QwenConfig, tmp: Path) -> ConfigDict:
    """A copy of `cfg` whose model path holds `model`'s config.json and whose data are the
    built-in task: the plan needs shapes, not weights or data."""
    cfg = copy.deepcopy(cfg)
    (tmp / "config.json").write_text(json.dumps(model.to_hf("bfloat16")))
    cfg.model.path = str(tmp)
    cfg.data.train_data = cfg.data.val_data = "builtin:arithmetic"
    cfg.generator.sidecar_urls = ("http://unused",)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a config file, e.g. configs/dapo_qwen3_4b.py")
    p.add_argument("--preset", default="", help="model shape when model.path is not on this "
                   "machine (qwen2.5-math-7b, qwen3-1.7b, qwen3-4b, ...)")
    p.add_argument("--gpu-gib", type=float, default=H100_GIB)
    p.add_argument("--out", default="", help="also write <out>/<config name>.md")
    a = p.parse_args()
    cfg = config_lib.load_config_file(a.config)
    if Path(cfg.model.path, "config.json").exists():
        model = read_config(cfg.model.path)
    elif a.preset:
        model = preset(a.preset)
    else:
        p.error(f"{cfg.model.path}/config.json does not exist here: pass --preset")
    model = QwenConfig(**{**model.__dict__, "max_position_embeddings": max(
        model.max_position_embeddings, 32768)})
    with tempfile.TemporaryDirectory() as tmp:
        result = plan(with_model(cfg, model, Path(tmp)), model, a.gpu_gib)
    text = table(Path(a.config).stem, cfg, result)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{Path(a.config).stem}.md").write_text(text)


if __name__ == "__main__":
    main()
