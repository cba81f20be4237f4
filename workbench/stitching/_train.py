"""The training and evaluation loop shared by stitching and the insertion test.

Both train a few parameters on top of cached crossing values (the frozen head runs once), so a
step is one tail forward and backward on a minibatch of cached tensors.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import InvalidOptionError, OutOfRangeError
from .._progress import ProgressLike, progress_bar


def as_xy(data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` from a ConceptDataset or an ``(x, y)`` pair; labels must be class indices ``[N]``."""
    if hasattr(data, "inputs") and hasattr(data, "labels"):
        x, y = data.inputs, data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise InvalidOptionError(f"{name} must be a ConceptDataset (wb.data.shapes(...)) or an (inputs, labels) pair; "
                                 f"got {type(data).__name__}.")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or y is None:
        raise InvalidOptionError(f"{name}: inputs and labels must be tensors.")
    if y.ndim != 1 or y.dtype not in (torch.int64, torch.int32) or len(y) != len(x):
        raise InvalidOptionError(f"{name}: labels must be class indices of shape [N] = [{len(x)}] (a classifier's task); "
                                 f"got {str(y.dtype).replace('torch.', '')}{list(y.shape)}.")
    if len(x) == 0:
        raise InvalidOptionError(f"{name} is empty.")
    return x, y.long()


class Splits(NamedTuple):
    """The training, evaluation and validation examples of a stitch or an insertion test, checked together."""

    x: torch.Tensor
    y: torch.Tensor
    xe: torch.Tensor  # eval_data's inputs, or data's where none was given
    ye: torch.Tensor
    val: Optional[tuple[torch.Tensor, torch.Tensor]]
    labelled: list  # (name, labels) of every set given, for check_labels


def splits(data, eval_data=None, val_data=None, report: str = "last") -> Splits:
    """``data``, ``eval_data`` and ``val_data`` read by :func:`as_xy`; the other two must be examples of the same
    shape and dtype as ``data`` (:func:`check_like`), and ``report="best"`` needs ``val_data`` to pick its epoch on."""
    if report == "best" and val_data is None:
        raise InvalidOptionError("report='best' picks the epoch with the best accuracy on val_data; pass val_data "
                                 "(held out from data and eval_data), or report='last'.")
    x, y = as_xy(data)
    xe, ye = (x, y) if eval_data is None else as_xy(eval_data, "eval_data")
    val = None if val_data is None else as_xy(val_data, "val_data")
    labelled = [("data", y)]
    for name, given in (("eval_data", None if eval_data is None else (xe, ye)), ("val_data", val)):
        if given is not None:
            check_like(x, given[0], name)
            labelled.append((name, given[1]))
    return Splits(x, y, xe, ye, val, labelled)


def check_like(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """``other`` (eval or validation inputs) must be examples of the same shape and dtype as the training inputs."""
    if other.shape[1:] != x.shape[1:] or other.dtype != x.dtype:
        raise InvalidOptionError(f"{name}: its inputs are {str(other.dtype).replace('torch.', '')}{list(other.shape[1:])} "
                                 f"per example, but data's are {str(x.dtype).replace('torch.', '')}{list(x.shape[1:])}; "
                                 f"pass examples of one kind.")


@torch.no_grad()
def check_labels(model: nn.Module, x: torch.Tensor, *labels: tuple[str, torch.Tensor]) -> None:
    """Every label must name one of the model's outputs: a label ≥ the number of classes (or < 0) is never
    the argmax, so an accuracy would quietly count it wrong and the training loss would fail inside torch."""
    from ..models import eval_mode

    with eval_mode(model):
        out = model(x[:1])
    if not (isinstance(out, torch.Tensor) and out.ndim == 2):
        raise InvalidOptionError(f"{type(model).__name__} must return class scores [N, classes] (accuracy is their "
                                 f"argmax); it returns {type(out).__name__}{list(out.shape) if isinstance(out, torch.Tensor) else ''}.")
    n = out.shape[1]
    for name, y in labels:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n:
            raise OutOfRangeError(f"{name}: labels must be class indices in [0, {n}) for {type(model).__name__}'s {n} "
                                  f"outputs; they run from {lo} to {hi}.")


def check_batch(batch_size, lr) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be a whole number ≥ 1; got {batch_size!r}.")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0 and lr == lr):
        raise InvalidOptionError(f"lr must be a number ≥ 0; got {lr!r}.")


def check_epochs(epochs) -> int:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise InvalidOptionError(f"epochs must be a whole number ≥ 0; got {epochs!r}.")
    return epochs


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, batch_size: int = 256) -> float:
    """Percent of examples whose argmax of ``forward(indices)`` is the label."""
    correct = 0
    for i in range(0, len(labels), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(labels)))
        correct += int((forward(idx).argmax(1) == labels[idx]).sum())
    return 100.0 * correct / len(labels)


