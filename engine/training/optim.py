"""Optimiser and learning-rate scheduler from a stage's ``[train]`` settings."""

from __future__ import annotations

import torch

from ..settings import TrainSection


def make_optimizer(parameters, train: TrainSection) -> torch.optim.Optimizer:
    opt = train.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(parameters, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov and opt.momentum > 0)
    if opt.name == "adam":
        return torch.optim.Adam(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(parameters, lr=opt.lr, weight_decay=opt.weight_decay)


def make_scheduler(optimizer, train: TrainSection):
    sched = train.scheduler
    if sched.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs, eta_min=sched.min_lr)
    if sched.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched.step_size, gamma=sched.gamma)
    if sched.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sched.milestones, gamma=sched.gamma)
    if sched.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=sched.factor, patience=sched.patience, min_lr=sched.min_lr)
    return None


def step_scheduler(scheduler, val_acc: float) -> None:
    """Advance the schedule by one epoch (a plateau schedule watches ``val_acc``)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_acc)
    elif scheduler is not None:
        scheduler.step()
