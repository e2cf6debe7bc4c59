"""DDP reductions of what the trainer measures: per-rank numbers averaged or summed over ranks, and
predictions gathered from every rank in dataset order (identities when not distributed)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CxrlabError
from . import distributed as dist


def gather_in_order(parts: list[torch.Tensor], loader) -> list[torch.Tensor]:
    """All ranks' rows in dataset order, each dataset position once (drops sampler padding)."""
    positions = dist.sample_positions(loader)
    if positions is None:
        raise CxrlabError("predicting under DDP needs a loader with a deterministic sampler "
                          "(DistributedSampler; use cxrlab.engine.trainer.make_loader)")
    positions = torch.from_numpy(positions[: parts[0].shape[0]]).to(parts[0].device)
    all_pos = dist.all_gather_cat(positions).cpu().numpy()
    gathered = [dist.all_gather_cat(p) for p in parts]
    _, first = np.unique(all_pos, return_index=True)  # sorted positions, first occurrence of each
    index = torch.from_numpy(first).to(gathered[0].device)
    return [g.index_select(0, index) for g in gathered]


def dist_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of per-rank numbers (identity when not distributed)."""
    world = dist.info().world_size
    return {k: v / world for k, v in dist_sum(values).items()} if world > 1 else values


def dist_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum over ranks of per-rank numbers (identity when not distributed)."""
    if not dist.info().distributed or not values:
        return values
    import torch.distributed as tdist

    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" \
        else torch.device("cpu")
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return dict(zip(keys, t.tolist()))

