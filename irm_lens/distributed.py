"""Data-parallel IRM training on PyTorch's own distributed stack (``torchrun``, DDP).

``irm_lens.train`` runs unchanged under ``torchrun``: each process (rank) holds a replica of the
frozen host model and of the IRM; the IRM is wrapped in ``DistributedDataParallel``, which
averages its gradients across ranks; each rank reads its share of every global batch through a
``DistributedSampler``; rank 0 alone writes metrics, the best IRM and checkpoints.

The global batch (``TrainConfig.batch_size``) and the data order do not depend on the number of
ranks: the sampler permutes the epoch with the run's seed exactly as a single process does, and
rank ``r`` of ``W`` takes every ``W``-th example of it, so the ranks' step-``i`` batches together
are the single process's step-``i`` batch. The loss of each rank is scaled so that the averaged
gradient is the gradient of the global batch's token-mean loss. Hence a run on ``W`` ranks
trains the same IRM as a run on one (up to float summation order), and a checkpoint written
with one world size resumes with another.

    torchrun --nproc_per_node=2 -m irm_lens train --alignment anger --out runs/anger-ddp
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from irm_lens.errors import ConfigError


class _DistributedIRM(DistributedDataParallel):
    """DDP around an IRM that ``inject`` can use like the IRM itself (config, compatibility);
    calling it runs DDP's forward, which is what arms the gradient all-reduce."""

    @property
    def config(self):
        return self.module.config

    def check_compatible(self, model) -> None:
        self.module.check_compatible(model)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (1 when not distributed).

    ``owns_group``: the process group was started here (and is destroyed by ``close``), as
    opposed to by the caller before ``train``.
    """

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(cls, device: str | torch.device) -> Ranks:
        """Join the job ``torchrun`` (or the caller) started; a single process otherwise.

        The backend is NCCL for CUDA devices and gloo for the CPU.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), False)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def check_batch(self, batch_size: int) -> int:
        """The per-rank batch size: the global batch split evenly, or a ``ConfigError``."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"The global batch_size ({batch_size}) must be divisible by the number of "
                f"processes ({self.world_size}): each rank takes an equal share of it."
            )
        return batch_size // self.world_size

    def epoch_order(self, n: int, seed: int, epoch: int) -> Tensor:
        """This rank's examples of an epoch, in order (``DistributedSampler``; for one rank,
        the epoch's whole permutation)."""
        sampler = DistributedSampler(
            range(n), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def wrap(self, irm: torch.nn.Module) -> torch.nn.Module:
        """The IRM as the training forward should call it: DDP-wrapped when distributed."""
        if not self.distributed:
            return irm
        device = next(irm.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        return _DistributedIRM(irm, device_ids=device_ids)

    def sum(self, value: Tensor | float) -> Tensor:
        """The sum over ranks (a detached float64 tensor; the value itself when single)."""
        total = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if self.distributed:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            total = total.to(backend_device)
            dist.all_reduce(total)
        return total.cpu()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
