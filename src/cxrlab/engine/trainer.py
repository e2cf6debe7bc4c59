"""The training loop: regime step -> objective -> backward -> optimiser, with AMP, EMA, DDP,
validation-based model selection, early stopping, logs and exactly resumable checkpoints.

What a caller must do for reproducible runs: call :func:`seed_everything` with ``train.seed``
*before* building the model (its initial weights come from the global RNG), and pass loaders made
by :func:`make_loader` (or any loader whose sampler has ``set_epoch`` and whose shuffle depends only
on seed + epoch). The trainer re-seeds python/numpy/torch with ``train.seed + rank`` when built, and
restores every RNG state from the checkpoint on resume.

Outputs under ``out_dir``: ``last/`` (every epoch), ``best/`` (on improvement of ``train.select_on``),
and what ``train.loggers`` asks for: ``log.csv`` (one row per epoch), ``tensorboard/`` when TensorBoard
is installed, an MLflow run (``mlflow.json`` names it).

The loop is here; beside it: ``precision`` (AMP, torch.compile, determinism), ``reductions`` (DDP
means, sums and in-order gathers), ``run_log`` (log.csv, TensorBoard, MLflow) and ``run_state`` (what a
checkpoint holds for an exact resume, written and restored).
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Optimizer, Recipe, SelectOn
from ..errors import CxrlabError
from ..metrics import macro_auc
from ..progress import Progress
from .. import checkpoint as ckpt
from . import distributed as dist
from .distributed import make_loader  # noqa: F401  (re-exported: callers build loaders from here)
from .optim import build_optimizer, build_scheduler, model_parts
from . import run_log, run_state
from .precision import amp_dtype, autocast, compile_args, set_determinism
from .reductions import dist_mean, dist_sum, gather_in_order
from .run_log import public

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
        set_determinism(t.deterministic, self.device)
        self.amp_dtype = amp_dtype(t.amp, self.device)
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
            run_state.restore(self, previous)
            log.info("resumed from %s at epoch %d (step %d)", previous, self.epoch, self.step)
        elif resume:
            log.warning("nothing to resume in %s (no last/checkpoint.json): starting afresh", self.out_dir)
        loggers = run_log.open_loggers(self)
        failed = True
        try:
            while self.epoch < self.cfg.epochs and not self.best["stopped"]:
                self._run_epoch(train_loader, val_loader, loggers)
            failed = False
        finally:
            run_log.close_loggers(loggers, failed)
        dist.barrier()
        best_dir = self.out_dir / "best"
        if (best_dir / ckpt.INFO_FILE).is_file():
            run_state.load_weights(self, best_dir)
        best_row = next((r for r in self.history if r["epoch"] == self.best["epoch"]), None)
        stats = [{"epoch": r["epoch"], **{k: r[k] for k in r.get("_stat_keys", ())}} for r in self.history]
        return FitResult(checkpoint=best_dir, last_checkpoint=self.out_dir / "last", best=public(best_row),
                         best_epoch=self.best["epoch"], best_score=self.best["score"],
                         history=[public(r) for r in self.history], stopped_early=self.best["stopped"],
                         epoch_stats=[s for s in stats if len(s) > 1], log=self.out_dir / "log.csv")

    def _run_epoch(self, train_loader, val_loader, loggers) -> None:
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
        run_state.save(self, improved)
        if self.dist.is_main:
            for logger in loggers:
                logger.epoch(self, row)
            log.info("epoch %d/%d  %s", row["epoch"], self.cfg.epochs,
                     "  ".join(f"{k} {v:.4g}" for k, v in public(row).items()
                               if isinstance(v, float) and k != "epoch"))

    def train_epoch(self, loader, epoch: int = 0) -> dict:
        """One pass over ``loader``; mean of every logged term, last lr, images per second."""
        if self.scheduler is None:
            self.prepare(len(loader))
        self.step_module.train()
        sums: dict[str, float] = defaultdict(float)
        steps = images = 0
        lr = self.optimizer.param_groups[0]["lr"]
        # a bar on a terminal, a line every $CXRLAB_PROGRESS_EVERY seconds elsewhere (logs, batch jobs)
        bar = Progress(len(loader), f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", enabled=self.dist.is_main)
        start = time.perf_counter()
        for batch in loader:
            batch = self._to_device(batch)
            with autocast(self.device, self.amp_dtype):
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
            bar.update(1, **{"loss": sums["loss"] / steps, "img/s": round(images / (time.perf_counter() - start))})
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
        logits, target, mask = self._outputs(loader, "validate")
        loss = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        val_loss = float((loss * mask).sum() / mask.sum().clamp_min(1.0))
        auc = macro_auc(torch.sigmoid(logits).numpy(), target.numpy(), mask.numpy())
        return {"val_loss": val_loss, "val_macro_auc": float(auc)}

    def predict(self, loader, desc: str = "predict") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probs, targets, masks)`` as float32 numpy N×L, from the evaluated (EMA if kept) weights.

        Under DDP every rank returns the whole set in dataset order, each sample once (the
        DistributedSampler's padding repeats are dropped)."""
        logits, target, mask = self._outputs(loader, desc)
        return (torch.sigmoid(logits).numpy().astype(np.float32), target.numpy().astype(np.float32),
                mask.numpy().astype(np.float32))

    @torch.no_grad()
    def _outputs(self, loader, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.eval_model
        was_training = net.training
        net.eval()
        logits, targets, masks = [], [], []
        with Progress(len(loader), desc, unit="batch", enabled=self.dist.is_main) as bar:
            for batch in loader:
                batch = self._to_device(batch)
                with autocast(self.device, self.amp_dtype):
                    out = net(batch["image"])
                logits.append(out.logits.float())
                targets.append(batch["target"].float())
                masks.append(batch["mask"].float())
                bar.update(1)
        net.train(was_training)
        n_labels = len(self.label_names)
        parts = [torch.cat(x) if x else torch.zeros(0, n_labels, device=self.device) for x in (logits, targets, masks)]
        if self.dist.distributed:
            parts = gather_in_order(parts, loader)
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
