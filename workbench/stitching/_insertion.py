"""``wb.stitching.insertion_test``: the paper's sanity test (§3.3).

Insert a fixed random element M of a group on a site's *pre-activation* (z ↦ Mz, right before the
nonlinearity), freeze everything up to it and retrain what follows. An intertwiner M (P·D₊ at a
ReLU) passes through the nonlinearity — σ(Mz) = φ(M)σ(z) — so the next layer can absorb it and
retraining recovers the accuracy; a rotation at a ReLU changes which information survives σ, and
costs accuracy that retraining cannot buy back. (Inserted *after* the nonlinearity, any invertible
M could be absorbed by the next layer, and the test would show nothing.)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .._errors import InvalidOptionError, check_option
from .._progress import ProgressLike, show_progress
from .._report import Report, new_axes
from ..groups import Group, GroupElement, get_group
from ._cut import Cut, site_label
from ._train import LR_SCHEDULES, OPTIMIZERS, accuracy, check_batch, check_epochs, check_labels, fit, model_accuracy, splits


@dataclass(repr=False)
class InsertionResult(Report):
    """Accuracy after inserting M and retraining, per repeat. Accuracies in percent, penalties in points.

    ``accuracy_control`` is the same retraining with M = I, so ``penalties[r] = accuracy_control −
    accuracies[r]`` measures what M costs, not what the retraining itself does. Without a control run
    (``control=False``) it is None and penalties are taken against the original network.
    """

    site: str
    group: str
    accuracy_original: float
    accuracy_control: Optional[float]
    accuracies: list[float]
    elements: list[GroupElement] = field(default_factory=list)
    epochs: int = 0
    seed: int = 0
    lr: float = 1e-3
    n_train: int = 0
    n_eval: int = 0
    best_epochs: list = field(default_factory=list)  # report="best": the epoch picked on val_data, per repeat
    curves: list = field(default_factory=list)  # per repeat: [{"epoch", "loss", "train_accuracy", ("val_accuracy")}]
    hook: str = ""  # the activation module M was inserted before (a site may be observed at several)

    @property
    def where(self) -> str:
        """The site, and the activation M went before where that is not the site's own name."""
        return site_label(self.site, self.hook, "before")

    @property
    def baseline(self) -> float:
        """What the penalties are measured against: the control, or the original network without one."""
        return self.accuracy_original if self.accuracy_control is None else self.accuracy_control

    @property
    def penalties(self) -> list[float]:
        return [self.baseline - a for a in self.accuracies]

    @property
    def penalty(self) -> float:
        return sum(self.penalties) / len(self.penalties)

    @property
    def penalty_std(self) -> float:
        return float(torch.tensor(self.penalties).std()) if len(self.penalties) > 1 else 0.0

    def summary(self) -> str:
        control = "no control" if self.accuracy_control is None else f"control {self.accuracy_control:.1f}%"
        return (f"{self.group} inserted at {self.where}: penalty {self.penalty:+.2f} ± {self.penalty_std:.2f} points "
                f"({len(self.accuracies)} repeats, {self.epochs} epochs retraining; {control}, "
                f"original {self.accuracy_original:.1f}%, seed {self.seed})")

    def to_frame(self):
        """One row per repeat."""
        import pandas as pd

        return pd.DataFrame([{"site": self.site, "hook": self.hook, "group": self.group, "repeat": r, "accuracy": a,
                              "accuracy_control": self.accuracy_control, "accuracy_original": self.accuracy_original,
                              "penalty": self.baseline - a, "epochs": self.epochs, "seed": self.seed}
                             for r, a in enumerate(self.accuracies)])

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        sns.stripplot(data=self.to_frame(), x="group", y="accuracy", ax=ax, size=8)
        if self.accuracy_control is not None:
            ax.axhline(self.accuracy_control, ls="--", color="k", label="control (M = I, retrained)")
        ax.axhline(self.accuracy_original, ls=":", color="grey", label="original")
        ax.set_ylabel("accuracy after retraining (%)")
        ax.set_title(f"insertion test at {self.where}")
        ax.legend(fontsize="small")
        return ax


