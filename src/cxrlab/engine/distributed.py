"""Multi-process training with ``torchrun`` + DistributedDataParallel, and seeded data loaders.

Launch: ``torchrun --nproc_per_node N -m cxrlab.cli train ...``. torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` joins the process group (NCCL on CUDA,
gloo otherwise). Without those variables everything here degrades to a single process.
``train.batch_size`` is per process; the effective batch is ``batch_size × WORLD_SIZE``.

Reproducibility: shuffling draws from ``seed + epoch`` (never from a generator that carries state
across epochs), so a run resumed at epoch k sees exactly the batches an uninterrupted run sees.
Loaders from :func:`make_loader` do this; a caller building its own must give it a sampler with
``set_epoch`` (e.g. ``DistributedSampler``), which the trainer calls before every epoch.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.workers import die_with_parent


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (idempotent); a single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        import inspect

        bind = "device_id" in inspect.signature(dist.init_process_group).parameters  # torch >= 2.3
        dist.init_process_group("nccl", **({"device_id": torch.device("cuda", local_rank)} if bind else {}))
    else:
        dist.init_process_group("gloo")
    return info()


def info() -> DistInfo:
    """This process's rank, world size and local rank (0, 1, 0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def is_main() -> bool:
    """Only the main process writes checkpoints and logs."""
    return info().is_main


def barrier() -> None:
    if info().distributed:
        dist.barrier()


def default_device(requested: str | None = "auto") -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if requested == "cuda" and info().distributed:
        return torch.device("cuda", info().local_rank)  # one GPU per process under torchrun
    if requested not in (None, "auto"):
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", info().local_rank)
    return torch.device("cpu")


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False,
             ignore: list[str] | tuple = ()) -> nn.Module:
    """DDP-wrap ``module`` when distributed (else return it). ``ignore`` names parameters/buffers
    (state-dict keys) DDP must neither all-reduce nor broadcast."""
    if not info().distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def all_gather_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (first dimensions may differ between ranks), on this tensor's device."""
    if not info().distributed:
        return [tensor]
    comm = _comm_device()
    local = tensor.detach().to(comm).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=comm))
    longest = int(max(s.item() for s in sizes))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[: int(s.item())].to(tensor.device) for p, s in zip(parts, sizes)]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's rows, then rank 1's, ... (first dimensions may differ)."""
    return torch.cat(all_gather_list(tensor)) if info().distributed else tensor


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (e.g. BatchNorm running statistics, which each rank updates
    from its own batches), so evaluation and checkpoints agree across ranks."""
    if not info().distributed:
        return
    comm = _comm_device()
    for buf in module.buffers():
        if buf.device == comm:
            dist.broadcast(buf.data, src)
        else:
            tmp = buf.detach().to(comm)
            dist.broadcast(tmp, src)
            buf.data.copy_(tmp)


class SeededSampler(Sampler[int]):
    """Single-process sampler whose shuffle depends only on ``seed + epoch`` (see ``set_epoch``)."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


class EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` re-seeds both the sampler and the worker seeds per epoch."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed((self.seed << 20) + epoch)


def seed_worker(worker_id: int, parent: int | None = None) -> None:
    """Seed numpy and ``random`` in a loader worker from the per-worker torch seed; with ``parent`` (the
    loader's process) the worker dies with it, so a ``kill -9`` of training leaves no worker behind."""
    if parent is not None:
        die_with_parent(parent)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                distributed: bool | None = None, drop_last: bool | None = None) -> EpochLoader:
    """A loader that is reproducible under ``seed`` and resumable at any epoch.

    ``distributed`` (default: when a process group of > 1 ranks is up, joined here if torchrun set
    the environment) shards with ``DistributedSampler`` (it pads the last shard with repeats;
    :meth:`Trainer.predict` drops them again). ``drop_last`` defaults to ``shuffle``: training drops
    a ragged last batch (a batch of one breaks BatchNorm), evaluation keeps every sample.
    """
    if distributed is None:
        distributed = init_distributed().distributed
    if distributed:
        sampler: Sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    else:
        sampler = SeededSampler(len(dataset), shuffle, seed)
    if drop_last is None:
        drop_last = shuffle and len(sampler) >= batch_size
    generator = torch.Generator()
    generator.manual_seed(seed << 20)
    return EpochLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                       drop_last=drop_last, pin_memory=torch.cuda.is_available(), worker_init_fn=partial(seed_worker, parent=os.getpid()),
                       generator=generator, persistent_workers=False, seed=seed)


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader (or its sampler) which epoch starts; no-op for plain iterables."""
    fn = getattr(loader, "set_epoch", None) or getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if fn is not None:
        fn(epoch)


def sample_positions(loader) -> np.ndarray | None:
    """Dataset positions in the order this rank's loader visits them, when the sampler is
    deterministic (has ``set_epoch``); used to undo DistributedSampler's sharding and padding."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "set_epoch"):
        return None
    return np.fromiter(iter(sampler), dtype=np.int64)
