"""HF checkpoint I/O: round trip through transformers, sharded files, clear errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax.models import init_model, load_pretrained, preset, save_pretrained
from dapo_jax.models.safetensors_io import TensorIndex, find_safetensors, write_file
from dapo_jax.sharding import make_mesh
from tests import hf_models


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("variant", list(hf_models.VARIANTS))
def test_load_save_transformers_roundtrip(tiny_checkpoints, rl_batch, tmp_path, variant):
    ids, mask = rl_batch
    model = load_pretrained(tiny_checkpoints[variant])
    save_pretrained(model, tmp_path / "out")
    reloaded = hf_models.load_hf(str(tmp_path / "out"))
    ref = hf_models.hf_logits(hf_models.load_hf(tiny_checkpoints[variant]), ids, mask)
    np.testing.assert_allclose(hf_models.hf_logits(reloaded, ids, mask), ref, atol=1e-5)
    # Tensor-for-tensor identical to the original checkpoint.
    a = TensorIndex(find_safetensors(tmp_path / "out"))
    b = TensorIndex(find_safetensors(tiny_checkpoints[variant]))
    assert a.names() == b.names()
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


def test_sharded_save_from_mesh_and_reload(tiny_checkpoints, rl_batch, tmp_path):
    ids, mask = rl_batch
    mesh = make_mesh((2, 2, 2))
    model = load_pretrained(tiny_checkpoints["qwen2_bias_untied"], mesh=mesh)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=300_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref = hf_models.hf_logits(hf_models.load_hf(tiny_checkpoints["qwen2_bias_untied"]), ids, mask)
    out = hf_models.hf_logits(hf_models.load_hf(str(tmp_path / "sharded")), ids, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    again = load_pretrained(tmp_path / "sharded")
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(forward(again, jnp.asarray(ids), jnp.asarray(mask)))[real], ref[real],
        atol=1e-4)


def test_bfloat16_roundtrip_is_exact(tiny_checkpoints, tmp_path):
    model = load_pretrained(tiny_checkpoints["qwen3_tied"], dtype="bfloat16")
    save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    for x, y in zip(jax_leaves(model), jax_leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def jax_leaves(model):
    import jax

    return jax.tree.leaves(nnx.state(model))


def test_random_init_on_mesh_saves_loadable_checkpoint(tmp_path, rl_batch):
    ids, mask = rl_batch
    cfg = preset("qwen3-tiny")
    model = init_model(cfg, seed=3, mesh=make_mesh((1, 4, 2)))
    save_pretrained(model, tmp_path / "init")
    ref = hf_models.hf_logits(hf_models.load_hf(str(tmp_path / "init")), ids, mask)
    ours = np.asarray(forward(load_pretrained(tmp_path / "init"), jnp.asarray(ids),
                              jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Rewrites model.safetensors with `edit(dict name->array)` applied."""
    f = path / "model.safetensors"
    index = TensorIndex([f])
    tensors = {n: np.array(index.get(n)) for n in sorted(index.names())}
    del index
    edit(tensors)
    write_file(f, [(n, a.shape, a.dtype) for n, a in tensors.items()], iter(tensors.values()))


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["qwen3_tied"], tmp_path / "m")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["qwen3_tied"], tmp_path / "u")
    _rewrite(path, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected.*model\.extra\.weight"):
        load_pretrained(path)


def test_shape_mismatch_is_named(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["qwen3_tied"], tmp_path / "s")
    _rewrite(path, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((128, 128), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        load_pretrained(path)


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "llama.*not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "yarn.*not supported"),
    ({"use_sliding_window": True}, "sliding_window"),
])
def test_unsupported_config_is_an_error(tiny_checkpoints, tmp_path, edit, match):
    path = _copy(tiny_checkpoints["qwen3_tied"], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(edit)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_pretrained(path)


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
