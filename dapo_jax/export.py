"""The trained policy as a Hugging Face model directory:

    python -m dapo_jax.export --checkpoint <run_dir>/checkpoints/<step> --out <dir>
        [--dtype bfloat16|float32] [--base-model DIR]

The directory holds safetensors in `--dtype`, config.json, and the base model's tokenizer
files and generation_config.json (the run's config.json names the base model; pass
`--base-model` for a checkpoint without it), so transformers, vLLM and
`python -m dapo_jax.eval` load it as they load the base model. The trainer writes the same
every `trainer.hf_save_interval` steps and at the end, to <run_dir>/hf/step_<N>.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from dapo_jax.models import Precision, Qwen, read_config, save_pretrained
from dapo_jax.train.checkpointing import Checkpointer

# What a HF directory carries besides weights and config.json (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def save_hf(model: Qwen, out: str | Path, *, base_model: str | Path, dtype: str) -> Path:
    """Writes `model` as a HF directory at `out` (see the module docstring): first under a
    temporary name, renamed when complete, so `out` is never half written. All processes
    call it (each gathers its shards); process 0 writes."""
    out = Path(out)
    tmp = out.with_name(f".tmp_{out.name}")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, dtype=dtype)
    if primary:
        for name in TOKENIZER_FILES:
            if (Path(base_model) / name).exists():
                shutil.copy2(Path(base_model) / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out


def checkpoint_model(checkpoint: str | Path, base_model: str | Path | None = None
                     ) -> tuple[Qwen, Path]:
    """(the policy of a training checkpoint `<run_dir>/checkpoints/<step>`, its base model
    directory), restoring only the parameters (float32 masters), on one device."""
    step_dir = Path(checkpoint).resolve()
    if not step_dir.name.isdigit() or not step_dir.is_dir():
        raise ValueError(f"--checkpoint {checkpoint}: expected a step directory "
                         "<run_dir>/checkpoints/<step>")
    if base_model is None:
        run_config = step_dir.parent.parent / "config.json"
        if not run_config.exists():
            raise ValueError(f"{run_config} does not exist: pass --base-model")
        base_model = json.loads(run_config.read_text())["model"]["path"]
    base_model = Path(base_model)
    cfg = read_config(base_model)
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=Precision("float32", "float32"),
                                           attention_impl="xla", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state)
    ckpt = Checkpointer(step_dir.parent, keep=10**6)
    try:
        params = ckpt.restore_params(int(step_dir.name), target)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), base_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="<run_dir>/checkpoints/<step>")
    p.add_argument("--out", required=True, help="directory to write (replaced if present)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--base-model", default=None,
                   help="base HF directory (default: model.path of the run's config.json)")
    a = p.parse_args(argv)
    try:
        model, base = checkpoint_model(a.checkpoint, a.base_model)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    out = save_hf(model, a.out, base_model=base, dtype=a.dtype)
    print(f"wrote {out} ({a.dtype}) from {a.checkpoint}")


if __name__ == "__main__":
    main()
