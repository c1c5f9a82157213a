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

from dapo_jax.models.checkpoint import save_hf
from dapo_jax.train.checkpointing import checkpoint_model


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
