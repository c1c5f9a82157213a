"""The trained policy out as a Hugging Face directory: the trainer's hf_save_interval saves,
and `python -m dapo_jax.export` from a checkpoint; loaded by transformers (logits equal to
ours). vLLM serving what `save_hf` writes: tests/test_rollout_sidecar.py (one vLLM start)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dapo_jax.models import load_pretrained
from dapo_jax.models.safetensors_io import TensorIndex, find_safetensors
from dapo_jax.train.checkpointing import checkpoint_model
from tests import hf_models, launching

TRAIN = [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
         "--config.trainer.max_steps=2", "--config.trainer.ckpt_interval=1",
         "--config.trainer.hf_save_interval=1", "--config.trainer.eval_interval=0",
         "--config.trainer.eval_before_train=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    out = subprocess.run(TRAIN + [f"--config.trainer.run_dir={run}"], cwd=launching.REPO,
                         env=launching.env(devices=1), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run / "console.txt").write_text(out.stdout + out.stderr)
    return run


def test_console_shows_steps_and_library_logs_go_to_a_file(run_dir):
    console = (run_dir / "console.txt").read_text()
    assert "step 1:" in console and "step 2:" in console
    assert "checkpoint_manager" not in console and "orbax" not in console.lower()
    assert "checkpoint" in (run_dir / "logs" / "trainer.log").read_text()


def export(run_dir, out, *args):
    return subprocess.run([sys.executable, "-m", "dapo_jax.export", "--checkpoint",
                           str(run_dir / "checkpoints" / "2"), "--out", str(out), *args],
                          cwd=launching.REPO, env=launching.env(devices=1),
                          capture_output=True, text=True, timeout=300)


def test_trainer_saves_hf_directories(run_dir):
    """Every step (interval 1) and the end: weights of the trained policy, config and the
    base model's tokenizer and generation config; transformers gives our logits."""
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["step_1", "step_2"]
    hf_dir = run_dir / "hf" / "step_2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (hf_dir / name).exists(), name
    trained, _ = checkpoint_model(run_dir / "checkpoints" / "2")
    ids, mask = hf_models.rl_batch(batch=4, length=24, vocab=trained.config.vocab_size, seed=0)
    ours = np.asarray(trained(ids, mask))
    theirs = hf_models.hf_logits(hf_models.load_hf(str(hf_dir)), ids, mask)
    real = mask > 0
    np.testing.assert_allclose(theirs[real], ours[real], rtol=1e-4, atol=1e-4)
    base = np.asarray(load_pretrained(str(launching.ASSET))(ids, mask))
    assert np.abs(base - ours)[real].max() > 1e-4  # it is the trained policy, not the base


def test_export_cli_writes_the_checkpoint_in_the_chosen_dtype(run_dir, tmp_path):
    out = export(run_dir, tmp_path / "f32", "--dtype", "float32")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = TensorIndex(find_safetensors(run_dir / "hf" / "step_2"))
    exported = TensorIndex(find_safetensors(tmp_path / "f32"))
    for name in saved.names():  # the trainer's save at step 2 is the same checkpoint
        np.testing.assert_array_equal(exported.get(name), saved.get(name), err_msg=name)
    out = export(run_dir, tmp_path / "bf16", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    half = TensorIndex(find_safetensors(tmp_path / "bf16"))
    name = "model.embed_tokens.weight"
    assert half.get(name).dtype.name == "bfloat16"
    np.testing.assert_array_equal(half.get(name), exported.get(name).astype(half.get(name).dtype))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_cli_errors_name_the_problem(run_dir, tmp_path):
    out = export(run_dir / "nope", tmp_path / "x")
    assert out.returncode != 0 and "expected a step directory" in out.stderr
