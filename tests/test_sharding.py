"""Parameter layouts: the rules table, replication against a rule said (or refused with
mesh.strict), and a golden layout per seed config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from dapo_jax.experiments import shardings
from dapo_jax.experiments.targets import load_run
from dapo_jax.models import preset
from dapo_jax.models.qwen import abstract_params, parameter_layouts
from dapo_jax.sharding import (
    LOGICAL_RULES,
    MESH_AXES,
    ReplicatedParameters,
    batch_sharding,
    check_replication,
    make_mesh,
    spec_and_replicated,
)
from tests.launching import env

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens" / "sharding"
# config -> (model preset, compile target): the seed configs and their TPU twins.
SEEDS = {
    "dapo_qwen3_1p7b": ("qwen3-1.7b", "h100x8"),
    "dapo_qwen3_4b": ("qwen3-4b", "h100x8"),
    "dapo_qwen2p5_math_7b": ("qwen2.5-math-7b", "h100x8"),
    "dapo_qwen3_1p7b_v5p": ("qwen3-1.7b", "v5p-8"),
    "dapo_qwen3_4b_v5p": ("qwen3-4b", "v5p-8"),
    "dapo_qwen2p5_math_7b_v5p": ("qwen2.5-math-7b", "v5p-8"),
    "dapo_qwen3_1p7b_v6e": ("qwen3-1.7b", "v6e-8"),
    "dapo_qwen3_4b_v6e": ("qwen3-4b", "v6e-8"),
}


def mesh(shape):
    return AbstractMesh(tuple(shape), MESH_AXES)


def test_a_dimension_the_mesh_does_not_divide_is_named():
    spec, dropped = spec_and_replicated(("embed", "heads", "head_dim"), (3584, 28, 128),
                                        mesh((1, 2, 8)))
    assert spec == PartitionSpec("fsdp", None, None)
    assert [(r.dim, r.logical, r.size, r.mesh_axes, r.ways) for r in dropped] == \
        [(1, "heads", 28, ("tensor",), 8)]
    # Mesh axes of size 1 are not a replication: nothing asked to split.
    assert spec_and_replicated(("heads",), (28,), mesh((1, 8, 1))) == (PartitionSpec(None), [])


def test_the_batch_sharding_is_the_rules_tables():
    m = make_mesh((1, -1, 1))
    assert batch_sharding(m).spec == PartitionSpec(LOGICAL_RULES["batch"])
    x = jax.device_put(jax.numpy.zeros((16, 3)), batch_sharding(m))
    assert len({s.index for s in x.addressable_shards}) == len(jax.devices())


def test_bytes_per_device_add_up_to_the_model_on_one_device():
    params = abstract_params(preset("qwen3-tiny"))
    one = sum(p.bytes_per_device(mesh((1, 1, 1))) for p in parameter_layouts(params,
                                                                          mesh((1, 1, 1))))
    eight = parameter_layouts(params, mesh((1, 8, 1)))
    assert one == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    # FSDP splits every matrix's embedding dimension: an eighth of each, norms whole.
    assert sum(p.bytes_per_device(mesh((1, 8, 1))) for p in eight) < one / 4


def test_7b_on_a_tensor_axis_of_8_says_which_weights_are_replicated(capsys):
    """Qwen2.5-Math-7B has 28 query heads and 4 KV heads: tensor=8 divides neither, so the
    attention weights stay whole on every device. The tool names each; mesh.strict refuses
    in one line."""
    base = ["--config", "configs/dapo_qwen2p5_math_7b.py", "--preset", "qwen2.5-math-7b",
            "--config.mesh.shape=(1,1,8)"]
    assert shardings.main(base) == 0
    err = capsys.readouterr().err.splitlines()
    replicated = sorted(line.split()[1] for line in err if line.startswith("warning:"))
    assert replicated == [f"layers.attn.{w}" for w in (
        "k_bias", "k_proj", "o_proj", "q_bias", "q_proj", "v_bias", "v_proj")]
    assert any("heads 28 (dim 2) is not divisible by tensor = 8" in line for line in err)
    assert shardings.main([*base, "--config.mesh.strict=True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: mesh.shape: mesh data=1 fsdp=1 "
                                               "tensor=8 replicates 7 parameters")
    s, model = load_run("configs/dapo_qwen2p5_math_7b.py", {"mesh.shape": (1, 1, 8)},
                          "qwen2.5-math-7b")
    m, layouts = shardings.layout(s, model, 8)
    with pytest.raises(ReplicatedParameters, match="replicates 7 parameters"):
        check_replication(layouts, m, strict=True)


@pytest.mark.parametrize("config", sorted(SEEDS))
def test_seed_config_layouts_match_their_goldens(config):
    """Each seed config's parameter layout on its target (spec and bytes per device of
    every parameter) is the golden file's: a change of layout is a diff to review, accepted
    with `python -m dapo_jax.experiments.shardings --config configs/<config>.py --preset
    <preset> --target <target> --json tests/goldens/sharding/<config>.json`."""
    model_preset, target = SEEDS[config]
    s, model = load_run(f"configs/{config}.py", {}, model_preset)
    got = json.loads(shardings.golden_text(shardings.golden(
        *shardings.layout(s, model, shardings.TARGET_DEVICES[target]))))
    want = json.loads((GOLDENS / f"{config}.json").read_text())
    changed = sorted(k for k in {*got["params"], *want["params"]}
                     if got["params"].get(k) != want["params"].get(k))
    assert got == want, f"{config}: layout changed for {changed or 'the mesh'}"
    assert got["replicated"] == []  # no seed run copies a weight its rule splits


def test_the_trainer_refuses_a_replicating_mesh_with_strict(tmp_path):
    """arith_base has 1 KV head: tensor=2 cannot split it. With mesh.strict the trainer
    stops in one line before loading anything; without, it warns per parameter."""
    cmd = [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
           f"--config.trainer.run_dir={tmp_path}", "--config.mesh.shape=(1,1,2)",
           "--config.mesh.strict=True"]
    out = subprocess.run(cmd, cwd=REPO, env=env(devices=2), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: mesh.shape: mesh data=1 fsdp=1 tensor=2 replicates "
                                "2 parameters against their rule (layers.attn.k_proj, "
                                "layers.attn.v_proj)"), lines
    assert "Traceback" not in out.stderr
