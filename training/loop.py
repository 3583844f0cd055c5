"""train(config) -> run folder: the contrastive training loop, from scratch or from pretrained weights.

Follows open_clip_train (main.py/train.py): AdamW with a warm-up + cosine schedule, gradient accumulation that caches
features so every micro-batch's loss sees the whole accumulated batch, logit-scale clamping, tower locking, DDP with
features gathered across ranks. Adds: exact resume (RNG and data position), evaluation through `clipsearch eval`'s
code, WiSE-FT, and an export that clipsearch and open_clip load directly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsearch.errors import ConfigError
from clipsearch.training import checkpoints as ckpt
from clipsearch.training.config import TrainConfig, config_to_dict, save_config
from clipsearch.training.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, init_distributed,
                                             shutdown_distributed)
from clipsearch.training.evaluation import EvalRunner, holdout_eval_sets
from clipsearch.training.logs import RunLogger
from clipsearch.training.losses import ContrastiveLoss, clamp_logit_scale_
from clipsearch.training.model_setup import build_model, precision_plan
from clipsearch.training.optim import build_optimizer, build_scheduler, lock_towers

log = logging.getLogger(__name__)

__all__ = ["train"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _new_run_dir(config: TrainConfig) -> Path:
    output = Path(config.output)
    if config.name:
        return output / config.name
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.replace('/', '-').replace(':', '-')}"
    run_dir, n = output / stem, 1
    while run_dir.exists():
        n += 1
        run_dir = output / f"{stem}-{n}"
    return run_dir


def _gather_rng(dist_info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (on every rank)."""
    state = ckpt.capture_rng()
    if not dist_info.distributed:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next micro-batch of `epoch`
    samples: int = 0
    train_seconds: float = 0.0
    last_loss: float = float("nan")
    last_checkpoint: int = -1
    evals: dict[str, dict[str, float]] = field(default_factory=dict)