def insertion_test(model: nn.Module, site: str, group: Union[str, Group] = "orthogonal", data=None, epochs: int = 3,
                   repeats: int = 3, seed: int = 0, *, eval_data=None, val_data=None, lr: float = 1e-3,
                   batch_size: int = 128, reinit: bool = True, control: bool = True, weight_decay: float = 0.0,
                   lr_schedule: Optional[str] = None, report: str = "last", optimizer: str = "adam",
                   progress: ProgressLike = None) -> InsertionResult:
    """Insert a fixed random element of ``group`` before ``site``'s nonlinearity, retrain what follows.

    The model is not modified (a deep copy is cut). Everything up to the pre-activation is frozen
    (and run once, in eval mode); the rest is re-initialised (``reset_parameters()``, seeded, the same
    for every run; ``reinit=False`` continues from the trained weights instead) and retrained with
    Adam (``optimizer="sgd"``: plain SGD) for ``epochs`` on ``data`` (in train mode: its BatchNorms update), once with M = I (the
    control; ``control=False`` skips it) and once per repeat with M drawn from ``group`` (seeded by
    ``seed``). Accuracies are measured on ``eval_data`` (default ``data``).

    The paper's protocol (§3.3 and its code): ``reinit=False``, Adam lr 1e-3 with ``weight_decay=1e-4``,
    ``lr_schedule="step"`` (halve every epochs/4), 50 epochs, the best epoch (``report="best"``:
    picked here on held-out ``val_data``, where the paper's code picked it on the test set).

    Args:
        site: a site of ``wb.symmetry_map(model)`` whose hook is an activation module.
        group: a registry name (``"relu"``, ``"orthogonal"``, ``"gl"``, …) or a Group on the site's channels.
        data: a ConceptDataset or ``(inputs [N, ...], labels [N])``.
        progress: a bar over each retraining's epochs: True, False, or None (the default) for one in a Jupyter
            notebook only.

    Example:
        >>> import torch, workbench as wb
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(64, 4); y = net(x).argmax(1)
        >>> r = wb.stitching.insertion_test(net, "1", "relu", (x, y), epochs=0, repeats=1, reinit=False)
        >>> r.accuracy_control  # M = I and no retraining: the network itself
        100.0
    """
    epochs = check_epochs(epochs)
    show_progress(progress)  # (a bad value is refused before anything runs)
    check_batch(batch_size, lr)
    if isinstance(group, str) and group.strip().lower() == "identity":
        # The registry's "identity" is the identity activation's group (GL: a random dense M), while a stitch's
        # "identity" is the identity map: here one reading would be as natural as the other.
        raise InvalidOptionError("group='identity' is ambiguous in an insertion test: 'gl' inserts a random invertible "
                                 "M (the identity activation's group); 'trivial' inserts M = I (what control=True runs).")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise InvalidOptionError(f"repeats must be a whole number ≥ 1; got {repeats!r}.")
    check_option("report", report, ["last", "best"])
    check_option("lr_schedule", lr_schedule, LR_SCHEDULES)
    check_option("optimizer", optimizer, OPTIMIZERS)
    if reinit and epochs == 0:
        raise InvalidOptionError("reinit=True with epochs=0 would evaluate an untrained network; retrain (epochs ≥ 1) "
                                 "or keep the trained weights (reinit=False).")
    x, y, xe, ye, val, labelled = splits(data, eval_data, val_data, report)
    cut = Cut(model, site, x[:1], "before")
    check_labels(cut.model, x, *labelled)
    k = cut.primary
    n = cut.crossings[k].channels
    G = get_group(group, n)
    gen = torch.Generator().manual_seed(int(seed))
    acts, eval_acts = cut.run_head(x), (None if eval_data is None else cut.run_head(xe))
    val_acts = None if val is None else cut.run_head(val[0])
    head_params = {name for name, _ in cut.head.named_parameters()}
    elements = G.sample_many(repeats, gen)

    def retrain(M) -> tuple[float, Optional[int], list]:
        # The caller's global generator is left as it was; inside, it is seeded, so the fresh weights and a
        # Dropout's masks are the same for every run (runs differ by M alone) and for every call with this seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 2)
            return _retrain(M)

    def _retrain(M) -> tuple[float, Optional[int], list]:
        tail = copy.deepcopy(cut.tail)
        if reinit:  # every run starts from the same fresh weights, so runs differ by M alone
            kept = []
            for m in tail.modules():
                own = [f"{_path(tail, m)}{n}" for n, _ in m.named_parameters(recurse=False)]
                if not own or any(n in head_params for n in own):
                    continue
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                else:
                    kept += own
            if kept:  # they would be retrained from their trained values while the rest starts fresh
                raise InvalidOptionError(
                    f"reinit=True cannot re-initialise {kept}: their modules have no reset_parameters(). Pass "
                    f"reinit=False (retrain from the trained weights, the paper's protocol) or give them one.")
        params = [p for name, p in tail.named_parameters() if name not in head_params]
        for p in params:
            p.requires_grad_(True)
        insert = lambda vs: [M.act(v, dim=1) if (i == k and M is not None) else v for i, v in enumerate(vs)]  # noqa: E731
        train_vals = insert(acts)  # M is fixed: transform the cached pre-activations once
        val_vals = None if val_acts is None else insert(val_acts)
        best = {"accuracy": -1.0, "epoch": None, "state": None}

        def after_epoch(epoch):
            if val_vals is None:
                return {}
            tail.eval()
            acc = accuracy(lambda idx: tail(*[v[idx] for v in val_vals]), val[1], batch_size * 2)
            tail.train()
            if acc > best["accuracy"]:
                best.update(accuracy=acc, epoch=epoch, state=copy.deepcopy(tail.state_dict()))
            return {"val_accuracy": acc}

        tail.train()
        curve = fit(lambda idx: tail(*[v[idx] for v in train_vals]), params, y, epochs, lr=lr, batch_size=batch_size,
                    gen=torch.Generator().manual_seed(int(seed) + 1), after_epoch=after_epoch,
                    weight_decay=weight_decay, lr_schedule=lr_schedule, optimizer=optimizer, desc=f"retrain after {site}",
                    progress=progress)
        tail.eval()
        if report == "best" and best["state"] is not None:
            tail.load_state_dict(best["state"])
        vals = train_vals if eval_acts is None else insert(eval_acts)
        return (accuracy(lambda idx: tail(*[v[idx] for v in vals]), ye, batch_size * 2),
                best["epoch"] if report == "best" else None, curve)

    if cut.crossings[k].block > 1:
        raise InvalidOptionError(f"site {site!r}: its pre-activation is flattened; insert on an unflattened one.")
    control_acc = retrain(None)[0] if control else None
    runs = [retrain(M) for M in elements]
    return InsertionResult(cut.site.name, G.name, model_accuracy(cut.model, xe, ye), control_acc, [r[0] for r in runs],
                           elements, epochs, int(seed), lr, len(y), len(ye), [r[1] for r in runs], [r[2] for r in runs],
                           hook=cut.at)


def _path(root: nn.Module, module: nn.Module) -> str:
    """``"a.b."``: the qualified prefix of ``module``'s own parameters inside ``root``."""
    for name, m in root.named_modules():
        if m is module:
            return f"{name}." if name else ""
    return ""
