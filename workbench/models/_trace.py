"""Tracing a plain module with ``torch.fx`` and running the trace once on the user's example.

Both steps fail on ordinary models (data-dependent control flow, a forward that only works at one
input size). A failure becomes one :class:`TraceFailure` whose message names the first call that
failed — the user's own line for a trace, the graph node for a run — and nothing is printed:
``torch.fx``'s ``ShapeProp`` prints a traceback before re-raising, so the run uses an interpreter
of our own.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from .._internal_forward import internal_forward
from .._offload import own_forward, served
from ._kind import is_traced_hf
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

    def __init__(self, is_activation, opaque: frozenset = frozenset(), functions: tuple = (),
                 root: Optional[Callable] = None, example: Optional[torch.Tensor] = None, input_grad: bool = False):
        # functions: module-level functions kept whole (recorded as one call) because fx cannot trace into them
        super().__init__(autowrap_functions=functions)
        self._is_activation = is_activation
        self._opaque = opaque  # ids of sub-modules kept whole because fx cannot trace into them (trace_kept_whole)
        self._root = root  # the function traced in place of the class's forward (hf_root), or None
        # Shapes read from the example (a traced Hugging Face model): every node's value on it, computed as it is
        # recorded, so ``x.shape``, ``x.size()``, ``x.dim()`` are the example's numbers (see _ShapedProxy)
        self._example = example
        self._values: Optional[dict] = {} if example is not None else None
        self._input_grad = input_grad  # whether the example requires grad (see to_bool)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        return super().create_args_for_root(self._root or root_fn, is_module, concrete_args)

    # -- shapes from the example (Hugging Face models only)
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self) if self._values is not None else super().proxy(node)

    def value(self, a: Any) -> Any:
        """``a``'s value on the example (a proxy's, computed when it was recorded), or _UNKNOWN."""
        if isinstance(a, fx.Proxy):
            return self._values.get(a.node, _UNKNOWN) if self._values is not None else _UNKNOWN
        return a

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if self._values is not None and kind == "call_method" and target in _SHAPE_METHODS and args:
            x = self.value(args[0])
            rest, named = [self.value(a) for a in args[1:]], {k: self.value(a) for k, a in kwargs.items()}
            if isinstance(x, torch.Tensor) and _UNKNOWN not in rest and _UNKNOWN not in named.values():
                return getattr(x, target)(*rest, **named)  # the example's number, not a node
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._values is not None:
            self._evaluate(proxy.node)
        return proxy

    def _evaluate(self, node: fx.Node) -> None:
        """Record ``node``'s value on the example (nothing when it cannot be computed: fx's own rules then apply)."""
        values = self._values
        if any(a not in values for a in node.all_input_nodes):
            return
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        try:
            with _unpatched():
                if node.op == "placeholder":
                    value = self._example.clone() if not any(n.op == "placeholder" for n in values) else _UNKNOWN
                elif node.op == "get_attr":
                    value = _attr_path(self.root, node.target)
                elif node.op == "call_module":
                    value = _symbolic_trace._orig_module_call(self.root.get_submodule(node.target), *args, **kwargs)
                elif node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    return
        except Exception:  # (fx's rules decide what an op on it means)
            return
        if value is not _UNKNOWN:
            values[node] = value

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # A module accelerate dispatched runs its class's forward inside a hook that moves weights and inputs between
        # devices: traced through, the graph would record those moves (and their control flow on devices); the
        # class's own forward is what it computes.
        if ("_hf_hook" in vars(m) and "_old_forward" in vars(m) and own_forward(m)
                and not (m._forward_hooks or m._forward_pre_hooks)):
            forward = vars(m)["_old_forward"]
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # ``if x.requires_grad:`` (torchvision's DenseNet with memory_efficient=True checkpoints its bottleneck when an
        # input requires grad): the trace runs under torch.no_grad(), as the trace is run and verify runs the models,
        # so the branch taken there is recorded, as for self.training. There a tensor an op computed requires no
        # grad; a parameter or buffer (get_attr) and the input answer for themselves.
        node = obj.node
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("requires_grad",) \
                and isinstance(node.args[0], fx.Node):
            x = node.args[0]
            if x.op == "get_attr":
                with _unpatched():  # (fx's patched getattr would answer with a proxy again)
                    return bool(_attr_path(self.root, x.target).requires_grad)
            if x.op == "placeholder":
                return self._input_grad
            return False
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module whose forward was replaced on the object computes that forward, not its class's: traced
        # through, fx records what the replacement does (``relu.forward = torch.tanh`` becomes a tanh node);
        # kept a leaf, the rules would read its class and give a ReLU's group to a tanh.
        if id(m) in self._opaque:
            return True
        if not own_forward(m):
            return False
        return super().is_leaf_module(m, qualname) or self._is_activation(m) or (
            self._root is not None and _torch_layer(m))


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _torch_layer(m: nn.Module) -> bool:
    """A subclass of a torch.nn layer that computes exactly that layer's forward: it defines no ``forward`` or
    ``_conv_forward`` of its own (Hugging Face's EfficientNetDepthwiseConv2d only sets ``groups``). A traced Hugging
    Face model keeps it a leaf, read as the layer it is; fx would trace into it and record ``F.conv2d``."""
    base = next((b for b in type(m).__mro__ if b in _LAYERS), None)
    return base is not None and all(getattr(type(m), f, None) is getattr(base, f, None) for f in ("forward", "_conv_forward"))


_UNKNOWN = object()
# Tensor methods and attributes whose answer on the example a traced Hugging Face model reads as a number
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})


class _ShapedProxy(fx.Proxy):
    """A proxy that answers ``shape``, ``ndim``, ``dtype``, ``device`` and ``len()`` with the example's value (the
    tracer's ``create_proxy`` does ``size()``, ``dim()``, ``numel()``): Hugging Face's convolutional networks check
    the input's channels (``if pixel_values.shape[1] != self.num_channels: raise``) and compute TensorFlow-style
    padding from the input's height (``int(features.shape[-2])``), which fx cannot trace symbolically. The trace is
    then the model's on inputs of the example's shape, which is what a map is (it is traced on the first example of
    the inputs it serves). A branch on a tensor's *values* still fails to trace."""

    def __getattr__(self, k: str):
        if k in _SHAPE_ATTRS:
            v = self.tracer.value(self)
            if isinstance(v, torch.Tensor):
                return getattr(v, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        v = self.tracer.value(self)
        if isinstance(v, torch.Tensor):
            return len(v)
        return super().__len__()


@contextlib.contextmanager
def _unpatched():
    """``nn.Module.__call__`` and ``__getattr__`` as they are outside a trace (fx patches both while tracing), so
    that computing a node's value on the example records nothing."""
    call, get = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, get


def _attr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# The options a traced Hugging Face model's forward is called with: its output as a ModelOutput (return_dict=True; the
# decorators ``can_return_tuple`` and ``capture_outputs`` turn a False into a tuple) and no hidden states (they would
# make every stage's stream an output). Its other arguments (``labels``) keep their defaults (None: no loss).
_HF_OPTIONS = (("return_dict", True), ("output_hidden_states", False))


def hf_root(model: nn.Module) -> Callable:
    """The function traced in place of a Hugging Face model's forward (:func:`~._kind.is_traced_hf`):
    ``forward(self, pixel_values)`` calling the class's forward — through its decorators, which read their options
    from keyword arguments and the config — with :data:`_HF_OPTIONS` fixed. fx traces a forward's every argument
    as a proxy; those options then become control flow on a traced value (``outputs.pooler_output if return_dict
    else outputs[1]``), and a decorator's ``(*args, **kwargs)`` signature hides the arguments from fx."""
    forward = type(model).forward
    params = inspect.signature(inspect.unwrap(forward)).parameters
    anything = any(p.kind == p.VAR_KEYWORD for p in params.values())
    fixed = {k: v for k, v in _HF_OPTIONS if k in params or anything}

    def root(self, pixel_values):
        return forward(self, pixel_values, **fixed)

    return root


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


def trace(model: nn.Module, is_activation, example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """``model`` traced (activation modules stay leaves); a :class:`TraceFailure` naming the user's line. Nothing is
    kept whole: a caller whose rules would read an untraced module by its class (the fold reads a Linear subclass
    as a Linear) must not get one (:func:`trace_kept_whole` says which are)."""
    return trace_kept_whole(model, is_activation, most=0, example=example)[0]


#: A module's hook dicts that change what a call of it computes (the ``_with_kwargs`` and ``_always_called`` ones
#: flag entries of the other two), and torch's global ones, which run around every module call.
FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                "_global_forward_hooks_always_called")


def global_hooks() -> bool:
    """Whether torch has global forward hooks or pre-hooks registered (``register_module_forward_hook``): they run
    around every module call and may change what it computes."""
    return any(getattr(torch.nn.modules.module, h, None) for h in GLOBAL_HOOKS)


#: The attribute a hook function carries when it only observes: it returns None and writes nothing the forward reads
#: (workbench's own capture hooks). :func:`hooked` leaves such hooks out: a map made while a capture is open on the
#: model is the model's own (every site was skipped as "hooked" there).
OBSERVES = "_workbench_observes"


def observing(fn):
    """Mark the hook function ``fn`` as one that only observes (:data:`OBSERVES`); returns it. A bound method is
    marked through its function (all its instances' hooks then are)."""
    setattr(getattr(fn, "__func__", fn), OBSERVES, True)
    return fn


#: Where the hook functions a library installs as part of a model's own forward are defined: TransformerLens 4's
#: bridges wire pre-hooks on their norms at the first forward (``BlockBridge._maybe_wire_capture_hooks``: ln2's input
#: routed through ``hook_mlp_in``), which is how the bridge computes, and what its layout was read from. A user's
#: hook added through a hook point is wrapped in ``transformer_lens.hook_points`` and counts. Hugging Face (5.x)
#: installs recording hooks on layers, attention and routers at the first forward (``install_output_capuring_hook``:
#: hidden states, attentions, router logits collected for the returned output; they return nothing).
MODEL_WIRING = ("transformer_lens.model_bridge.", "transformers.utils.output_capturing")


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks or pre-hooks of its own that may return a new output (or input), which a
    traced leaf call of ``m`` (or a layout read from the weights) does not show: any but those marked
    :func:`observing` and a library's own wiring (:data:`MODEL_WIRING`)."""
    d = vars(m)
    return any(not _observes_or_wires(fn) for h in ("_forward_hooks", "_forward_pre_hooks")
               for fn in (d.get(h) or {}).values())


def _observes_or_wires(fn) -> bool:
    """Whether hook function ``fn`` is marked :func:`observing` or is a library's own wiring (:data:`MODEL_WIRING`),
    judged on the function it wraps where TransformerLens's ``HookPoint.add_hook`` wrapped one in its ``full_hook``
    (a bridge wires placeholder hook points that way, ``_wire_symbolic_hooks``; a user's hook comes the same way)."""
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_name == "full_hook" and "hook" in code.co_freevars and fn.__closure__:
        inner = fn.__closure__[code.co_freevars.index("hook")].cell_contents
        fn = getattr(inner, "func", inner)  # (a functools.partial: its function)
    return bool(getattr(fn, OBSERVES, False)) or str(getattr(fn, "__module__", "")).startswith(MODEL_WIRING)


# How many times tracing may keep something whole (a module class, a function) before giving up: each costs one more
# trace of the model.
_MOST_KEPT_WHOLE = 32


def trace_kept_whole(model: nn.Module, is_activation, most: int = _MOST_KEPT_WHOLE,
                     example: Optional[torch.Tensor] = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """``model`` traced, keeping whole (as fx leaves) the sub-modules whose own forward fx cannot trace — control flow
    on a traced value, most often on a tensor's shape (timm's CrossViT, Twins, TinyViT, MobileViT) — and why, by
    name. A module kept whole is opaque to the symmetry rules: what it reads and makes cannot move (the rules freeze
    an op they do not understand), and the rest of the model is mapped. The failing module is the innermost
    sub-module whose forward is on the failure's stack, kept whole with every module of its class; where no sub-module's
    forward is, the outermost module-level function called after the last forward is kept whole instead (one recorded
    call: fx's autowrap), its name ``module.qualname()`` among the returned reasons. A failure in the model's own code
    is a :class:`TraceFailure` naming the user's line, as is one that keeps failing.

    A Hugging Face model read through its trace (:func:`~._kind.is_traced_hf`) is traced through :func:`hf_root`, in
    eval mode, with the shapes of ``example`` (one input batch; without one, shapes stay symbolic: _ShapedProxy)."""
    if not own_forward(model):  # fx traces type(model).forward, whatever the object's forward is
        f = vars(model)["forward"]
        raise TraceFailure(f"{type(model).__name__}'s forward was replaced on this object (by "
                           f"{getattr(f, '__qualname__', type(f).__name__)}), and torch.fx traces the class's "
                           f"forward ({type(model).__qualname__}.forward), which this model no longer computes: "
                           f"define the new forward in a subclass, or wrap the model in a module whose forward "
                           f"calls it")
    # fx records a traced-through module's hooks as ops (it calls Module.__call__), but a leaf's call is one node:
    # a hook on it runs when the model runs and is not in the trace (symmetry/_graph.Graph._module leaves a hooked
    # leaf alone), and a global hook wraps every leaf
    if global_hooks():
        raise TraceFailure("global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook "
                           "or register_module_forward_pre_hook): they run around every module call and may change "
                           "what it computes, which a trace does not record; remove them (handle.remove()) to map it")
    names = {id(m): n for n, m in model.named_modules() if n}
    kept: dict[str, str] = {}
    opaque: set[int] = set()
    functions: list = []
    hf = is_traced_hf(model)
    root = hf_root(model) if hf else None
    shaped = example if hf else None
    for tries in range(most + 1):
        try:
            # In eval mode, as the trace is run (propagate_shapes) and as verify runs the models: a forward branching on
            # self.training (dropout, batch statistics) records its eval branch, whatever mode the model is in now; a
            # traced Hugging Face model's values on the example (its shapes) are computed recording nothing
            tracer = _Tracer(is_activation, frozenset(opaque), tuple(functions), root, shaped,
                             input_grad=bool(getattr(example, "requires_grad", False)))
            with eval_mode(model), torch.no_grad(), internal_forward():
                gm = fx.GraphModule(model, tracer.trace(model))
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
            continue
        if shaped is not None:
            _check_covered(model, gm, tuple(shaped.shape))
        return gm, kept
    raise AssertionError("unreachable")


def _check_covered(model: nn.Module, gm: fx.GraphModule, shape: tuple) -> None:
    """A trace with the example's shapes read as numbers follows the branches that shape takes: a forward choosing its
    modules by the input's size (``self.small if x.shape[-1] <= 16 else self.large``) is traced along one branch, and
    a map of it, built from that path alone, was silently wrong at another size (the other branch's modules never
    moved). Every module holding parameters or buffers must be called in the trace, or sit inside one that is, or
    have one of them read; otherwise a :class:`TraceFailure` names those not reached."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    missed = [name or type(model).__name__ for name, m in model.named_modules()
              if (next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None)
              and name not in read and not any(name == c or name.startswith(c + ".") for c in called)]
    if missed:
        raise TraceFailure(f"{type(model).__name__} traced on inputs of shape {shape} never reaches "
                           f"{missed[:6]}{' …' if len(missed) > 6 else ''} (modules holding parameters or buffers): its "
                           f"forward picks what it runs by the input's shape, or never runs these, so a map from this "
                           f"trace would be specialised to inputs of shape {shape} and could be wrong at any other; "
                           f"nothing is mapped.")


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
