"""The training loop: regime step -> objective -> backward -> optimiser, with AMP, EMA, DDP,
validation-based model selection, early stopping, logs and exactly resumable checkpoints.

What a caller must do for reproducible runs: call :func:`seed_everything` with ``train.seed``
*before* building the model (its initial weights come from the global RNG), and pass loaders made
by :func:`make_loader` (or any loader whose sampler has ``set_epoch`` and whose shuffle depends only
on seed + epoch). The trainer re-seeds python/numpy/torch with ``train.seed + rank`` when built, and
restores every RNG state from the checkpoint on resume.

Outputs under ``out_dir``: ``last/`` (every epoch), ``best/`` (on improvement of ``train.select_on``),
``log.csv`` (one row per epoch), ``tensorboard/`` when TensorBoard is installed.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Amp, Optimizer, Recipe, SelectOn, choose
from ..errors import CxrlabError, unknown
from .. import checkpoint as ckpt
from . import distributed as dist
from .distributed import make_loader  # noqa: F401  (re-exported: callers build loaders from here)
from .optim import build_optimizer, build_scheduler, model_parts

log = logging.getLogger("cxrlab.trainer")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainStep(nn.Module):
    """Model + regime modules + objective as one module whose forward is a whole training step, so
    DDP sees every forward the regime makes and all-reduces every trainable parameter's gradient."""

    def __init__(self, model: nn.Module, regime, objective: nn.Module):
        super().__init__()
        self.model = model
        self.regime_modules = regime.modules
        self.objective = objective
        self.regime = regime  # not an nn.Module: a plain attribute

    def forward(self, batch: dict):
        output = self.regime.step(self.model, batch)
        return self.objective(output, batch)


@dataclass
class FitResult:
    """What ``Trainer.fit`` did: the selected (``checkpoint``) and last checkpoint folders, the best
    epoch's logged row and score, every epoch's row (``history``), whether it stopped early, the
    regime's per-epoch statistics (e.g. MPC pseudo-label precision) and the CSV log."""

    checkpoint: Path
    last_checkpoint: Path
    best: dict | None
    best_epoch: int | None
    best_score: float | None
    history: list[dict]
    stopped_early: bool
    epoch_stats: list[dict]
    log: Path


