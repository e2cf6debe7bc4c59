"""How a run computes: mixed precision (``train.amp``), ``torch.compile`` (``train.compile``) and
deterministic kernels (``train.deterministic``), each turned from a recipe value into torch settings."""
from __future__ import annotations

import contextlib
import os

import torch

from ..config import Amp, choose
from ..errors import CxrlabError, unknown


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_args(value: bool | str) -> dict:
    """``train.compile`` as torch.compile arguments: true → inductor's default; a mode name → that
    mode; another name → that backend (``torch._dynamo.list_backends``), e.g. ``eager`` to check
    graph capture without code generation."""
    if value is True:
        return {}
    if value in COMPILE_MODES:
        return {"mode": value}
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value not in backends:
        raise unknown("train.compile mode or backend", str(value), [*COMPILE_MODES, *backends])
    return {"backend": value}


def amp_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision)."""
    amp = choose(Amp, amp, "train.amp")  # a recipe's is checked at load; a hand-built TrainConfig's is not
    if amp is Amp.OFF:
        return None
    if amp is Amp.AUTO:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is Amp.BF16:
        return torch.bfloat16
    if device.type != "cuda":  # fp16
        raise CxrlabError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 or off on the CPU")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels

