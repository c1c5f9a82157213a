"""Update-step throughput: the dapo_jax DAPO update vs the equivalent PyTorch step
(`transformers` Qwen3 of the same config, same batch, same dual-clip token-mean loss, AdamW
with global-norm clipping), float32 on CPU, measured side by side in one run.

    python bench/update_step.py [--presets bench-small,bench-medium] [--batch 4]
        [--seq-len 512] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.experiments.timing import synthetic_batch, update_seconds  # noqa: E402
from dapo_jax.models import preset  # noqa: E402


def torch_step_s(cfg, batch, steps: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    hf = cfg.to_hf()
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{
        k: v for k, v in hf.items() if k not in ("architectures", "model_type")})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    ids = t["input_ids"].long()

    def step():
        logits = model(input_ids=ids, attention_mask=t["segment_ids"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        mask, adv, old = t["loss_mask"][:, 1:], t["advantages"][:, 1:], t["old_logprobs"][:, 1:]
        ratio = torch.exp(torch.clamp(logp - old, -20, 20))
        loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * 10.0), loss)
        loss = (loss * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="bench-small,bench-medium")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    rows = []
    for name in a.presets.split(","):
        cfg = preset(name)
        batch = synthetic_batch(cfg, a.batch, a.seq_len)
        tokens = a.batch * a.seq_len
        j = tokens / update_seconds(cfg, batch, a.steps)
        t = tokens / torch_step_s(cfg, batch, a.steps)
        rows.append((name, cfg.num_params / 1e6, j, t))
        print(f"{name}: jax {j:.0f} tok/s, torch {t:.0f} tok/s", flush=True)
    print(f"\nB={a.batch} T={a.seq_len}, float32, CPU, DAPO dual-clip token-mean + AdamW")
    print("| preset | params M | dapo_jax tok/s | PyTorch tok/s | jax / torch |")
    print("|---|---|---|---|---|")
    for name, params, j, t in rows:
        print(f"| {name} | {params:.1f} | {j:.0f} | {t:.0f} | {j / t:.2f}x |")


if __name__ == "__main__":
    main()
