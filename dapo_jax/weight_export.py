"""Weight hand-off from the trainer to generation engines: orbax exports under HF names.

`export_weights` writes `<export_dir>/step_<N>`: an orbax PyTree checkpoint of
{hf_tensor_name: array} plus `dapo_export.json` (weight version, step, HF config). It is
written under a temporary name and renamed, so a reader never sees a half-written export;
older exports beyond `keep` are pruned. All processes call it (orbax writes each host's
shards); process 0 renames and prunes.

`ExportIndex` reads an export back tensor by tensor (host numpy arrays, or torch tensors via
`to_torch`), and `load_export` builds a `Qwen` from it.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dapo_jax.models.checkpoint import hf_state_dict, load_from_tensors
from dapo_jax.models.config import QwenConfig
from dapo_jax.models.qwen import Qwen

META_FILE = "dapo_export.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def export_weights(model: Qwen, export_dir: str | Path, *, step: int, version: int,
                   keep: int = 2, dtype: str | None = None) -> Path:
    """Writes the model's weights, cast to `dtype` (the serving dtype; default the parameter
    dtype), to `<export_dir>/step_<step>` and returns that path."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    export_dir = Path(export_dir)
    final = export_dir / f"step_{step}"
    tmp = export_dir / f".tmp_step_{step}"
    primary = jax.process_index() == 0
    if primary:
        export_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed export
    dtype = str(np.dtype(dtype or model.precision.param_dtype))
    tensors = hf_state_dict(model, dtype)
    ocp.PyTreeCheckpointer().save(tmp / "weights", tensors)
    if primary:
        meta = {"version": int(version), "step": int(step), "config": model.config.to_hf(dtype)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(export_dir, keep)
    return final


def _step_dirs(export_dir: Path) -> list[Path]:
    """The `step_<N>` directories, oldest first."""
    found = [(int(m.group(1)), p) for p in export_dir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _prune(export_dir: Path, keep: int) -> None:
    for p in _step_dirs(export_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_export(export_dir: str | Path) -> Path | None:
    complete = [p for p in _step_dirs(Path(export_dir)) if (p / META_FILE).exists()]
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / META_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a complete weight export (no {META_FILE})")
    return json.loads(meta_file.read_text())


class ExportIndex:
    """HF-named tensors of an export, restored as host numpy arrays: one at a time (`get`),
    or streamed in batches of up to `batch_bytes` per orbax restore (`items`; a whole 0.6B
    float32 export restores in 2.1 s in one call, 4.8 s tensor by tensor)."""

    def __init__(self, path: str | Path, batch_bytes: int = 128 * 2**20):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.batch_bytes = batch_bytes
        self._ckpt = ocp.PyTreeCheckpointer()
        tree = self._ckpt.metadata(self.path / "weights").item_metadata.tree
        self._shapes = {name: tuple(m.shape) for name, m in tree.items()}
        self._nbytes = {name: int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                        for name, m in tree.items()}

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    def config(self) -> QwenConfig:
        return QwenConfig.from_hf(self.meta["config"], source=str(self.path / META_FILE))

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _restore(self, names: list[str]) -> dict[str, np.ndarray]:
        args = ocp.args.PyTreeRestore(
            item={n: np.zeros(0) for n in names}, partial_restore=True,
            restore_args={n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names})
        return self._ckpt.restore(self.path / "weights", args=args)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - per-device loaders ask for a tensor twice
    def get(self, name: str) -> np.ndarray:
        return self._restore([name])[name]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors in name order, restored `batch_bytes` at a time."""
        batches: list[list[str]] = [[]]
        size = 0
        for name in sorted(self._shapes):
            if batches[-1] and size + self._nbytes[name] > self.batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append(name)
            size += self._nbytes[name]
        for batch in batches:
            restored = self._restore(batch)
            yield from ((name, restored[name]) for name in batch)


def to_torch(array: np.ndarray) -> Any:
    """A numpy array (bfloat16 included, which torch.from_numpy lacks) as a torch tensor."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def load_export(path: str | Path, *, dtype: str | None = None,
                mesh: jax.sharding.Mesh | None = None) -> tuple[Qwen, int]:
    """(model, weight version) from an export; dtype defaults to the exported one."""
    index = ExportIndex(path)
    dtype = dtype or index.meta["config"]["dtype"]
    return load_from_tensors(index.config(), index, str(path), dtype=dtype, mesh=mesh), \
        index.version
