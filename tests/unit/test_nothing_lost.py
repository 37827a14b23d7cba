"""Nothing lost: real processes killed with SIGKILL part way, then resumed.

Training reaches the same IRM bit for bit; synthetic data generation keeps every row it had
written and ends with the file an uninterrupted run writes. (Atomic writes of single files,
the other half of "nothing lost", are tested where each file is written: see
docs/reliability.md.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import importlib, irm_lens
    T = importlib.import_module("irm_lens.train")
    model_dir, out_dir, delay, tear = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    model = irm_lens.load_model(model_dir, device="cpu")
    original = T._log
    def slow_log(run, record):  # gives the test time to kill us mid-run
        original(run, record)
        time.sleep(delay)
    T._log = slow_log
    def stall(what):  # half of a write is on disk: say so, and wait for the kill
        open(out_dir + "/" + what + ".torn", "w").close()
        time.sleep(600)
    if tear == "checkpoint":  # the third checkpoint's file is cut off half way
        import safetensors.torch as st
        save, calls = st.save_file, []
        def torn_save(tensors, filename, metadata=None):
            calls.append(filename)
            save(tensors, filename, metadata=metadata)
            if len(calls) == 3:
                data = open(filename, "rb").read()
                open(filename, "wb").write(data[: len(data) // 2])
                stall("checkpoint")
        st.save_file = torn_save
    if tear == "metrics":  # the ninth metrics line is half written
        log, lines = T._RunDir.log, []
        def torn_log(self, record):
            lines.append(record)
            if len(lines) == 9:
                with open(self.metrics, "a") as f:
                    f.write(T.json.dumps(record)[:20])
                stall("metrics")
            log(self, record)
        T._RunDir.log = torn_log
    print("training", flush=True)
    texts = [f"Sentence {i} talks about {w} things, again {w}." for i in range(40) for w in ("red", "blue")]
    torch.manual_seed(0)
    irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    config = T.TrainConfig(batch_size=4, max_length=24, max_steps=14, eval_every=5, checkpoint_every=2)
    T.train(model, irm, texts, config, out_dir=out_dir, progress=False)
    print("done", flush=True)
    """
)


def _run(tiny_llama_dir, out_dir, delay=0.0, tear="none"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(out_dir), str(delay), tear],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same_run(tmp_path, ref: str, run: str) -> None:
    """The run's best IRM and metrics are the uninterrupted run's, and every file it left loads."""
    a = load_file(tmp_path / ref / "irm.safetensors")
    b = load_file(tmp_path / run / "irm.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert metrics(ref) == metrics(run)
    for checkpoint in (tmp_path / run / "checkpoints").glob("*.safetensors"):
        load_file(checkpoint)
    for name in ("latest.json", "run.json"):
        json.loads((tmp_path / run / name).read_text())
    assert not list((tmp_path / run).rglob("*.tmp"))  # no half-written file left behind


def _resume(tiny_llama_dir, tmp_path, run: str) -> None:
    resumed = _run(tiny_llama_dir, tmp_path / run)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _same_run(tmp_path, "ref", run)


def _await_line(process, word: str) -> None:
    """Read the process's stdout up to a line that is ``word`` (TransformerLens prints too)."""
    for line in process.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"never printed {word!r}: {process.stderr.read()}")


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted run, and how long its training took (from "training" to "done")."""
    tmp = tmp_path_factory.mktemp("nothing_lost")
    run = _run(tiny_llama_dir, tmp / "ref")
    _await_line(run, "training")
    start = time.perf_counter()
    _await_line(run, "done")
    duration = time.perf_counter() - start
    assert run.wait(timeout=60) == 0
    return tmp, duration


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("tear", ["checkpoint", "metrics"])
def test_kill_mid_write_then_resume_matches_uninterrupted(tiny_llama_dir, reference_run, tear):
    """Killed with a checkpoint file (or a metrics line) half written: resume ignores the torn
    part and still ends where the uninterrupted run did."""
    tmp, _ = reference_run
    run = f"torn-{tear}"
    victim = _run(tiny_llama_dir, tmp / run, tear=tear)
    marker = tmp / run / f"{tear}.torn"
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists() and victim.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    if tear == "metrics":
        assert not (tmp / run / "metrics.jsonl").read_text().endswith("\n")  # torn for real
    _resume(tiny_llama_dir, tmp, run)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("trial", range(4))
def test_kill_at_a_random_moment_then_resume_matches_uninterrupted(
        tiny_llama_dir, reference_run, trial):
    """No sleeps to aim at: the kill lands at a seeded random moment of the training, wherever
    that is (mid-step, mid-checkpoint, mid-log)."""
    tmp, duration = reference_run
    moment = random.Random(1_000 + trial).uniform(0.0, duration)
    run = f"random-{trial}"
    victim = _run(tiny_llama_dir, tmp / run)
    _await_line(victim, "training")
    time.sleep(moment)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    _resume(tiny_llama_dir, tmp, run)


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


SYNTH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import irm_lens
    from irm_lens.data.synthetic import generate_synthetic
    model_dir, out_path, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = irm_lens.load_model(model_dir, device="cpu", n_ctx=1024)
    real = model.generate
    def slow_generate(tokens, **kwargs):  # gives the test time to kill us mid-run
        time.sleep(delay)
        return real(tokens, **kwargs)
    model.generate = slow_generate
    questions = [f"What is fact number {i} about rivers?" for i in range(12)]
    generate_synthetic(model, "sadness", out_path, n_rows=100, questions=questions,
                       max_new_tokens=5, batch_size=2, min_score=0.0, progress=False)
    """
)


def _synth(tiny_llama_dir, out_path, delay=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SYNTH_SCRIPT, str(tiny_llama_dir), str(out_path), str(delay)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkilled_synthetic_generation_keeps_its_rows_and_resumes(tiny_llama_dir, tmp_path):
    reference = _synth(tiny_llama_dir, tmp_path / "ref.jsonl")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    whole = (tmp_path / "ref.jsonl").read_bytes()
    assert whole.count(b"\n") == 12

    path = tmp_path / "killed.jsonl"
    victim = _synth(tiny_llama_dir, path, delay=0.5)
    deadline = time.time() + 240
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 4):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    kept = path.read_bytes()
    complete = kept[: kept.rfind(b"\n") + 1]
    assert 4 <= complete.count(b"\n") < 12
    assert whole.startswith(complete)  # every row written before the kill is intact

    resumed = _synth(tiny_llama_dir, path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert path.read_bytes() == whole
