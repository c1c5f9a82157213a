"""Hugging Face checkpoint I/O: one table of HF name <-> our parameter path, one loader, one
writer.

`load_pretrained` reads each device's slice of each tensor straight from memory-mapped
safetensors into its target sharding (`jax.make_array_from_callback`), so a host never holds
a second full copy of the model, and on multi-host each host reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from dapo_jax.models.config import QwenConfig
from dapo_jax.models.qwen import Precision, Qwen, state_shardings
from dapo_jax.models.safetensors_io import TensorIndex, find_safetensors, write_file

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor and where it lives in our model. `{i}` in `hf` is the layer index."""

    path: tuple[str, ...]
    hf: str
    to_ours: Callable[[Array, QwenConfig], Array]
    to_hf: Callable[[Array, QwenConfig], Array]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"


_same = lambda w, c: w
_T = lambda w, c: w.T


def _mapping(cfg: QwenConfig) -> list[Entry]:
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def proj_in(heads: int) -> tuple[Callable, Callable]:
        """[heads*H, D] (torch Linear: out x in) <-> [D, heads, H]."""
        return (lambda w, c: w.T.reshape(d, heads, h), lambda w, c: w.reshape(d, heads * h).T)

    def bias(heads: int) -> tuple[Callable, Callable]:
        return (lambda w, c: w.reshape(heads, h), lambda w, c: w.reshape(heads * h))

    p = "model.layers.{i}."
    entries = [
        Entry(("embed",), "model.embed_tokens.weight", _same, _same),
        Entry(("final_norm", "scale"), "model.norm.weight", _same, _same),
        Entry(("layers", "input_norm", "scale"), p + "input_layernorm.weight", _same, _same),
        Entry(("layers", "post_attn_norm", "scale"), p + "post_attention_layernorm.weight",
              _same, _same),
        Entry(("layers", "attn", "q_proj"), p + "self_attn.q_proj.weight", *proj_in(n)),
        Entry(("layers", "attn", "k_proj"), p + "self_attn.k_proj.weight", *proj_in(k)),
        Entry(("layers", "attn", "v_proj"), p + "self_attn.v_proj.weight", *proj_in(k)),
        Entry(("layers", "attn", "o_proj"), p + "self_attn.o_proj.weight",
              lambda w, c: w.T.reshape(n, h, d), lambda w, c: w.reshape(n * h, d).T),
        Entry(("layers", "mlp", "gate_proj"), p + "mlp.gate_proj.weight", _T, _T),
        Entry(("layers", "mlp", "up_proj"), p + "mlp.up_proj.weight", _T, _T),
        Entry(("layers", "mlp", "down_proj"), p + "mlp.down_proj.weight", _T, _T),
    ]
    if cfg.qkv_bias:
        entries += [
            Entry(("layers", "attn", "q_bias"), p + "self_attn.q_proj.bias", *bias(n)),
            Entry(("layers", "attn", "k_bias"), p + "self_attn.k_proj.bias", *bias(k)),
            Entry(("layers", "attn", "v_bias"), p + "self_attn.v_proj.bias", *bias(k)),
        ]
    if cfg.qk_norm:
        entries += [
            Entry(("layers", "attn", "q_norm", "scale"), p + "self_attn.q_norm.weight",
                  _same, _same),
            Entry(("layers", "attn", "k_norm", "scale"), p + "self_attn.k_norm.weight",
                  _same, _same),
        ]
    if not cfg.tie_word_embeddings:
        entries.append(Entry(("lm_head",), "lm_head.weight", _T, _T))
    return entries


def hf_tensors(cfg: QwenConfig) -> list[tuple[Entry, int | None, str]]:
    """Every (entry, layer index or None, HF tensor name) of a checkpoint for `cfg`."""
    out = []
    for e in _mapping(cfg):
        if e.stacked:
            out += [(e, i, e.hf.format(i=i)) for i in range(cfg.num_layers)]
        else:
            out.append((e, None, e.hf))
    return out


# Tensors some exporters add that carry no information for us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: str | Path) -> QwenConfig:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist")
    return QwenConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file))


