#!/usr/bin/env bash
# The test suite: lint, the torchvision backend in its own environment (PyPI's torchvision does not import
# beside the torch 2.13.0 CPU wheel; torch 2.14.1 + torchvision 0.29.1 lie on local disk), then the main tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m ruff check minillava tests benchmarks

TV=.venv-torchvision
if [ ! -x "$TV/bin/python" ] || ! "$TV/bin/python" -c "import torchvision, minillava" 2>/dev/null; then
  # torch 2.14.1 is a CUDA build: the venv takes ~5.5 GB. Say so plainly when the disk cannot hold it.
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 7 ]; then
    echo "minillava: the torchvision test venv needs ~6 GB of free disk; $(pwd) has ${free_gb} GB" >&2
    exit 1
  fi
  "$PY" -m venv "$TV"
  "$TV/bin/pip" install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
  # minillava and pytest only: these tests need nothing of the test extra
  "$TV/bin/pip" install --disable-pip-version-check -q -e . pytest
fi
"$TV/bin/python" -m pytest tests/torchvision_backend -p no:cacheprovider

# llama.cpp (the llamacpp extra: GGUF exports run on it) compiles from its sdist, ~7 min on 2 cores; pip caches the
# wheel. Built for AVX2, not for this CPU (-march=native): installs and pip's cache outlive a session while the CPU
# kind changes between sessions, and an AVX-512 build dies with "illegal instruction" on an AVX2-only one.
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    "$PY" -m pip install --disable-pip-version-check -q llama-cpp-python==0.3.36
fi

"$PY" -m pytest "$@"
