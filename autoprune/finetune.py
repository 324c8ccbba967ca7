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


def train(model: nn.Module, loader: Any, steps: int, lr: float, optimizer: str = "sgd",
          momentum: float = 0.9, weight_decay: float = 5e-4, label_smoothing: float = 0.0,
          device: torch.device | str = "cpu", log_every: int = 10) -> TrainLog:
    """Train for ``steps`` batches with a cosine learning-rate decay.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    log = TrainLog()
    if steps <= 0:
        return log
    model.to(device).train()
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for batch in _batches(loader, steps):
        x, y = batch[0].to(device), batch[1].to(device)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step "
                                     f"{log.steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.steps += 1
        if log.steps % log_every == 0 or log.steps == steps:
            log.losses.append((log.steps, float(loss.detach())))
    model.eval()
    return log


def steps_for(epochs: float, steps: int | None, loader: Any) -> int:
    """Steps from an explicit count or a (possibly fractional) number of epochs."""
    if steps is not None:
        return steps
    return max(0, int(round(epochs * len(loader))))


def train_base(model: nn.Module, loader: Any, cfg: TrainConfig,
               device: torch.device | str = "cpu") -> TrainLog:
    return train(model, loader, steps_for(cfg.epochs, None, loader), cfg.lr, cfg.optimizer,
                 cfg.momentum, cfg.weight_decay, cfg.label_smoothing, device, log_every=50)


def finetune(model: nn.Module, loader: Any, cfg: FinetuneConfig,
             device: torch.device | str = "cpu", steps: int | None = None) -> TrainLog:
    """Brief recovery training of a pruned model (``steps`` overrides the config's budget)."""
    n = steps if steps is not None else steps_for(cfg.epochs, cfg.steps, loader)
    return train(model, loader, n, cfg.lr, cfg.optimizer, cfg.momentum, cfg.weight_decay,
                 device=device, log_every=cfg.log_every)


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
    used = 0
    for batch in _batches(loader, batches):
        model(batch[0].to(device))
        used += 1
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.eval()
    return used