def load_pretrained(
    path: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen:
    """Loads a HF Qwen2/Qwen3 checkpoint directory into a (sharded) `Qwen`.

    `dtype` is the parameter dtype; `compute_dtype` defaults to it. Missing, unexpected or
    mis-shaped tensors are errors naming the tensor.
    """
    path = Path(path)
    return load_from_tensors(read_config(path), TensorIndex(find_safetensors(path)), str(path),
                             dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                             attention_impl=attention_impl, mesh=mesh)


class TensorSource(Protocol):
    """HF-named tensors: a safetensors directory (`TensorIndex`) or an orbax weight export."""

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


def load_from_tensors(
    cfg: QwenConfig,
    index: TensorSource,
    path: str,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen:
    """Builds a `Qwen` for `cfg` from HF-named tensors, each device reading only its slice."""
    precision = Precision(param_dtype=dtype, dtype=compute_dtype or dtype)
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=precision, remat=remat,
                                           attention_impl=attention_impl, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                                 abstract_state)
    else:
        shardings = state_shardings(abstract_state, mesh)

    _check_tensors(index, hf_specs(cfg, abstract_state), cfg, path)
    by_path = {e.path: e for e in _mapping(cfg)}

    def load(key_path: tuple, abstract_leaf: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        our_path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        entry = by_path[our_path]
        target = np.dtype(abstract_leaf.dtype)

        def read(layer: int | None, idx: tuple[slice, ...]) -> Array:
            view = entry.to_ours(index.get(entry.hf.format(i=layer)), cfg)
            return np.asarray(view[idx], dtype=target)

        def callback(idx: tuple[slice, ...]) -> Array:
            if not entry.stacked:
                return read(None, idx)
            layers = range(cfg.num_layers)[idx[0]]
            return np.stack([read(i, idx[1:]) for i in layers])

        return jax.make_array_from_callback(abstract_leaf.shape, sharding, callback)

    state = jax.tree_util.tree_map_with_path(load, abstract_state, shardings)
    return nnx.merge(graphdef, state)


def hf_specs(cfg: QwenConfig, state: nnx.State) -> list[tuple[Entry, int | None, str, tuple]]:
    """`hf_tensors` with each tensor's HF shape, derived from our parameter shapes."""
    specs = []
    for entry, layer, name in hf_tensors(cfg):
        shape = _get(state, entry.path).shape
        shape = shape[1:] if entry.stacked else shape
        specs.append((entry, layer, name, entry.to_hf(np.empty(shape, np.bool_), cfg).shape))
    return specs


def _check_tensors(index: TensorSource, specs: list, cfg: QwenConfig, path: str) -> None:
    expected = {name for _, _, name, _ in specs}
    present = {n for n in index.names() if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        # Some exporters write the tied head anyway; it is the embedding by definition.
        present.discard("lm_head.weight")
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor(s) {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise ValueError(f"{path}: checkpoint has unexpected tensor(s) {unexpected[:8]}"
                         + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    for _, _, name, shape in specs:
        if index.shape(name) != tuple(shape):
            raise ValueError(f"{path}: tensor {name} has shape {index.shape(name)}, but "
                             f"config.json implies {tuple(shape)}")


def hf_state_dict(model: Qwen, dtype: str | None = None) -> dict[str, jax.Array]:
    """All parameters as HF-named arrays in HF layout and `dtype` (default: the parameter
    dtype), computed on device (one jitted transform, so shardings carry over); used by the
    orbax weight export."""
    dtype = str(np.dtype(dtype or model.precision.param_dtype))
    return _hf_converter(model.config, dtype)(nnx.state(model))


@functools.lru_cache(maxsize=8)
def _hf_converter(cfg: QwenConfig, dtype: str) -> Callable[[nnx.State], dict[str, jax.Array]]:
    """The jitted conversion for one architecture and dtype, built once: a fresh closure per
    export would be traced and compiled again on every training step."""

    @jax.jit
    def convert(state: nnx.State) -> dict[str, jax.Array]:
        out = {}
        for entry, layer, name in hf_tensors(cfg):
            value = _get(state, entry.path)
            value = entry.to_hf(value if layer is None else value[layer], cfg)
            out[name] = value.astype(dtype)
        return out

    return convert


def _host_tensors(model: Qwen) -> Iterator[tuple[str, Array]]:
    """(HF name, host array) one tensor at a time, in `hf_tensors` order."""
    state = nnx.state(model)
    cache: dict[tuple[str, ...], jax.Array] = {}
    for entry, layer, name in hf_tensors(model.config):
        value = cache.get(entry.path)
        if value is None:
            value = _get(state, entry.path)
            if not value.is_fully_addressable:
                # Multi-host: gather this one parameter (all hosts must take part).
                from jax.experimental import multihost_utils

                value = multihost_utils.process_allgather(value, tiled=True)
            cache = {entry.path: value}
        array = value if layer is None else value[layer]
        yield name, entry.to_hf(np.asarray(jax.device_get(array)), model.config)


def _get(state: nnx.State, path: tuple[str, ...]) -> jax.Array:
    node = state
    for key in path:
        node = node[key]
    return node.get_value()


def save_pretrained(model: Qwen, path: str | Path, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `config.json` and HF safetensors (sharded with an index above
    `max_shard_bytes`) in `dtype` (default: the parameter dtype) that `transformers` and vLLM
    load unchanged. Each file is written to a temporary name and renamed; the index and
    config come last."""
    path = Path(path)
    cfg = model.config
    dtype = np.dtype(dtype or model.precision.param_dtype)
    specs = [(name, shape, dtype) for _, _, name, shape in hf_specs(cfg, nnx.state(model))]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    write = jax.process_index() == 0
    if write:
        path.mkdir(parents=True, exist_ok=True)
    tensors = (array.astype(dtype) for _, array in _host_tensors(model))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        data = (next(tensors) for _ in shard)
        if write:
            write_file(path / fname, shard, data)
        else:
            for _ in data:  # take part in the multi-host gathers
                pass
        weight_map.update({name: fname for name, _, _ in shard})
    if not write:
        return
    index_file = path / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(math.prod(s) * dtype.itemsize for _, s, _ in specs)
        _write_json(index_file, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif index_file.exists():
        index_file.unlink()
    _write_json(path / "config.json", cfg.to_hf(str(dtype)))


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


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