class Trainer:
    """``fit(train_loader, val_loader, resume=False)`` trains; ``predict(loader)`` scores.

    Validation each epoch uses the evaluated weights (the EMA when ``train.ema`` is set) on
    un-augmented images; its loss is the masked BCE of the logits, the same for every method (the
    objective may hold per-training-image state that validation images must not touch).
    """

    def __init__(self, recipe: Recipe, model: nn.Module, objective: nn.Module, regime, out_dir: Path,
                 label_names, device: str | torch.device | None = None):
        self.recipe = recipe
        self.cfg = t = recipe.train
        self.out_dir = Path(out_dir)
        self.label_names = list(label_names)
        self.dist = dist.init_distributed()
        self.device = torch.device(device) if device is not None else dist.default_device(t.device)
        seed_everything(t.seed + self.dist.rank)
        _set_determinism(t.deterministic, self.device)
        self.amp_dtype = _amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None

        self.model = model.to(self.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.regime = regime
        regime.modules.to(self.device)
        self.objective = objective.to(self.device)
        self.step_module = TrainStep(self.model, regime, self.objective)
        objective_buffers = [f"objective.{name}" for name, _ in self.objective.named_buffers()]
        self.train_step = dist.wrap_ddp(self.step_module, self.device, t.find_unused_parameters,
                                        ignore=objective_buffers)
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(recipe.optim, model_parts(self.model, regime.modules), self.objective,
                                         fused=self.device.type == "cuda" and recipe.optim.name == Optimizer.ADAMW)
        self.scheduler = None  # needs the number of steps per epoch: built in fit()
        self.ema = None
        if t.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=t.ema)
        if t.compile:  # in place (nn.Module.compile): parameter names and checkpoints stay as they are
            self.model.compile(**compile_args(t.compile))
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.best = {"score": None, "epoch": None, "bad_epochs": 0, "stopped": False}

    # ------------------------------------------------------------------------------------ training

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation and prediction use: the EMA copy when kept."""
        return self.ema.module if self.ema is not None else self.model

    def prepare(self, steps_per_epoch: int) -> None:
        """Build the per-step schedule (fit calls this; exposed for benchmarks)."""
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = build_scheduler(self.recipe.schedule, self.optimizer, self.cfg.epochs, steps_per_epoch,
                                         self.recipe.optim.new_params_warmup_epochs)

    def fit(self, train_loader, val_loader=None, resume: bool = False) -> "FitResult":
        """Train ``train.epochs`` epochs (from the last checkpoint when ``resume``), then load the
        selected (best) weights into the model. Returns the best epoch's metrics, the history and
        the checkpoint paths."""
        if len(train_loader) == 0:
            raise CxrlabError("the training loader yields no batch (fewer samples than train.batch_size "
                              "with drop_last?)")
        self.prepare(len(train_loader))
        previous = ckpt.latest(self.out_dir) if resume else None
        if previous is not None:
            self._restore(previous)
            log.info("resumed from %s at epoch %d (step %d)", previous, self.epoch, self.step)
        elif resume:
            log.warning("nothing to resume in %s (no last/checkpoint.json): starting afresh", self.out_dir)
        writer = self._tensorboard()
        try:
            while self.epoch < self.cfg.epochs and not self.best["stopped"]:
                self._run_epoch(train_loader, val_loader, writer)
        finally:
            if writer is not None:
                writer.close()
        dist.barrier()
        best_dir = self.out_dir / "best"
        if (best_dir / ckpt.INFO_FILE).is_file():
            self._load_weights(best_dir)
        best_row = next((r for r in self.history if r["epoch"] == self.best["epoch"]), None)
        stats = [{"epoch": r["epoch"], **{k: r[k] for k in r.get("_stat_keys", ())}} for r in self.history]
        return FitResult(checkpoint=best_dir, last_checkpoint=self.out_dir / "last", best=_public(best_row),
                         best_epoch=self.best["epoch"], best_score=self.best["score"],
                         history=[_public(r) for r in self.history], stopped_early=self.best["stopped"],
                         epoch_stats=[s for s in stats if len(s) > 1], log=self.out_dir / "log.csv")

    def _run_epoch(self, train_loader, val_loader, writer) -> None:
        epoch = self.epoch
        dist.set_epoch(train_loader, epoch)
        self.objective.on_epoch_start(epoch)
        start = time.perf_counter()
        row = {"epoch": epoch + 1, **self.train_epoch(train_loader, epoch)}
        # Each rank updated BatchNorm statistics from its own shard: agree on rank 0's.
        dist.broadcast_buffers(self.model)
        if self.ema is not None:
            dist.broadcast_buffers(self.ema.module)
        if val_loader is not None:
            row.update(self.validate(val_loader))
        # per-epoch diagnostics of the regime (e.g. MPC's pseudo-labels) and the head (e.g. LCL's G and maps)
        stats = {**self.regime.epoch_stats(), **self.model.head.epoch_stats()}
        stats = dist_mean({k: float(v) for k, v in (stats or {}).items() if isinstance(v, (int, float, np.number))})
        row.update(stats)
        row["_stat_keys"] = list(stats)
        row["step"] = self.step
        row["epoch_time_s"] = time.perf_counter() - start
        self.epoch = epoch + 1
        improved = self._select(row) if val_loader is not None else True
        if improved:
            self.best.update(score=row.get(f"val_{self.cfg.select_on}"), epoch=row["epoch"], bad_epochs=0)
        else:
            self.best["bad_epochs"] += 1
            patience = self.cfg.early_stop_patience
            if patience is not None and self.best["bad_epochs"] >= patience:
                self.best["stopped"] = True
        self.history.append(row)
        self._save(improved)
        if self.dist.is_main:
            self._write_logs(row, writer)
            log.info("epoch %d/%d  %s", row["epoch"], self.cfg.epochs,
                     "  ".join(f"{k} {v:.4g}" for k, v in _public(row).items()
                               if isinstance(v, float) and k != "epoch"))

    def train_epoch(self, loader, epoch: int = 0) -> dict:
        """One pass over ``loader``; mean of every logged term, last lr, images per second."""
        from tqdm.auto import tqdm

        if self.scheduler is None:
            self.prepare(len(loader))
        self.step_module.train()
        sums: dict[str, float] = defaultdict(float)
        steps = images = 0
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.dist.is_main and sys.stderr.isatty()))
        start = time.perf_counter()
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                loss, logs = self.train_step(batch)
            if not math.isfinite(logs["loss"]):
                raise CxrlabError(f"the loss is {logs['loss']} at step {self.step} (epoch {epoch + 1}); "
                                  f"terms: {logs}. Try a lower optim.lr, train.grad_clip, or train.amp=off")
            self._backward_and_step(loss)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            for k, v in logs.items():
                sums[k] += v
            steps += 1
            images += batch["image"].shape[0]
            bar.update()
            if bar.disable is False and steps % 10 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}",
                                img_s=f"{images / (time.perf_counter() - start):.0f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        bar.close()
        out = dist_mean({f"train_{k}": v / max(steps, 1) for k, v in sums.items()})
        out["lr"] = lr
        out["train_img_s"] = dist_sum({"x": images / max(elapsed, 1e-9)})["x"]
        return out

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.grad_clip
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()

    def _select(self, row: dict) -> bool:
        score = row.get(f"val_{self.cfg.select_on}")
        best = self.best["score"]
        if score is None or not math.isfinite(score):
            return best is None and self.best["epoch"] is None  # keep the first epoch rather than none
        if best is None or not math.isfinite(best):
            return True
        return score > best if self.cfg.select_on == SelectOn.MACRO_AUC else score < best

    # ------------------------------------------------------------------------------------ evaluation

    def validate(self, loader) -> dict:
        """Masked BCE and macro AUC of the evaluated weights on ``loader`` (every sample once)."""
        from ..metrics import macro_auc

        logits, target, mask = self._outputs(loader)
        loss = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        val_loss = float((loss * mask).sum() / mask.sum().clamp_min(1.0))
        auc = macro_auc(torch.sigmoid(logits).numpy(), target.numpy(), mask.numpy())
        return {"val_loss": val_loss, "val_macro_auc": float(auc)}

    def predict(self, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probs, targets, masks)`` as float32 numpy N×L, from the evaluated (EMA if kept) weights.

        Under DDP every rank returns the whole set in dataset order, each sample once (the
        DistributedSampler's padding repeats are dropped)."""
        logits, target, mask = self._outputs(loader)
        return (torch.sigmoid(logits).numpy().astype(np.float32), target.numpy().astype(np.float32),
                mask.numpy().astype(np.float32))

    @torch.no_grad()
    def _outputs(self, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.eval_model
        was_training = net.training
        net.eval()
        logits, targets, masks = [], [], []
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                out = net(batch["image"])
            logits.append(out.logits.float())
            targets.append(batch["target"].float())
            masks.append(batch["mask"].float())
        net.train(was_training)
        n_labels = len(self.label_names)
        parts = [torch.cat(x) if x else torch.zeros(0, n_labels, device=self.device) for x in (logits, targets, masks)]
        if self.dist.distributed:
            parts = _gather_in_order(parts, loader)
        return tuple(p.cpu() for p in parts)

    # ------------------------------------------------------------------------------------ helpers

    def _to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        image = out["image"]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.cfg.channels_last and image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        out["image"] = image
        out["target"] = out["target"].float()
        out["mask"] = out["mask"].float() if "mask" in out else torch.ones_like(out["target"])
        return out

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: CSV only
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _write_logs(self, row: dict, writer) -> None:
        rows = [_public(r) for r in self.history]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".log.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.out_dir / "log.csv")
        if writer is not None:
            for k, v in _public(row).items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step") and v is not None:
                    writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
            writer.flush()

    # ------------------------------------------------------------------------------------ checkpoints

    def _save(self, improved: bool) -> None:
        """Write ``last/`` (and ``best/`` when improved) from rank 0; every rank joins the RNG gather."""
        rng = ckpt.capture_rng()
        gathered = {}
        for key, tensor in rng.items():
            for rank, t in enumerate(dist.all_gather_list(tensor)):
                gathered[f"rng.{rank}.{key}"] = t
        if self.dist.is_main:
            weights = ckpt.module_tensors({"model": self.model, "regime": self.regime.modules,
                                           "objective": self.objective})
            optim_tensors, optim_structure = ckpt.flatten_optimizer(self.optimizer.state_dict())
            state = {**optim_tensors, **gathered}
            if self.ema is not None:
                state.update(ckpt.module_tensors({"ema": self.ema.module}))
                state["ema_rng"] = self.ema._sr_generator.get_state()
            structure = {"optimizer": optim_structure, "scheduler": self.scheduler.state_dict(),
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                         "world_size": self.dist.world_size}
            info = {"recipe": self.recipe.to_dict(), "labels": self.label_names, "thresholds": None,
                    "metrics": _public(self.history[-1]), "epoch": self.epoch, "step": self.step,
                    "ema": self.ema is not None,
                    "trainer": {**self.best, "history": self.history},
                    "torch": torch.__version__}
            text = self.model.head.text_identity
            if text is not None:  # prototype head: the text encoder behind its stored label vectors
                info["label_text"] = text
            ckpt.save_checkpoint(self.out_dir / "last", weights, state, structure, info,
                                 also=self.out_dir / "best" if improved else None)
        dist.barrier()

    def _restore(self, folder: Path) -> None:
        """Put the trainer back exactly where the checkpoint left it (weights, optimiser, schedule,
        EMA, grad scaler, RNG states, selection state and history)."""
        info = ckpt.read_info(folder)
        _check_same_backbones(info, self.recipe, folder)
        weights = ckpt.read_tensors(folder, ckpt.MODEL_FILE, info)
        state, meta = ckpt.read_tensors(folder, ckpt.STATE_FILE, info, with_metadata=True)
        for prefix, module in (("model", self.model), ("regime", self.regime.modules),
                               ("objective", self.objective)):
            ckpt.load_module(module, _strip(weights, prefix), folder / ckpt.MODEL_FILE)
        structure = ckpt._decode(json.loads(meta["structure"]))
        try:
            self.optimizer.load_state_dict(ckpt.unflatten_optimizer(state, structure["optimizer"]))
        except (ValueError, KeyError) as exc:
            raise CxrlabError(f"{folder / ckpt.STATE_FILE}: optimiser state does not fit this run: {exc}") from None
        self.scheduler.load_state_dict(structure["scheduler"])
        if self.scaler is not None and structure.get("scaler"):
            self.scaler.load_state_dict(structure["scaler"])
        if self.ema is not None:
            if not info.get("ema"):
                raise CxrlabError(f"{folder}: the checkpoint has no EMA weights but train.ema is set")
            ckpt.load_module(self.ema.module, _strip(state, "ema"), folder / ckpt.STATE_FILE)
            if "ema_rng" in state:
                self.ema._sr_generator.set_state(state["ema_rng"])
        rng = _strip(state, f"rng.{self.dist.rank}") or _strip(state, "rng.0")
        if rng:
            ckpt.restore_rng(rng)
        trainer = info["trainer"]
        self.history = trainer["history"]
        self.best = {k: trainer[k] for k in ("score", "epoch", "bad_epochs", "stopped")}
        self.epoch, self.step = int(info["epoch"]), int(info["step"])
        if info.get("recipe") != self.recipe.to_dict():
            log.warning("resuming %s with a recipe that differs from the checkpoint's", folder)

    def _load_weights(self, folder: Path) -> None:
        """Load a checkpoint's model (and EMA) weights only: the selected model after fit."""
        info = ckpt.read_info(folder)
        ckpt.load_module(self.model, ckpt.read_tensors(folder, ckpt.MODEL_FILE, info, prefix="model"),
                         folder / ckpt.MODEL_FILE)
        if self.ema is not None and info.get("ema"):
            ckpt.load_module(self.ema.module, ckpt.read_tensors(folder, ckpt.STATE_FILE, info, prefix="ema"),
                             folder / ckpt.STATE_FILE)


# ---------------------------------------------------------------------------------------- module helpers

def _check_same_backbones(info: dict, recipe: Recipe, folder: Path) -> None:
    """Resuming needs the checkpoint's backbones (names, output strides, order): say so by field."""
    from ..models import describe_backbones

    saved_model = (info.get("recipe") or {}).get("model")
    if saved_model is None:
        return
    saved, wanted = describe_backbones(saved_model), describe_backbones(recipe.model)
    if saved != wanted:
        def show(specs):
            return [name if stride is None else f"{name} (output_stride {stride})" for name, stride in specs]

        raise CxrlabError(f"{folder}: the checkpoint's model.backbones is {show(saved)} but this recipe's is "
                          f"{show(wanted)}; resume with the checkpoint's recipe or start a new run")


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


def _amp_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
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


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels


def _gather_in_order(parts: list[torch.Tensor], loader) -> list[torch.Tensor]:
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
    if not dist.info().distributed or not values:
        return values
    import torch.distributed as tdist

    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" \
        else torch.device("cpu")
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _public(row: dict | None) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if not k.startswith("_")}
