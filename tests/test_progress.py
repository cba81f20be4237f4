"""One progress convention (``workbench._progress``) and analyses that record no autograd graph.

Progress: ``progress=True`` writes a tqdm bar whose total is the work's number of steps, ``False``
writes nothing, ``None`` (the default) asks whether this is a Jupyter kernel — tested by faking the
kernel, never by importing IPython. Gradients: every analysis verb runs its forwards without grad and
returns nothing that carries a ``grad_fn``, on models whose parameters require grad (the default).
"""
import dataclasses
import re
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.models import observing
import workbench._progress as P
from workbench.models import no_grad_analysis
from models import randomise


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomise(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                   nn.Linear(6, 4)))


X = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))


def bar_totals(err: str) -> dict[str, tuple[int, int]]:
    """``{description: (done, total)}`` of the last state of every tqdm bar written to ``err``."""
    last = {}
    for desc, n, total in re.findall(r"(?:^|\r|\n)([^\r\n:]+?):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err):
        last[desc.strip()] = (int(n), int(total))
    return last


# ---------------------------------------------------------------- the convention itself
@pytest.fixture
def no_ipython(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)


def fake_ipython(monkeypatch, shell):
    module = types.ModuleType("IPython")
    module.get_ipython = shell if callable(shell) else (lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", module)


def test_in_notebook_only_in_a_kernel(monkeypatch, no_ipython):
    assert P.in_notebook() is False  # a script: IPython not imported, and in_notebook does not import it
    assert "IPython" not in sys.modules
    fake_ipython(monkeypatch, None)  # IPython imported, no shell running
    assert P.in_notebook() is False
    fake_ipython(monkeypatch, types.SimpleNamespace())  # a terminal IPython: a shell without a kernel
    assert P.in_notebook() is False
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=None))
    assert P.in_notebook() is False
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))  # a Jupyter kernel (ZMQInteractiveShell)
    assert P.in_notebook() is True

    def broken():
        raise RuntimeError("half-initialised")
    fake_ipython(monkeypatch, broken)
    assert P.in_notebook() is False


def test_none_follows_the_detector(monkeypatch, capsys):
    for notebook in (False, True):
        monkeypatch.setattr(P, "in_notebook", lambda: notebook)
        assert P.show_progress(None) is notebook
        wb.random_intertwiner(mlp(), seed=0)  # the default is None
        assert bool(bar_totals(capsys.readouterr().err)) is notebook
    assert P.show_progress(True) and not P.show_progress(False) and P.show_progress(np.bool_(True))


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_a_bad_setting_is_refused_before_any_work(bad, tmp_path):
    with pytest.raises(wb.InvalidOptionError, match=r"progress=.* True .*False.*None"):
        P.show_progress(bad)
    with pytest.raises(wb.InvalidOptionError, match="progress="):
        wb.harvest(mlp(), [X[:10]], names="1", path=tmp_path / "s", progress=bad)
    assert not (tmp_path / "s").exists()  # refused before the store was created or locked


# ---------------------------------------------------------------- every long call, one bar with a total
def check_bars(capsys, call, expected: dict[str, int]):
    """``call(progress)``: True writes each expected bar, finished at its total; False writes nothing."""
    call(False)
    assert capsys.readouterr().err == ""
    call(True)
    bars = bar_totals(capsys.readouterr().err)
    assert bars == {desc: (total, total) for desc, total in expected.items()}


def test_verify_and_random_intertwiner_bars(capsys):
    model = mlp()
    new, t = wb.random_intertwiner(model, seed=0, progress=False)
    assert len(t.elements) == 2
    check_bars(capsys, lambda p: wb.random_intertwiner(model, seed=0, progress=p), {"random_intertwiner": 3})
    # two forwards, the symmetry map, one step per site
    check_bars(capsys, lambda p: wb.verify(model, new, X, transform=t, progress=p), {"verify": 2 + 1 + 2})
    check_bars(capsys, lambda p: wb.verify(model, new, X, transform=t, dtype=torch.float64, progress=p),
               {"verify": 1 + 2 + 1 + 2})
    check_bars(capsys, lambda p: wb.verify(model, new, X, progress=p), {"verify": 2})  # no transform: forwards only


def test_interpretation_shift_bar_counts_batches_of_both_models(capsys):
    model = mlp()
    new, t = wb.random_intertwiner(model, seed=0, progress=False)
    site = next(iter(t.elements))
    # 40 examples in batches of 16: 3 batches per model
    check_bars(capsys, lambda p: wb.interpretation_shift(model, new, X, site, k=3, batch_size=16, progress=p),
               {"interpretation_shift": 6})


def test_probing_bars_count_bases(capsys):
    g = torch.Generator().manual_seed(0)
    acts, y = torch.randn(60, 5, generator=g), torch.arange(60) % 2 == 0
    check_bars(capsys, lambda p: wb.probing.privileged_basis_test(acts, y, bases=["orthogonal", "gl"], group="relu",
                                                                  n_bases=7, progress=p),
               {"random bases": 3 * 7})  # n_bases per family, three families
    check_bars(capsys, lambda p: wb.probing.basis_alignment(acts, n_bases=5, progress=p), {"orthogonal bases": 5})
    check_bars(capsys, lambda p: wb.probing.probe_curve(acts, {"a": y, "b": ~y}, ks=[1], cv=3, progress=p),
               {"concepts": 2})
    maps = torch.rand(6, 3, 2, 2, generator=g)
    masks = torch.rand(6, 2, 4, 4, generator=g) > 0.5
    check_bars(capsys, lambda p: wb.probing.dissection_sweep(maps, masks, alphas=[0, 0.5, 1], quantile=0.2, progress=p),
               {"geodesic Q^α": 3})


