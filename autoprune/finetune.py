"""Training loops: base-model training, brief recovery fine-tuning and adaptive BatchNorm.

Adaptive BN (EagleEye, Li et al. 2020) re-estimates BatchNorm running statistics of a pruned
candidate on a few training batches; the accuracy after it is a cheap proxy of the accuracy after
fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune.config import FinetuneConfig, TrainConfig
from autoprune.measure import IGNORE_INDEX, check_inputs, check_labels


@dataclass
class TrainLog:
    """Loss by optimisation step (every ``log_every`` steps) and the steps taken."""

    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def _optimizer(model: nn.Module, name: str, lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _batches(loader: Iterable[Any], total_steps: int) -> Iterable[Any]:
    """Cycle through ``loader`` until ``total_steps`` batches were yielded."""
    step = 0
    while step < total_steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            step += 1
            if step >= total_steps:
                return
        if empty:
            raise ValueError("the training loader yielded no batches")


class Trainer:
    """Cosine-decayed training over ``total_steps``, run in segments (``advance``), so a trial
    can be judged part-way through its budget and continue where it stopped.

    Args:
        teacher: a model to distil from (``alpha`` weight, temperature ``temperature``).

    Raises (from ``advance``):
        FloatingPointError: the loss became NaN or infinite.
    """

    def __init__(self, model: nn.Module, loader: Any, total_steps: int, lr: float,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                 label_smoothing: float = 0.0, device: torch.device | str = "cpu",
                 log_every: int = 10, teacher: nn.Module | None = None, alpha: float = 0.0,
                 temperature: float = 4.0, ignore_index: int | None = None) -> None:
        self.model, self.loader, self.total, self.device = model, loader, total_steps, device
        self.log_every = log_every
        self.log = TrainLog()
        self.opt = _optimizer(model, optimizer, lr, momentum, weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                    / max(total_steps, 1))))
        self.ignore_index = IGNORE_INDEX if ignore_index is None else ignore_index
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing,
                                           ignore_index=self.ignore_index)
        self.teacher = teacher.to(device).eval() if teacher is not None and alpha > 0 else None
        self.alpha, self.temperature = alpha, temperature
        self._batches = iter(_batches(loader, total_steps)) if total_steps > 0 else iter(())

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_inputs(x, "training")
        out = self.model(x)
        check_labels(out, y, self.ignore_index, "training")
        loss = self.loss_fn(out, y)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            soft = nn.functional.softmax(self.teacher(x) / self.temperature, dim=1)
        # per prediction: dense (N, K, H, W) logits hold N x H x W of them, and "batchmean"
        # alone would sum the KL over the pixels (80 against a cross-entropy of 1.2 at 32x32)
        per = out[0, 0].numel()
        kd = nn.functional.kl_div(nn.functional.log_softmax(out / self.temperature, dim=1),
                                  soft, reduction="batchmean") * self.temperature ** 2 / per
        return (1 - self.alpha) * loss + self.alpha * kd

    def advance(self, to_step: int) -> TrainLog:
        """Train until ``to_step`` steps in all (capped at the total); returns the log so far."""
        to_step = min(to_step, self.total)
        if self.log.steps >= to_step:
            return self.log
        self.model.to(self.device).train()
        while self.log.steps < to_step:
            batch = next(self._batches)
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            loss = self._loss(x, class_ids(y))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at step "
                                         f"{self.log.steps}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.log.steps += 1
            if self.log.steps % self.log_every == 0 or self.log.steps == self.total:
                self.log.losses.append((self.log.steps, float(loss.detach())))
        self.model.eval()
        return self.log


def class_ids(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels as cross-entropy takes them: int64 (int32, int16 and uint8 masks are
    not taken for dense logits)."""
    return labels if labels.is_floating_point() or labels.dtype == torch.long else labels.long()


def class_loss(ignore_index: int | None = None) -> Any:
    """The cross-entropy the fine-tune uses, for gradient importance (``taylor``): the same
    label conversion and the same ``data.ignore_index``."""
    ignore = IGNORE_INDEX if ignore_index is None else ignore_index

    def loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, class_ids(labels), ignore_index=ignore)
    return loss


def train(model: nn.Module, loader: Any, steps: int, lr: float, optimizer: str = "sgd",
          momentum: float = 0.9, weight_decay: float = 5e-4, label_smoothing: float = 0.0,
          device: torch.device | str = "cpu", log_every: int = 10,
          ignore_index: int | None = None) -> TrainLog:
    """Train for ``steps`` batches with a cosine learning-rate decay."""
    return Trainer(model, loader, steps, lr, optimizer, momentum, weight_decay, label_smoothing,
                   device, log_every, ignore_index=ignore_index).advance(steps)


def steps_for(epochs: float, steps: int | None, loader: Any) -> int:
    """Steps from an explicit count or a (possibly fractional) number of epochs: at least one
    for any epochs above 0 (0.02 epochs of 23 batches had rounded to no fine-tune at all)."""
    if steps is not None:
        return steps
    return max(1 if epochs > 0 else 0, int(round(epochs * len(loader))))


def train_base(model: nn.Module, loader: Any, cfg: TrainConfig,
               device: torch.device | str = "cpu", ignore_index: int | None = None) -> TrainLog:
    return train(model, loader, steps_for(cfg.epochs, None, loader), cfg.lr, cfg.optimizer,
                 cfg.momentum, cfg.weight_decay, cfg.label_smoothing, device, log_every=50,
                 ignore_index=ignore_index)


def finetuner(model: nn.Module, loader: Any, cfg: FinetuneConfig,
              device: torch.device | str = "cpu", steps: int | None = None,
              teacher: nn.Module | None = None, ignore_index: int | None = None) -> Trainer:
    """A :class:`Trainer` for the brief recovery fine-tune (``steps`` overrides the budget)."""
    n = steps if steps is not None else steps_for(cfg.epochs, cfg.steps, loader)
    return Trainer(model, loader, n, cfg.lr, cfg.optimizer, cfg.momentum, cfg.weight_decay,
                   device=device, log_every=cfg.log_every, teacher=teacher,
                   alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
                   ignore_index=ignore_index)


def finetune(model: nn.Module, loader: Any, cfg: FinetuneConfig,
             device: torch.device | str = "cpu", steps: int | None = None,
             teacher: nn.Module | None = None) -> TrainLog:
    """Brief recovery training of a pruned model, in one go."""
    trainer = finetuner(model, loader, cfg, device, steps, teacher)
    return trainer.advance(trainer.total)


@torch.no_grad()
def adaptive_bn(model: nn.Module, loader: Any, batches: int,
                device: torch.device | str = "cpu") -> int:
    """Re-estimate BatchNorm running statistics on ``batches`` training batches.

    Returns the number of batches used (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.to(device).train()
    for bn in bns:  # a model whose train() keeps its BatchNorm frozen (in eval) kept the reset
        bn.train()  # statistics, mean 0 and variance 1, in every pruned copy
    used = 0
    with torch.no_grad():
        for batch in _batches(loader, batches):
            model(batch[0].to(device))
            used += 1
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    model.eval()
    return used
