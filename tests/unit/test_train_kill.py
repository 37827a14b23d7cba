"""Training killed with SIGKILL part way, then resumed, reaches the same IRM bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import importlib, irm_lens
    T = importlib.import_module("irm_lens.train")
    model_dir, out_dir, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = irm_lens.load_model(model_dir, device="cpu")
    original = T._log
    def slow_log(run, record):  # gives the test time to kill us mid-run
        original(run, record)
        time.sleep(delay)
    T._log = slow_log
    texts = [f"Sentence {i} talks about {w} things, again {w}." for i in range(40) for w in ("red", "blue")]
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    config = T.TrainConfig(batch_size=4, max_length=24, max_steps=14, eval_every=5, checkpoint_every=2)
    T.train(model, irm, texts, config, out_dir=out_dir, progress=False)
    """
)


def _run(tiny_llama_dir, out_dir, delay=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(out_dir), str(delay)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_matches_uninterrupted(tiny_llama_dir, tmp_path):
    reference = _run(tiny_llama_dir, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()

    victim = _run(tiny_llama_dir, tmp_path / "killed", delay=0.3)
    latest = tmp_path / "killed" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads(latest.read_text())["step"] >= 6:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    step_at_kill = json.loads(latest.read_text())["step"]
    assert 6 <= step_at_kill < 14

    resumed = _run(tiny_llama_dir, tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()

    a = load_file(tmp_path / "ref" / "irm.safetensors")
    b = load_file(tmp_path / "killed" / "irm.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert metrics("ref") == metrics("killed")
