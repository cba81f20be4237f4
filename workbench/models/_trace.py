"""Tracing a plain module with ``torch.fx`` and running the trace once on the user's example.

Both steps fail on ordinary models (data-dependent control flow, a forward that only works at one
input size). A failure becomes one :class:`TraceFailure` whose message names the first call that
failed — the user's own line for a trace, the graph node for a run — and nothing is printed:
``torch.fx``'s ``ShapeProp`` prints a traceback before re-raising, so the run uses an interpreter
of our own.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .._internal_forward import internal_forward
from .._offload import own_forward, served
from ._modes import eval_mode

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workbench/


class TraceFailure(Exception):
    """The model could not be traced or run on the example; the message says where."""


@dataclass(frozen=True)
class TensorShape:
    """What a node produced on the example (``node.meta["tensor_meta"]``, as fx's ShapeProp writes)."""

    shape: tuple
    dtype: torch.dtype


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every catalogued activation module a leaf (custom ones too)."""

    def __init__(self, is_activation, opaque: frozenset = frozenset(), functions: tuple = ()):
        # functions: module-level functions kept whole (recorded as one call) because fx cannot trace into them
        super().__init__(autowrap_functions=functions)
        self._is_activation = is_activation
        self._opaque = opaque  # ids of sub-modules kept whole because fx cannot trace into them (trace_kept_whole)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # A module accelerate dispatched runs its class's forward inside a hook that moves weights and inputs between
        # devices: traced through, the graph would record those moves (and their control flow on devices); the
        # class's own forward is what it computes.
        if ("_hf_hook" in vars(m) and "_old_forward" in vars(m) and own_forward(m)
                and not (m._forward_hooks or m._forward_pre_hooks)):
            forward = vars(m)["_old_forward"]
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module whose forward was replaced on the object computes that forward, not its class's: traced
        # through, fx records what the replacement does (``relu.forward = torch.tanh`` becomes a tanh node);
        # kept a leaf, the rules would read its class and give a ReLU's group to a tanh.
        if id(m) in self._opaque:
            return True
        if not own_forward(m):
            return False
        return super().is_leaf_module(m, qualname) or self._is_activation(m)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _user_frame(exc: BaseException) -> str:
    """`` (at file.py:12 in forward: `code`)`` for the innermost frame outside torch and workbench."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _OUR_DIR)) and not f.filename.startswith("<")]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name}:{code})"


def trace(model: nn.Module, is_activation) -> fx.GraphModule:
    """``model`` traced (activation modules stay leaves); a :class:`TraceFailure` naming the user's line. Nothing is
    kept whole: a caller whose rules would read an untraced module by its class (the fold reads a Linear subclass
    as a Linear) must not get one (:func:`trace_kept_whole` says which are)."""
    return trace_kept_whole(model, is_activation, most=0)[0]


# How many times tracing may keep something whole (a module class, a function) before giving up: each costs one more
# trace of the model.
_MOST_KEPT_WHOLE = 32


def trace_kept_whole(model: nn.Module, is_activation, most: int = _MOST_KEPT_WHOLE) -> tuple[fx.GraphModule, dict[str, str]]:
    """``model`` traced, keeping whole (as fx leaves) the sub-modules whose own forward fx cannot trace — control flow
    on a traced value, most often on a tensor's shape (timm's CrossViT, Twins, TinyViT, MobileViT) — and why, by
    name. A module kept whole is opaque to the symmetry rules: what it reads and makes cannot move (the rules freeze
    an op they do not understand), and the rest of the model is mapped. The failing module is the innermost
    sub-module whose forward is on the failure's stack, kept whole with every module of its class; where no sub-module's
    forward is, the outermost module-level function called after the last forward is kept whole instead (one recorded
    call: fx's autowrap), its name ``module.qualname()`` among the returned reasons. A failure in the model's own code
    is a :class:`TraceFailure` naming the user's line, as is one that keeps failing."""
    if not own_forward(model):  # fx traces type(model).forward, whatever the object's forward is
        f = vars(model)["forward"]
        raise TraceFailure(f"{type(model).__name__}'s forward was replaced on this object (by "
                           f"{getattr(f, '__qualname__', type(f).__name__)}), and torch.fx traces the class's "
                           f"forward ({type(model).__qualname__}.forward), which this model no longer computes: "
                           f"define the new forward in a subclass, or wrap the model in a module whose forward "
                           f"calls it")
    names = {id(m): n for n, m in model.named_modules() if n}
    kept: dict[str, str] = {}
    opaque: set[int] = set()
    functions: list = []
    for tries in range(most + 1):
        try:
            # In eval mode, as the trace is run (propagate_shapes) and as verify runs the models: a forward branching on
            # self.training (dropout, batch statistics) records its eval branch, whatever mode the model is in now.
            with eval_mode(model):
                tracer = _Tracer(is_activation, frozenset(opaque), tuple(functions))
                return fx.GraphModule(model, tracer.trace(model)), kept
        except Exception as exc:  # TraceError, a TypeError from a proxy used as a bool, …: say where
            where = _failing_module(exc, names, opaque)
            function = None if where is not None else _failing_function(exc, functions)
            why = f"{_one_line(exc)}{_user_frame(exc)}"
            if (where is None and function is None) or tries >= most:
                hint = ("" if where is not None or function is not None or not most else
                        ". Sub-modules and functions whose code does this are kept whole; the model's own forward "
                        "cannot be: map a part of it (its blocks, say), or move the branch into a sub-module")
                raise TraceFailure(f"torch.fx could not trace {type(model).__name__}: {why}{hint}") from None
            if where is not None:  # every module of its class: fx would fail on each the same way, one retry each
                for m in model.modules():
                    if type(m) is type(where) and id(m) in names:
                        opaque.add(id(m))
                        kept[names[id(m)]] = why
            else:
                functions.append(function)
                kept[kept_call_name(function)] = why
    raise AssertionError("unreachable")


def kept_call_name(fn) -> str:
    """The key under which :func:`trace_kept_whole` lists a function it kept whole: ``module.qualname()``."""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}()"


