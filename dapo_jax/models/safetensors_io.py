"""Minimal safetensors reader/writer over numpy memmaps (bfloat16 included via ml_dtypes).

The `safetensors` package's numpy API has no bfloat16, and we want to read only the slice of
a tensor that a device needs: a memmap view gives both.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class TensorIndex:
    """Name -> lazily memory-mapped array over one or many .safetensors files."""

    def __init__(self, files: Iterable[Path]):
        self._where: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                if name in self._where:
                    raise ValueError(
                        f"tensor {name} appears in both {self._where[name][0]} and {f}")
                start = 8 + n + info["data_offsets"][0]
                self._where[name] = (f, DTYPES[info["dtype"]], tuple(info["shape"]), start)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def get(self, name: str) -> np.ndarray:
        """A read-only view; nothing is read from disk until it is sliced and copied."""
        f, dtype, shape, start = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self._maps[f][start : start + nbytes].view(dtype).reshape(shape)


def find_safetensors(path: str | Path) -> list[Path]:
    """The checkpoint's files: model.safetensors, or those listed in the sharded index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or model.safetensors.index.json) in {path}")
    return files


def write_file(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               data: Iterator[np.ndarray]) -> None:
    """Writes one .safetensors file: the header from the declared (name, shape, dtype)s, then
    each array from `data` in the same order, one at a time, via a temp file and rename."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    declared = list(tensors)
    for name, shape, dtype in declared:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for (name, shape, dtype), array in zip(declared, data, strict=True):
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise ValueError(
                    f"tensor {name}: got {array.shape} {array.dtype}, declared {shape} {dtype}"
                )
            fh.write(np.ascontiguousarray(array).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