def model_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Percent accuracy of ``model`` in eval mode (its own mode is restored)."""
    from ..models import eval_mode

    with eval_mode(model):
        return accuracy(lambda idx: model(x[idx]), y, batch_size)


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` in batches of ``batch_size``; a last batch of one example joins the one before it: a BatchNorm
    on batch statistics cannot normalise a single value per channel (129 examples in batches of 128 failed)."""
    parts = list(order.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


OPTIMIZERS = ["adam", "sgd"]
LR_SCHEDULES = [None, "step"]


def fit(forward: Callable[[torch.Tensor], torch.Tensor], params: Sequence, labels: torch.Tensor,
        epochs: int, *, lr: float, batch_size: int, gen: torch.Generator,
        regulariser: Optional[Callable[[], torch.Tensor]] = None, on_epoch: Optional[Callable[[int], None]] = None,
        after_step: Optional[Callable[[], None]] = None, after_epoch: Optional[Callable[[int], dict]] = None,
        optimizer: str = "adam", weight_decay: float = 0.0, lr_schedule: Optional[str] = None,
        desc: str = "training", progress: ProgressLike = None) -> list[dict]:
    """Minimise cross-entropy of ``forward(indices)`` over ``params``; return the per-epoch curve.

    ``params``: parameters, or torch parameter groups (dicts) for per-group weight decay.
    ``optimizer``: "adam" or "sgd" (plain, no momentum: the paper's stitching code). ``lr_schedule``:
    None, or "step" (halve the rate every ``max(1, epochs // 4)`` epochs, as the paper's training loop).
    ``on_epoch(e)`` runs before epoch ``e`` (a schedule: e.g. unfreeze scales half-way);
    ``after_step()`` after every optimiser step (a projection back onto a constraint set);
    ``after_epoch(e)`` after epoch ``e``, its dict is merged into that epoch's curve entry (an evaluation).
    ``progress``: a bar over the epochs (True, False, or None for one in a Jupyter notebook only); none for one epoch.
    """
    params = list(params)
    opt = None
    if params:
        kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        opt = kind(params, lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 4), gamma=0.5)
             if opt is not None and lr_schedule == "step" else None)
    curve = []
    for epoch in progress_bar(range(epochs), desc=desc, leave=False, progress=progress if epochs >= 2 else False):
        if on_epoch is not None:
            on_epoch(epoch)
        total, correct = 0.0, 0
        for idx in batches(torch.randperm(len(labels), generator=gen), batch_size):
            logits = forward(idx)
            loss = F.cross_entropy(logits, labels[idx])
            objective = loss if regulariser is None else loss + regulariser()
            if opt is not None:
                opt.zero_grad()
                objective.backward()
                opt.step()
                if after_step is not None:
                    after_step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
        if sched is not None:
            sched.step()
        entry = {"epoch": epoch + 1, "loss": total / len(labels), "train_accuracy": 100.0 * correct / len(labels)}
        if after_epoch is not None:
            entry.update(after_epoch(epoch + 1))
        curve.append(entry)
    return curve
