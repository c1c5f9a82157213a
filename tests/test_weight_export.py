"""orbax weight export: HF names, atomic step dirs, pruning, tensor-by-tensor loading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dapo_jax.models import load_pretrained
from dapo_jax.models.safetensors_io import TensorIndex, find_safetensors
from dapo_jax.sharding import make_mesh
from dapo_jax.weight_export import (
    ExportIndex,
    export_weights,
    latest_export,
    load_export,
    read_meta,
    to_torch,
)


def test_export_roundtrip_matches_hf_checkpoint(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["qwen2_bias_untied"]
    model = load_pretrained(path, mesh=make_mesh((1, 4, 2)))
    out = export_weights(model, tmp_path, step=3, version=7)
    assert out == tmp_path / "step_3" and read_meta(out)["version"] == 7
    index, hf = ExportIndex(out), TensorIndex(find_safetensors(path))
    assert index.names() == hf.names() and index.version == 7
    for name, array in index.items():
        np.testing.assert_array_equal(array, hf.get(name), err_msg=name)
    # Batched restores (here: ~64 KiB per orbax call) yield every tensor once, in name order.
    small = ExportIndex(out, batch_bytes=64 * 2**10)
    names = [name for name, _ in small.items()]
    assert names == sorted(index.names())
    for name, array in small.items():
        np.testing.assert_array_equal(array, hf.get(name), err_msg=name)
    again, version = load_export(out)
    assert version == 7
    for a, b in zip(jax.tree.leaves(nnx.state(again)),
                    jax.tree.leaves(nnx.state(load_pretrained(path))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_prunes_and_leaves_no_temporaries(tiny_checkpoints, tmp_path):
    """float32 master weights exported in the serving dtype (bf16): each tensor is the
    float32 one rounded to bf16, and the export's config says bfloat16."""
    model = load_pretrained(tiny_checkpoints["qwen3_tied"], dtype="float32")
    (tmp_path / ".tmp_step_9").mkdir()  # debris of an export killed half-way
    for step in (1, 2, 3):
        export_weights(model, tmp_path, step=step, version=step, keep=2, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_step_9", "step_2", "step_3"]
    assert latest_export(tmp_path) == tmp_path / "step_3"
    export_weights(model, tmp_path, step=9, version=9, keep=2, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_9"]
    index = ExportIndex(tmp_path / "step_9")
    assert index.meta["config"]["dtype"] == "bfloat16"
    tensor = index.get("model.embed_tokens.weight")
    assert tensor.dtype.name == "bfloat16"
    np.testing.assert_array_equal(
        tensor, np.asarray(model.embed[...]).astype(jnp.bfloat16))
    t = to_torch(tensor)
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), tensor.astype(np.float32))


def test_incomplete_export_is_refused(tmp_path):
    (tmp_path / "step_1").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete weight export"):
        ExportIndex(tmp_path / "step_1")
    assert latest_export(tmp_path) is None