def _stack(exc: BaseException) -> list:
    """The frames of ``exc``'s traceback, outermost first."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _failing_function(exc: BaseException, wrapped: list):
    """The outermost module-level function (not a method: no ``self``) outside torch and workbench called after the last
    module ``forward`` on ``exc``'s stack, found by name in the globals of the code that called it (where fx's autowrap
    replaces it: a module's forward, or a method beside it), or None."""
    frames = _stack(exc)
    forwards = [i for i, f in enumerate(frames) if f.f_code.co_name == "forward" and isinstance(f.f_locals.get("self"), nn.Module)]
    for i in range((forwards[-1] + 1) if forwards else 1, len(frames)):
        frame, caller = frames[i], frames[i - 1]
        code = frame.f_code
        if code.co_filename.startswith((_TORCH_DIR, _OUR_DIR)) or "self" in frame.f_locals:
            continue
        fn = caller.f_globals.get(code.co_name)
        if getattr(fn, "__code__", None) is code and fn not in wrapped:
            return fn
    return None


def _failing_module(exc: BaseException, names: dict, opaque: set):
    """The innermost sub-module of the model whose ``forward`` frame is on ``exc``'s stack (not yet kept whole), or
    None (the failure is in the model's own forward)."""
    found = None
    for frame in _stack(exc):
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "forward" else None
        if isinstance(owner, nn.Module) and id(owner) in names and id(owner) not in opaque:
            found = owner
    return found


def describe(node: fx.Node, modules: dict) -> str:
    """A node as the user wrote it: ``self.fc(…) (Linear)``, ``x.view(-1, 100)``, ``torch.cat(…)``."""
    def show(a: Any) -> str:
        return a.name if isinstance(a, fx.Node) else repr(a)

    rest = node.args[1:] if node.op == "call_method" else node.args
    args = ", ".join([show(a) for a in rest] + [f"{k}={show(v)}" for k, v in node.kwargs.items()])
    if node.op == "call_module":
        return f"self.{node.target}({args}) ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"{show(node.args[0])}.{node.target}({args})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({args})"


class _Shapes(fx.Interpreter):
    """Runs the trace and records each tensor's shape; a failure names the node, printing nothing."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, example_shape: tuple):
        super().__init__(gm)
        self.extra_traceback = False
        self.model, self.model_name, self.example_shape = model, type(model).__name__, example_shape

    def fetch_attr(self, target: str):
        # A parameter accelerate offloaded is a meta tensor in the model; the forward sees what its module's hook
        # serves (a dispatched module's forward is traced without the hook: Tracer.call_module)
        owner, _, attr = target.rpartition(".")
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            value = served(self.model.get_submodule(owner) if owner else self.model, attr)
        return value

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise TraceFailure(f"{self.model_name} traced, but running it on one example of shape "
                               f"{self.example_shape} failed at {describe(n, self.submodules)}: "
                               f"{_one_line(exc)}") from None
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(tuple(result.shape), result.dtype)
        return result


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> None:
    """Run ``gm`` once on ``example`` (a copy: an in-place op on the input must not touch the user's
    tensor) in eval mode without gradients, recording shapes in ``node.meta["tensor_meta"]``."""
    with eval_mode(model), torch.no_grad(), internal_forward():  # an open wb.capture records nothing of it
        _Shapes(gm, model, tuple(example.shape)).run(example.clone())
