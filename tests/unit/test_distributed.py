"""Data-parallel training: 2 processes on CPU (gloo) train the same IRM as 1 process."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from irm_lens.cli import main
from irm_lens.distributed import Ranks
from irm_lens.errors import ConfigError

# lengths differ (5 to 40 bytes, none truncated), so ranks see different token counts
TEXTS = [f"the {w} " * (1 + i % 5) + "ran." for i, w in
         enumerate(["cat", "dog", "fox", "owl", "hen", "elk", "yak", "ant"] * 5)]


def _train_args(model_dir, data, out, steps: int) -> list[str]:
    return ["train", "--model", str(model_dir), "--device", "cpu", "--data", str(data),
            "--preset", "small", "--seed", "0", "--steps", str(steps), "--batch-size", "4",
            "--max-length", "48", "--eval-every", "3", "--lr", "1e-3", "--l1", "1e-3",
            "--out", str(out)]


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "irm_lens", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    tensors = load_file(run_dir / "checkpoints" / f"step-{step:07d}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("irm.", "optim."))}


def _assert_same_run(a, b, step: int) -> None:
    wa, wb = _weights(a, step), _weights(b, step)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=key)
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    columns = ["step", "loss", "lm_loss", "l1_norm", "val_loss", "val_loss_no_irm"]
    pd.testing.assert_frame_equal(ma[columns], mb[columns], rtol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "texts.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(path, index=False)
    return path


def test_two_gloo_processes_train_the_same_irm_as_one(tiny_llama_dir, data, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(_train_args(tiny_llama_dir, data, single, 6)) == 0
    _torchrun(_train_args(tiny_llama_dir, data, double, 6))
    _assert_same_run(single, double, 6)
    # rank 0 alone wrote the run: one metrics line per step and evaluation, no duplicates
    metrics = pd.read_json(double / "metrics.jsonl", lines=True)
    assert metrics["loss"].notna().sum() == 6 and metrics["step"].is_monotonic_increasing
    assert (double / "irm.safetensors").is_file()


def test_a_two_process_checkpoint_resumes_in_one_process(tiny_llama_dir, data, tmp_path):
    reference, switched = tmp_path / "reference", tmp_path / "switched"
    assert main(_train_args(tiny_llama_dir, data, reference, 6)) == 0
    _torchrun(_train_args(tiny_llama_dir, data, switched, 3))  # 2 ranks, steps 1-3
    assert main(_train_args(tiny_llama_dir, data, switched, 6)) == 0  # 1 rank, steps 4-6
    _assert_same_run(reference, switched, 6)


def test_the_global_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        Ranks(rank=0, world_size=3).check_batch(8)
    assert Ranks(rank=1, world_size=2).check_batch(8) == 4


def test_the_ranks_share_of_each_epoch_interleaves_the_single_process_order():
    one = Ranks().epoch_order(20, seed=7, epoch=3)
    halves = [Ranks(rank=r, world_size=2).epoch_order(20, seed=7, epoch=3) for r in (0, 1)]
    assert sorted(one.tolist()) == list(range(20))
    for step in range(5):  # global batch 4 = 2 per rank
        together = torch.cat([h[step * 2:(step + 1) * 2] for h in halves])
        assert sorted(together.tolist()) == sorted(one[step * 4:(step + 1) * 4].tolist())
