"""``wb.stitching.stitch``: model A up to a site, a trainable stitching layer, model B after it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .._errors import InvalidOptionError, check_option
from .._progress import ProgressLike, show_progress
from .._report import Report, new_axes
from .._repr import tensor_summary
from ..groups import Group, GroupElement
from ._cut import Crossing, Cut, site_label
from ._init import fit as fit_init, rows, sample_rows
from ._layers import BirkhoffMap, IdentityMap, SinkhornMap, StitchLayer, make_layer, parse_stitch_group
from ._train import OPTIMIZERS, accuracy, batches, check_batch, check_epochs, check_labels, fit, model_accuracy, splits

BN_MODES = ["frozen", "reestimate", "train"]
REPORTS = ["last", "best"]
SKIP_MODES = ["mapped", "unmapped"]
INITS = ("identity", "random", "match", "uniform")
_LR = {"identity": 0.0, "linear": 1e-2, "orthogonal": 1e-2, "sinkhorn": 1e-2, "diagonal": 1e-2}


@dataclass(repr=False)
class StitchResult(Report):
    """A stitched network's accuracy against its endpoints. Accuracies in percent, penalty in points.

    ``penalty`` = mean(accuracy_a, accuracy_b) − stitched_accuracy. ``weight`` ``[C_b, C_a]`` is the
    learned map at the site (after rounding, for Sinkhorn relaxations), ``element`` the same map as a
    group element (None for maps that are not: low rank, non-square, singular). ``maps`` holds every crossing
    site's map (a cut inside a residual branch maps the skip stream too); ``crossings`` lists each
    value crossing the cut and the site that mapped it (None: passed from A unmapped).
    """

    site: str
    group: str  # the registry name of the stitching layer's group ("scaled_permutation", "trivial"), or "low_rank:k"
    accuracy_a: float
    accuracy_b: float
    stitched_accuracy: float
    relaxed_accuracy: Optional[float]  # Sinkhorn relaxation before rounding to a permutation
    element: Optional[GroupElement]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    maps: dict[str, torch.Tensor]
    crossings: list[Crossing]
    curve: list[dict] = field(default_factory=list)
    epochs: int = 0
    seed: int = 0
    bn: str = "frozen"
    n_train: int = 0
    n_eval: int = 0
    evaluated_on: str = "eval_data"
    report: str = "last"
    best_epoch: Optional[int] = None  # report="best": the epoch picked on val_data
    val_accuracy: Optional[float] = None
    skip: str = "mapped"
    hook: str = ""  # the activation module the cut follows

    @property
    def family(self) -> str:
        """Old spelling of ``group`` (kept: public before)."""
        return self.group

    @property
    def penalty(self) -> float:
        return (self.accuracy_a + self.accuracy_b) / 2 - self.stitched_accuracy

    def summary(self) -> str:
        relaxed = "" if self.relaxed_accuracy is None else f" (relaxed {self.relaxed_accuracy:.1f}%)"
        at = site_label(self.site, self.hook, "after")
        return (f"{self.group} stitch at {at}: {self.stitched_accuracy:.1f}%{relaxed} vs endpoints "
                f"{self.accuracy_a:.1f}% / {self.accuracy_b:.1f}% → penalty {self.penalty:+.2f} points "
                f"({self.epochs} epochs{'' if self.best_epoch is None else f', best epoch {self.best_epoch} on val_data'}, "
                f"seed {self.seed}, BatchNorm {self.bn}, {self.n_eval} {self.evaluated_on} examples)")

    def to_frame(self):
        """One row: the numbers and the settings that made them (concatenate rows across runs)."""
        import pandas as pd

        return pd.DataFrame([{"site": self.site, "hook": self.hook, "group": self.group, "accuracy_a": self.accuracy_a,
                              "accuracy_b": self.accuracy_b, "stitched_accuracy": self.stitched_accuracy,
                              "relaxed_accuracy": self.relaxed_accuracy, "penalty": self.penalty,
                              "epochs": self.epochs, "seed": self.seed, "bn": self.bn, "n_train": self.n_train,
                              "n_eval": self.n_eval, "report": self.report, "best_epoch": self.best_epoch,
                              "val_accuracy": self.val_accuracy, "skip": self.skip,
                              "crossing_sites": ", ".join(self.maps)}])

    def curve_frame(self):
        import pandas as pd

        cols = ["epoch", "loss", "train_accuracy"] + (["val_accuracy"] if any("val_accuracy" in c for c in self.curve) else [])
        return pd.DataFrame(self.curve, columns=cols)

    def _repr_html_(self) -> str:
        extra = f"<p>map at the site: <code>{tensor_summary(self.weight)}</code></p>"
        return super()._repr_html_() + extra

    def plot(self, ax=None):
        """Training accuracy per epoch, with the endpoints and the evaluated stitch as lines."""
        import seaborn as sns

        ax = new_axes(ax)
        if self.curve:
            sns.lineplot(data=self.curve_frame(), x="epoch", y="train_accuracy", marker="o", ax=ax, label="training")
        for value, name, style in [(self.accuracy_a, "model A", ":"), (self.accuracy_b, "model B", "--"),
                                   (self.stitched_accuracy, "stitched (evaluated)", "-")]:
            ax.axhline(value, ls=style, color="k" if name != "stitched (evaluated)" else "C3", label=name)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{self.group} stitch at {self.site}")
        ax.legend(fontsize="small")
        return ax


def stitch(model_a: nn.Module, model_b: nn.Module, site: Union[str, tuple[str, str]], group: Union[str, Group] = "relu",
           data=None, epochs: int = 5, seed: int = 0, *, eval_data=None, val_data=None, bn: str = "frozen",
           lr: Optional[float] = None, batch_size: int = 128, init=None, bias: Optional[bool] = None,
           optimizer: str = "adam", weight_decay: float = 0.0, l1: float = 0.0, sharpening: float = 0.1,
           report: str = "last", skip: str = "mapped", bn_examples: Optional[int] = None,
           progress: ProgressLike = None) -> StitchResult:
    """Train a stitching layer from model A's activation at ``site`` into model B; report the penalty.

    Both models stay frozen and unmodified (each is deep-copied). The cut is a position in the
    traced forward pass: *every* value crossing it comes from A — inside a residual branch that
    includes the skip stream, which gets its own stitching layer of the same group
    (``skip="mapped"``) or passes from A as it is (``skip="unmapped"``: the paper's ResNet protocol).

    Args:
        site: a site name of ``wb.symmetry_map(model)`` (the same in both), the hook name of one of a
            site's activation modules (a ResNet stage is one site observed after every block), or
            ``(site_a, site_b)``.
        group: ``"gl"`` (1×1 conv with bias), ``"low_rank:k"`` (rank k, with bias), ``"trivial"``
            (the identity map, no layer; also spelled ``"identity"`` here, as before), or any registry group: ``"relu"``/``"scaled_permutation"`` (a doubly-stochastic
            P times positive scales, rounded to an exact permutation by the Hungarian algorithm for
            evaluation; first half of the epochs P alone, then scales too), ``"permutation"``,
            ``"orthogonal"``, ``"signed_permutation"``, … or a Group object.
        data: training data, a ConceptDataset or ``(inputs [N, ...], labels [N])``; ``eval_data``
            the data the reported accuracies are measured on (default: ``data``); ``val_data`` held-out
            data that picks the epoch when ``report="best"``.
        bn: ``"frozen"`` keeps B's BatchNorm running statistics; ``"reestimate"`` recomputes those
            after the cut on the stitched activations of ``data`` (its first ``bn_examples``) before
            every evaluation; ``"train"`` also runs them on batch statistics while the stitch trains
            (the paper's code trained in train mode, then re-estimated the statistics for evaluation).
        init: None (the default for the group: identity for square gl and orthogonal, Gaussian for low
            rank, near-uniform Sinkhorn logits for permutation groups), ``"identity"``, ``"random"``,
            ``"match"`` (the group's closed-form fit of B's activation from A's on ``data``: least
            squares, reduced-rank regression, Procrustes, Hungarian matching; see ``_init.py``) or
            ``"uniform"`` (permutation groups: the paper's Birkhoff layer — P itself starts near the
            barycentre of the Birkhoff polytope and is trained by projected gradient).
        lr, optimizer, weight_decay: the step (default 1e-2), ``"adam"`` or ``"sgd"`` (no momentum),
            and weight decay (not applied to a Birkhoff P).
        l1: LASSO weight α for linear stitches (``"gl"``, ``"low_rank:k"``): α·Σ|W| is added to the loss.
        sharpening: the paper's −α‖P‖_F term of a permutation group's doubly-stochastic P (default 0.1), which
            pushes P towards a vertex; 0 turns it off.
        report: ``"last"`` (the map after the last epoch) or ``"best"`` (the epoch with the best
            accuracy on ``val_data``; recorded as ``best_epoch``).
        progress: a bar over the training epochs: True, False, or None (the default) for one in a Jupyter
            notebook only.

    Example:
        >>> import torch, workbench as wb
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(64, 4); y = net(x).argmax(1)
        >>> r = wb.stitching.stitch(net, net, "1", "trivial", (x, y), epochs=0)
        >>> r.stitched_accuracy, r.penalty
        (100.0, 0.0)
    """
    spec = parse_stitch_group(group)
    epochs = check_epochs(epochs)
    show_progress(progress)  # (a bad value is refused before anything runs)
    check_option("bn", bn, BN_MODES)
    check_option("report", report, REPORTS)
    check_option("skip", skip, SKIP_MODES)
    check_option("optimizer", optimizer, OPTIMIZERS)
    if not (init is None or isinstance(init, str) and init in INITS):
        raise InvalidOptionError(f"init={init!r} is not a valid option; expected None or one of {list(INITS)}.")
    if init == "uniform" and spec.kind != "sinkhorn":
        raise InvalidOptionError(f"init='uniform' starts a doubly-stochastic P near the barycentre of the Birkhoff polytope, "
                                 f"so it is for the permutation groups ('relu', 'permutation', ...); {spec.name!r} is "
                                 f"not one. Use init='random' or None.")
    if not (isinstance(sharpening, (int, float)) and not isinstance(sharpening, bool) and sharpening >= 0):
        raise InvalidOptionError(f"sharpening must be a number ≥ 0 (the weight of −α‖P‖_F); got {sharpening!r}.")
    if l1 and spec.kind != "linear":
        raise InvalidOptionError(f"l1={l1!r}: the LASSO penalty is for linear stitches ('gl', 'low_rank:k'), not {spec.name!r}.")
    check_batch(batch_size, lr)
    x, y, xe, ye, val, labelled = splits(data, eval_data, val_data, report)
    if isinstance(site, (tuple, list)) and len(site) == 2:
        site_a, site_b = site
    elif isinstance(site, (tuple, list)):
        raise InvalidOptionError(f"site={site!r}: one site (the same in both models) or a pair (site_a, site_b).")
    else:
        site_a = site_b = site
    cut_a = Cut(model_a, site_a, x[:1], "after")
    cut_b = Cut(model_b, site_b, x[:1], "after")
    check_labels(cut_a.model, x, *labelled)
    check_labels(cut_b.model, x, *labelled)
    pairs = _pair(cut_a, cut_b)
    primary_site = pairs[cut_b.primary][1].site
    # Endpoints first: a BatchNorm re-estimate below changes B's copy after the cut.
    accuracy_a, accuracy_b = model_accuracy(cut_a.model, xe, ye), model_accuracy(cut_b.model, xe, ye)
    gen = torch.Generator().manual_seed(int(seed))
    acts = cut_a.run_head(x)
    layers, use_bias = {}, (spec.kind == "linear") if bias is None else bool(bias)
    acts_b = cut_b.run_head(x) if init == "match" and spec.kind != "identity" else None
    for i, (ca, cb) in enumerate(pairs):
        if cb.site is None or cb.site in layers or (skip == "unmapped" and cb.site != primary_site):
            continue
        start = init
        if acts_b is not None:  # the closed-form fit of B's activation from A's
            keep = sample_rows(len(x) * acts[i][0].numel() // ca.channels, 200_000, gen)
            start = fit_init(spec, rows(acts[i], ca.channels, keep), rows(acts_b[i], cb.channels, keep))
        layers[cb.site] = make_layer(spec, ca.channels, cb.channels, bias=use_bias, init=start, gen=gen,
                                     sharpening=float(sharpening))
        if l1:
            layers[cb.site].l1 = float(l1)
    del acts_b
    passthrough = IdentityMap(1)

    def run(values, idx):
        mapped = [_apply(layers.get(cb.site, passthrough), v[idx], cb) for v, (_, cb) in zip(values, pairs)]
        return cut_b.tail(*mapped)

    params = [p for m in layers.values() for p in m.parameters()]
    sinks = [m for m in layers.values() if isinstance(m, SinkhornMap)]
    births = [m for m in sinks if isinstance(m, BirkhoffMap)]
    scales = [m.log_scale if m.log_scale is not None else m.scale for m in sinks if m.diagonal is not None]
    n_bn = len(y) if bn_examples is None else max(1, min(int(bn_examples), len(y)))
    reestimate = lambda: _maybe_reestimate(bn, cut_b, lambda idx: run(acts, idx), n_bn, batch_size)  # noqa: E731

    def measure(values, labels, keep_rounded=False) -> float:
        """Accuracy of the stitch as evaluated: P rounded, BatchNorm statistics re-estimated if asked."""
        for m in sinks:
            m.round()
        reestimate()
        acc = accuracy(lambda idx: run(values, idx), labels, batch_size * 2)
        if not keep_rounded:
            for m in sinks:
                m.unround()
        return acc

    def schedule(epoch):  # the paper's schedule: P alone first, then P and the scales
        for s in scales:
            s.requires_grad_(epoch >= epochs // 2)
        for m in sinks:
            m.anneal(epoch / max(epochs - 1, 1))
        _set_bn_train(cut_b, bn == "train")

    val_acts = None if val is None else cut_a.run_head(val[0])
    best = {"accuracy": -1.0, "epoch": None, "state": None}

    def after_epoch(epoch):
        _set_bn_train(cut_b, False)
        if val is None:
            return {}
        acc = measure(val_acts, val[1])
        if acc > best["accuracy"]:
            best.update(accuracy=acc, epoch=epoch, state={k: copy.deepcopy(m.state_dict()) for k, m in layers.items()})
        return {"val_accuracy": acc}

    reg = lambda: sum((m.regulariser() for m in layers.values()), torch.zeros(()))  # noqa: E731
    project = (lambda: [m.project() for m in births]) if births else None  # noqa: E731
    decay_free = {id(m.P) for m in births}
    groups = [{"params": [p for p in params if id(p) in decay_free], "weight_decay": 0.0},
              {"params": [p for p in params if id(p) not in decay_free]}]
    step = _LR[spec.kind] if lr is None else lr
    curve = fit(lambda idx: run(acts, idx), [g for g in groups if g["params"]], y, epochs, lr=step,
                batch_size=batch_size, gen=gen, regulariser=reg, on_epoch=schedule, after_step=project,
                after_epoch=after_epoch, optimizer=optimizer, weight_decay=weight_decay,
                desc=f"stitch {spec.name} at {site_b}", progress=progress) if params else []
    _set_bn_train(cut_b, False)
    if report == "best" and best["state"] is not None:
        for k, m in layers.items():
            m.load_state_dict(best["state"][k])
    eval_acts = acts if eval_data is None else cut_a.run_head(xe)
    relaxed = None
    if sinks:
        reestimate()
        relaxed = accuracy(lambda idx: run(eval_acts, idx), ye, batch_size * 2)
    stitched = measure(eval_acts, ye, keep_rounded=True)
    main = layers.get(primary_site)
    return StitchResult(
        site=cut_b.site.name if site_a == site_b else f"{cut_a.site.name} → {cut_b.site.name}", group=spec.name,
        accuracy_a=accuracy_a, accuracy_b=accuracy_b,
        stitched_accuracy=stitched, relaxed_accuracy=relaxed,
        element=None if main is None else main.element(),
        weight=(main.weight() if main is not None else torch.eye(pairs[cut_b.primary][1].channels)).detach().clone(),
        bias=None if main is None or main.bias is None else main.bias.detach().clone(),
        maps={k: m.weight().detach().clone() for k, m in layers.items()}, crossings=[cb for _, cb in pairs],
        curve=curve, epochs=epochs, seed=int(seed), bn=bn, n_train=len(y), n_eval=len(ye),
        evaluated_on="training" if eval_data is None else "eval_data", report=report,
        best_epoch=best["epoch"] if report == "best" else None,
        val_accuracy=best["accuracy"] if report == "best" and best["epoch"] is not None else None, skip=skip,
        hook=cut_b.at)


def _pair(cut_a: Cut, cut_b: Cut) -> list[tuple[Crossing, Crossing]]:
    """Match A's crossing values to B's: by node name (same architecture) or one to one."""
    names_a = [c.node for c in cut_a.crossings]
    names_b = [c.node for c in cut_b.crossings]
    if names_a == names_b:
        pairs = list(zip(cut_a.crossings, cut_b.crossings))
    elif len(names_a) == len(names_b) == 1:
        pairs = [(cut_a.crossings[0], cut_b.crossings[0])]
    else:
        raise InvalidOptionError(
            f"cannot pair the values crossing the cut: model A passes {names_a} at {cut_a.site.name!r}, model B "
            f"expects {names_b} at {cut_b.site.name!r}. Stitch models of one architecture, or cut where one tensor crosses.")
    for ca, cb in pairs:
        if cb.site is None and ca.shape != cb.shape:
            raise InvalidOptionError(f"{cb.node!r} crosses the cut in no site (it passes unmapped), but its shape "
                                     f"differs: {ca.shape} in A, {cb.shape} in B.")
    return pairs


def _apply(layer: StitchLayer, v: torch.Tensor, c: Crossing) -> torch.Tensor:
    """The layer on the channel axis of ``v``; a flattened tensor is viewed as [N, C, block] first."""
    if c.block > 1:
        return layer(v.reshape(len(v), c.channels, c.block)).reshape(len(v), -1)
    return layer(v)


def _set_bn_train(cut: Cut, on: bool) -> None:
    """Put the tail's BatchNorms on batch statistics (``on``) or back on running statistics."""
    for m in cut.tail.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(on)


@torch.no_grad()
def _maybe_reestimate(bn: str, cut: Cut, forward, n: int, batch_size: int) -> None:
    """Recompute the running statistics of the BatchNorms after the cut (cumulative average)."""
    norms = [m for m in cut.tail.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn == "frozen" or not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for idx in batches(torch.arange(n), batch_size):
            forward(idx)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()
