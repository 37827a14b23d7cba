"""The GPU benchmark script runs end to end (its --tiny CPU mode), so it is ready when a GPU is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_benchmark_script_runs_in_tiny_mode():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_llama2_shape.py"), "--tiny", "--batches", "2",
         "--steps", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "MFU" in out.stdout
