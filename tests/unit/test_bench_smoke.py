"""The Llama-2-7B-shaped scripts run end to end (their --tiny CPU mode), so they are ready for a GPU."""

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


def test_forecast_on_the_llama2_shape_runs_in_tiny_mode():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "predict_llama2_shape.py"), "--tiny"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "predicted dominant index" in out.stdout and "peak RSS" in out.stdout