def test_similarity_bar_counts_measures(capsys):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 5, generator=g)
    check_bars(capsys, lambda p: wb.similarity.compare(a, b, measures=["linear_cka", "grelu_cka", "mean_cca"],
                                                       progress=p), {"similarity": 3})


def test_harvest_bar_counts_batches(capsys):
    model = mlp()
    batches = [X[i:i + 10] for i in range(0, 40, 10)]
    check_bars(capsys, lambda p: wb.harvest(model, batches, names="1", progress=p), {"harvest": 4})


# ---------------------------------------------------------------- no autograd graph
def tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through dataclass fields, dicts, lists, tuples and attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v, seen)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__") and type(obj).__module__.startswith("workbench"):
        for v in vars(obj).values():
            yield from tensors_in(v, seen)


def assert_no_graph(obj, *, parameters_may_require_grad=False):
    found = list(tensors_in(obj))
    for t in found:
        assert t.grad_fn is None, f"a returned tensor {tuple(t.shape)} carries a graph ({t.grad_fn})"
        if not (parameters_may_require_grad and isinstance(t, nn.Parameter)):
            assert not t.requires_grad, f"a returned tensor {tuple(t.shape)} requires grad"
    return found


class GradWatch:
    """Records, at every forward of every module, whether autograd was recording."""

    def __init__(self, model):
        self.seen = []
        # marked as only observing (they return nothing): a hooked module is otherwise left out of a symmetry map
        self.handles = [m.register_forward_hook(observing(lambda m, i, o: self.seen.append(torch.is_grad_enabled())))
                        for m in model.modules()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_the_models_really_require_grad():
    """The control: outside the verbs, these models do build graphs (else the tests below prove nothing)."""
    model = mlp()
    assert all(p.requires_grad for p in model.parameters())
    with GradWatch(model) as w:
        out = model(X)
    assert out.grad_fn is not None and all(w.seen)


def test_verify_and_interpretation_shift_record_no_graph():
    model = cnn()
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    new, t = wb.random_intertwiner(model, seed=0, example=images, progress=False)
    assert_no_graph(new, parameters_may_require_grad=True)  # new parameters are leaves, not products of a graph
    assert_no_graph(t)
    with GradWatch(model) as w, GradWatch(new) as w_new:
        report = wb.verify(model, new, images, transform=t, progress=False)
        exact = wb.verify(model, new, images, transform=t, dtype=torch.float64, progress=False)
        shift = wb.interpretation_shift(model, new, images, next(iter(t.elements)), k=3, progress=False)
    assert report.passed and exact.passed
    assert w.seen and w_new.seen and not any(w.seen + w_new.seen)
    for result in (report, exact, shift):
        assert_no_graph(result)
    assert torch.is_grad_enabled()  # restored


def test_harvest_records_no_graph(tmp_path):
    model = mlp()
    with GradWatch(model) as w:
        store = wb.harvest(model, [X[:20], X[20:]], names=["1", "3"], progress=False)
        wb.harvest(model, [X[:20], X[20:]], names=["1", "3"], path=tmp_path / "s", progress=False)
    assert w.seen and not any(w.seen)
    assert store["1"].shape == (40, 16)


def test_probing_and_similarity_return_no_graph():
    model = mlp()
    acts = model[:2](X)  # activations with a graph behind them, as a user's own forward gives
    assert acts.grad_fn is not None
    y = X[:, 0] > 0
    assert_no_graph(wb.probing.privileged_basis_test(acts, y, bases=["orthogonal"], group="relu", n_bases=5,
                                                     progress=False))
    assert_no_graph(wb.probing.basis_alignment(acts, n_bases=5, progress=False))
    assert_no_graph(wb.probing.concept_scores(acts, y))
    other = model[:4](X)
    assert_no_graph(wb.similarity.compare(acts, other))
    assert_no_graph(wb.similarity.random_transform(acts, "orthogonal"))
    assert_no_graph(wb.similarity.grelu_kernel(acts))
    assert acts.requires_grad and acts.grad_fn is not None  # the caller's tensor is left as it was


def test_explorer_apply_records_no_graph():
    data = wb.data.shapes(24, size=16, seed=0)
    model = cnn()
    explorer = wb.widgets.IntertwinerExplorer(model, data, k=3, progress=False)
    explorer.site = explorer.smap.sites[0].name
    with GradWatch(model) as w:
        result = explorer.apply()
    assert w.seen and not any(w.seen)
    assert_no_graph(result, parameters_may_require_grad=True)


def test_no_grad_analysis_keeps_the_function():
    @no_grad_analysis
    def f(x):
        """doc"""
        return x * 2, torch.is_grad_enabled()

    x = torch.ones(2, requires_grad=True)
    y, recording = f(x)
    assert not recording and y.grad_fn is None and f.__doc__ == "doc" and f.__name__ == "f"
    assert torch.is_grad_enabled()