class _Trainer:
    """One run's moving parts; `run()` trains, evaluates, checkpoints and exports."""

    def __init__(self, config: TrainConfig, dist_info: DistInfo):
        self.config = config
        self.dist = dist_info
        self.device = torch.device(dist_info.device)
        self.state = _State()
        self.resume_from = None
        if config.resume:
            self.resume_from = ckpt.find_checkpoint(config.resume, config.output) if dist_info.is_main else None
            self.resume_from = broadcast_object(self.resume_from)
        run_dir = ckpt.run_dir_of(self.resume_from) if self.resume_from else _new_run_dir(config)
        self.run_dir = Path(broadcast_object(str(run_dir)))

        seed_everything(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        built = build_model(config, self.device)
        self.model, self.preprocess_train, self.preprocess_val, self.tokenizer = built
        # the starting weights, for WiSE-FT (kept on the CPU so they cost no accelerator memory)
        self.original = ({k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                         if config.wise_ft_alpha is not None or config.wise_ft_sweep else None)
        lock_towers(self.model, lock_image=config.lock_image, image_unlocked_groups=config.lock_image_unlocked_groups,
                    freeze_bn_stats=config.lock_image_freeze_bn_stats, lock_text=config.lock_text,
                    text_unlocked_layers=config.lock_text_unlocked_layers,
                    freeze_layer_norm=config.lock_text_freeze_layer_norm)
        if config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        seed_everything(config.seed + dist_info.rank)  # per-rank streams from here on, as open_clip_train does

        self._open_data()
        self.optimizer = build_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay,
                                         betas=(config.beta1, config.beta2), eps=config.eps)
        self.scheduler = build_scheduler(self.optimizer, warmup=config.warmup, total_steps=self.total_steps,
                                         schedule=config.schedule)
        self.autocast_dtype, use_scaler = precision_plan(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.loss_fn = ContrastiveLoss(config.loss, local_loss=True, gather_with_grad=True, rank=dist_info.rank,
                                       world_size=dist_info.world_size)
        if self.resume_from:
            self._restore(ckpt.load_checkpoint(self.resume_from))
        self.ddp = self.model
        if dist_info.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # --- setup ---------------------------------------------------------------------------------------------------
    def _open_data(self) -> None:
        from clipsearch.training.data import open_train_data

        config = self.config
        if config.data is None:
            raise ConfigError("no training data given", "set data.path (CSV/TSV, image folder or WebDataset shards), "
                              "e.g. --data train.csv or --set data.path=shards/train-{0000..0004}.tar.gz")
        data = open_train_data(config.data, preprocess=self.preprocess_train, tokenizer=self.tokenizer)
        self.heldout = None
        if config.holdout:
            holdout = int(config.holdout) if config.holdout >= 1 else config.holdout
            data, self.heldout = data.split(holdout, config.seed)
        self.data = data
        batches = data.batches_per_epoch(config.batch_size)
        self.steps_per_epoch = batches // config.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training data has {data.num_samples} samples: not enough for one step of "
                f"{config.batch_size} x {config.accum_steps} samples",
                "lower batch_size or accum_steps, or give more data")
        self.total_steps = config.steps or self.steps_per_epoch * config.epochs
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"batch_size {config.batch_size} does not split evenly over {self.dist.world_size} ranks",
                              "make the global batch_size a multiple of the number of processes")
        log.info("training data: %d samples, %d steps per epoch of %d samples, %d steps in all", data.num_samples,
                 self.steps_per_epoch, config.total_batch, self.total_steps)

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        saved = checkpoint.config
        for key in ("model", "batch_size", "accum_steps", "loss"):
            if key in saved and saved[key] != getattr(self.config, key):
                log.warning("resuming with %s=%r but the checkpoint was trained with %r", key,
                            getattr(self.config, key), saved[key])
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        if self.scaler is not None and checkpoint.scaler:
            self.scaler.load_state_dict(checkpoint.scaler)
        if len(checkpoint.rng) == self.dist.world_size:
            ckpt.restore_rng(checkpoint.rng[self.dist.rank])
        else:
            log.warning("checkpoint has RNG states for %d ranks, this run has %d: random streams start afresh",
                        len(checkpoint.rng), self.dist.world_size)
        extra = checkpoint.extra
        self.state = _State(step=checkpoint.step, epoch=checkpoint.epoch, batch=checkpoint.batch,
                            samples=extra.get("samples", 0), train_seconds=extra.get("train_seconds", 0.0),
                            last_checkpoint=checkpoint.step)
        log.info("resuming %s at step %d (epoch %d, batch %d)", checkpoint.path, checkpoint.step, checkpoint.epoch,
                 checkpoint.batch)

    # --- one optimiser step --------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _features(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._autocast():
            out = self.ddp(images, texts)
        # the loss runs in fp32 whatever the autocast dtype: bf16 logits would round the softmax's inputs
        return {k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
        """Forward/backward over the micro-batches and one optimiser step: (loss, grad norm, logit scale)."""
        self.model.train()
        if len(micro_batches) == 1:
            out = self._features(*micro_batches[0])
            loss = self._loss(out)
            self._backward(loss)
        else:
            # open_clip's scheme: cache every micro-batch's features without gradients, then redo each forward with
            # gradients and the cached features of the others as negatives; the summed gradients are those of the
            # loss over the whole accumulated batch.
            with torch.no_grad():
                cached = [self._features(images, texts) for images, texts in micro_batches]
            for j, (images, texts) in enumerate(micro_batches):
                last = j == len(micro_batches) - 1
                sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
                with sync:
                    out = self._features(images, texts)
                    joined = dict(out)
                    if not last:
                        # the temperature (and SigLIP bias) enter every pass's loss in full: let only one pass carry
                        # their gradient, or it is counted accum_steps times (open_clip_train over-counts it so)
                        for key in ("logit_scale", "logit_bias"):
                            if key in joined:
                                joined[key] = joined[key].detach()
                    for key in ("image_features", "text_features"):
                        joined[key] = torch.cat([c[key] for c in cached[:j]] + [out[key]] + [c[key] for c in cached[j + 1:]])
                    loss = self._loss(joined)
                    self._backward(loss)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        clamp_logit_scale_(self.model)  # ln(100), as the CLIP paper
        return float(loss.detach()), grad_norm, float(out["logit_scale"].detach())

    # --- the run -------------------------------------------------------------------------------------------------
    def _checkpoint(self, rng: list[dict[str, Any]] | None = None) -> None:
        state = self.state
        rng = rng or _gather_rng(self.dist)
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir, step=state.step, epoch=state.epoch, batch=state.batch, model=self.model,
                                 optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, rng=rng,
                                 config=config_to_dict(self.config), keep_last=self.config.keep_last,
                                 extra={"samples": state.samples, "train_seconds": state.train_seconds})
        state.last_checkpoint = state.step
        barrier()

    def _evaluate(self, runner: EvalRunner | None) -> None:
        if runner is not None and self.dist.is_main:
            self.state.evals = runner.evaluate(self.model, step=self.state.step)
        barrier()

    def _micro_batches(self):
        """(epoch, micro-batch index, images, texts) from the saved data position on, epoch after epoch."""
        config, state = self.config, self.state
        epoch, start = state.epoch, state.batch
        while True:
            loader = self.data.loader(config.batch_size, epoch=epoch, seed=config.seed, start_batch=start,
                                      rank=self.dist.rank, world_size=self.dist.world_size, workers=config.workers)
            produced = 0
            with contextlib.closing(loader) if hasattr(loader, "close") else contextlib.nullcontext():
                for index, (images, texts) in enumerate(loader, start):
                    if index >= self.steps_per_epoch * config.accum_steps:
                        break  # a partial accumulation group at the epoch's end is dropped, as open_clip does
                    produced += 1
                    yield epoch, index, images, texts
            if not produced:
                raise RuntimeError(f"the training data produced no batch for epoch {epoch} from batch {start}")
            epoch, start = epoch + 1, 0

    def run(self) -> Path:
        config, state, main = self.config, self.state, self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir)
        barrier()
        runner = EvalRunner(config, self.preprocess_val, self.tokenizer, self.device,
                            holdout_eval_sets(self.heldout, self.run_dir), self.autocast_dtype) if main else None
        if runner is not None and not runner.sets:
            runner = None
        logger = RunLogger(self.run_dir, total_steps=self.total_steps, start_step=state.step, enabled=main,
                           progress=config.progress, tensorboard=config.tensorboard, resumed=self.resume_from is not None)
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        rng_after_step = None
        started = time.perf_counter()
        batches = self._micro_batches()
        try:
            while state.step < self.total_steps:
                epoch, index, images, texts = next(batches)
                group.append((images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True)))
                if len(group) < config.accum_steps:
                    continue
                lr = self.optimizer.param_groups[0]["lr"]
                loss, grad_norm, scale = self._step(group)
                group = []
                elapsed = time.perf_counter() - started
                state.train_seconds += elapsed
                state.step += 1
                state.samples += config.total_batch
                state.epoch, state.batch = divmod(index + 1, self.steps_per_epoch * config.accum_steps)
                state.epoch += epoch
                state.last_loss = all_reduce_mean(loss)  # with local loss each rank holds its rows' share
                if not self.dist.distributed:  # what an interrupted run saves (the next batch may have drawn since)
                    rng_after_step = [ckpt.capture_rng()]
                logger.step({"step": state.step, "epoch": epoch, "batch": index + 1, "loss": state.last_loss,
                             "lr": lr, "logit_scale": scale, "temperature": 1.0 / scale, "grad_norm": grad_norm,
                             "samples_per_s": config.total_batch / max(elapsed, 1e-9), "elapsed_s": state.train_seconds},
                            write=state.step % config.log_every == 0 or state.step == self.total_steps)
                if config.eval_every and state.step % config.eval_every == 0 and state.step < self.total_steps:
                    self._evaluate_logged(runner, logger)
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    self._checkpoint()
                started = time.perf_counter()
        except KeyboardInterrupt:
            if not self.dist.distributed and state.step > max(state.last_checkpoint, 0):
                logger.message(f"interrupted: saving a checkpoint at step {state.step} to resume from")
                self._checkpoint(rng_after_step)
            logger.close(plot=False)
            raise
        finally:
            batches.close()
            self.data.close()  # stops persistent DataLoader workers now rather than at garbage collection
        if state.last_checkpoint != state.step:
            self._checkpoint()
        self._evaluate_logged(runner, logger)
        summary = self._finish(runner, logger)
        logger.close()
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        barrier()
        return self.run_dir

    def _evaluate_logged(self, runner: EvalRunner | None, logger: RunLogger) -> None:
        self._evaluate(runner)
        for name, metrics in self.state.evals.items():
            logger.eval(self.state.step, name, metrics)

    def _finish(self, runner: EvalRunner | None, logger: RunLogger) -> dict[str, Any]:
        """WiSE-FT sweep and export (rank 0); the run's summary."""
        config, state = self.config, self.state
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir), "model": config.model, "pretrained": config.pretrained,
            "steps": state.step, "samples": state.samples, "train_seconds": round(state.train_seconds, 3),
            "samples_per_s": round(state.samples / state.train_seconds, 2) if state.train_seconds else None,
            "final_loss": state.last_loss, "eval": state.evals, "world_size": self.dist.world_size,
            "data_failures": self.data.failures, "data_failure_examples": self.data.failure_examples,
        }
        if self.data.failures:
            logger.message(f"{self.data.failures} training samples could not be loaded and were replaced by the next "
                           f"ones, e.g. {self.data.failure_examples[0]}")
        if not self.dist.is_main:
            return summary
        from clipsearch.training.wise_ft import interpolate_weights, wise_ft_sweep

        if config.wise_ft_sweep:
            if runner is None:
                logger.message("WiSE-FT sweep skipped: no eval sets (set holdout or eval_sets)")
            else:
                rows = wise_ft_sweep(self.original, self.model, config.wise_ft_sweep,
                                     lambda model: _flat(runner.evaluate(model, step=None)))
                (self.run_dir / "wise_ft.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
                summary["wise_ft_sweep"] = rows
                for row in rows:
                    logger.message("WiSE-FT " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        final = self.model
        if config.wise_ft_alpha is not None:
            final = copy.deepcopy(self.model)
            final.load_state_dict(interpolate_weights(self.original, self.model.state_dict(), config.wise_ft_alpha))
            summary["wise_ft_alpha"] = config.wise_ft_alpha
        if config.export:
            from clipsearch.training.export import export_open_clip_folder

            export = export_open_clip_folder(final, config.model, self.run_dir / "export", tokenizer=self.tokenizer,
                                             info={"pretrained": config.pretrained, "steps": state.step,
                                                   "wise_ft_alpha": config.wise_ft_alpha})
            summary["export"] = str(export)
            logger.message(f"exported to {export} (load with --pretrained local-dir:{export})")
        return summary


def _flat(evals: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{name}/{metric}": value for name, metrics in evals.items() for metric, value in metrics.items()}


def train(config: TrainConfig) -> Path:
    """Train (or adapt) a CLIP model as `config` says; returns the run folder (exported model in RUN/export)."""
    import torch.distributed as dist

    config = config.resolved()
    owns_group = not (dist.is_available() and dist.is_initialized())
    dist_info = init_distributed(config.device)
    try:
        return _Trainer(config, dist_info).run()
    finally:
        if owns_group:
            shutdown_distributed()
