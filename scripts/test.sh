#!/usr/bin/env bash
# The test suite: lint, the torchvision backend in its own environment (PyPI's torchvision does not import
# beside the torch 2.13.0 CPU wheel; torch 2.14.1 + torchvision 0.29.1 lie on local disk), then the main tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m ruff check minillava tests benchmarks

TV=.venv-torchvision
if [ ! -x "$TV/bin/python" ] || ! "$TV/bin/python" -c "import torchvision, minillava" 2>/dev/null; then
  "$PY" -m venv "$TV"
  "$TV/bin/pip" install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  "$TV/bin/pip" install --disable-pip-version-check -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$TV/bin/python" -m pytest tests/torchvision_backend -p no:cacheprovider

"$PY" -m pytest "$@"
