"""The one capture core (``_Capture``): every verb that reads or replaces activations registers its hooks here.

The verbs over it, ``capture`` and ``run_with_cache``, are in ``_capture.py``; ``harvest`` is in ``_harvest.py``.

Correctness before speed, and the user's forward runs exactly once. A captured value is kept as a
reference to the module's output (no copy). While a capture is attached, a
``torch.overrides.TorchFunctionMode`` sees every torch call made on this thread; just before a call
writes into the memory of a value held by reference (``out += identity``, ``F.relu(x, inplace=True)``,
``x.relu_()``, ``x[...] = v``, ``torch.add(a, b, out=x)``), that value is cloned, so the cache keeps
what the module produced. Autograd version counters back this up: a value whose counter moved
although it was never cloned was written by something the mode cannot see (another thread,
``torch._C.DisableTorchFunction``). That value is dropped, the capture raises
``ActivationOverwrittenError`` (a clear refusal, never a wrong value), and the model remembers to copy
that name at capture time from then on. Writes that are no torch call and move no version counter (NumPy,
storage objects, ``.data`` off the guard's thread) cannot be seen at all: docs/ARCHITECTURE.md lists them.

Why not re-run the forward to recover an overwritten value (what this core did before): a second
forward fires the user's hooks twice, advances counters inside modules twice, updates BatchNorm
running statistics twice in train mode and leaves reassigned buffers changed. Why a function mode and
not a ``TorchDispatchMode`` (which reads aten schemas and so knows exactly which argument an op
writes): the function mode is public API, sees Python-level ``inplace=`` flags, costs one Python call
per torch call (about a hundred in a ResNet-20 forward) and does not sit under autograd; what it
misses, the version counters catch.

A root forward that raises leaves nothing of itself behind: the values it captured are discarded,
and the cache lists the names it did not reach (``cache.failures``, ``cache.unfired``).
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .._errors import (ActivationOverwrittenError, CacheBudgetError, HookNotFiredError,
                       InvalidOptionError, UnsupportedModelError)
from .._internal_forward import closed, opened, paused
from .._memory import keep_freed_memory
from .._repr import human_bytes, parse_bytes
from ..models import observing
from ._cache import storage_addresses, storage_key
from ._guard import WriteGuard, quiet as _quiet
from ._intervene import _conversion
from ._points import NameFilter, gate_reason, hook_points, unfired_reason
from ._reduce import Reduce, resolve_reduce

# Hook names whose values an op the write guard could not see overwrote, per model: copied at
# capture from then on.
_COPY_AT_CAPTURE: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()
# Hook names whose values the write guard had to copy just before an in-place write (``ReLU(inplace=True)``,
# ``out += identity``), per model: copied in the hook from then on. The same values: the hook's copy is of
# what the hook received, which is what the guard copies before the first write. Why: each of the guard's
# copies costs a Python round through it (records, views, accounting), and copying in the hook is what a
# hand-written hook does (ResNet-20, 19 such names, CPU time, min of 80: -0.6 ms at batch 32 and 4; at
# batch 128 within this machine's noise). A name that stops being overwritten only costs a copy; one that
# starts is still copied by the guard. Kept apart from _COPY_AT_CAPTURE, which records a failure and travels
# to transformed copies.
_COPY_SEEN: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def inherit_copy_list(source: nn.Module, copy: nn.Module) -> None:
    """Give ``copy`` (same module tree as ``source``) the names ``source`` must copy at capture."""
    if source in _COPY_AT_CAPTURE:
        _COPY_AT_CAPTURE[copy] = set(_COPY_AT_CAPTURE[source])


def default_budget() -> int:
    """Default memory budget of a capture: ``$WORKBENCH_CACHE_BUDGET`` or a quarter of physical RAM."""
    env = os.environ.get("WORKBENCH_CACHE_BUDGET")
    if env:
        return parse_bytes(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _remove_mode(mode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack, wherever it is on it.

    ``TorchFunctionMode.__exit__`` pops the top mode, whichever it is: two captures left out of order (an
    ``ExitStack``, contexts entered by hand) would each take the other's guard off, leaving the first's on
    the stack for good (a Python call per torch call, and a dead capture kept alive) and the second's
    values unguarded. Modes above ``mode`` are put back in their order. Not on this thread's stack (left
    on another thread): nothing to do here.
    """
    with _quiet():
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is mode:
            torch._C._pop_torch_function_stack()
            return
        if not any(torch._C._get_function_stack_at(i) is mode for i in range(n)):
            return
        above = []
        while True:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early (``stop_at``); never escapes the capture that raised
    it. Another capture open on the same model sees it as a forward that ended early (it carries its core)."""

    def __init__(self, core=None):
        super().__init__("the forward was ended early by the stop_at of another capture")
        self.core = core


def _tensors(obj, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in a forward's arguments or output: nested tuples, lists and mappings (a Hugging Face
    ``ModelOutput`` is one), four levels deep."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth >= 4:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o, depth + 1)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o, depth + 1)]
    return []


def _storages(obj) -> set[int]:
    """Storage addresses of the dense tensors in ``obj`` (as :func:`_tensors` finds them). Addresses, not the
    tensors: a capture keeps no input alive for this."""
    return storage_addresses(_tensors(obj))


def _tensor_storages(model: nn.Module) -> set[int]:
    """Storage addresses of ``model``'s parameters and buffers. What :func:`_storages` gives for ``[*parameters(),
    *buffers()]``, read from each module's own dicts: ``parameters()``'s generators and de-duplication were half of
    a capture's end on a small batch (ResNet-20's 128 tensors: 217 -> 116 µs)."""
    return storage_addresses(t for m in model.modules() for tensors in (m._parameters, m._buffers)
                      for t in tensors.values() if t is not None)


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "it did not finish"
    text = str(exc)
    return f"{type(exc).__name__}({text[:200]!r})" if text else type(exc).__name__


# ====================================================================== the core
class _Capture:
    """Capture hooks on one model, and the bookkeeping of each forward pass they see."""

    def __init__(self, model: nn.Module, names: NameFilter, *, reduce: Reduce = None,
                 device: Union[str, torch.device, None] = "cpu", dtype: Optional[torch.dtype] = None,
                 budget: Union[int, str, None] = "default", stop_at: Union[None, bool, str] = None,
                 strict: bool = False):
        self.model = model
        self.points = hook_points(model, probe=False)
        requested, matched = self.points.resolve_with_matches(names)
        # Every name the filter selects, aliases included: the cache lists these (as TransformerLens does).
        self.selected = None if matched is None else set(matched)
        explicit = self.points.exact_names(names)
        self.explicit = [n for n in requested if n in explicit]
        # Pattern-selected TransformerLens names gated off by config would never fire: skip them.
        # (Only TransformerLens names are gated; asking a plain module for ``cfg`` costs an AttributeError per name.)
        tl = self.points.family == "transformer_lens"
        self._gated = {n: why for n in requested if tl and n not in explicit for why in [gate_reason(model, n)] if why}
        requested = [n for n in requested if n not in self._gated]
        # TorchScript modules run no Python hooks (torch refuses to register them) and their code is not seen by
        # the write guard: a scripted root is refused, scripted sub-modules asked for by name too; a pattern
        # skips them (the script's own sub-modules never run as Python modules, so they are skipped as well).
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace): it runs no Python hooks, "
                f"so nothing can be captured from it. Capture the original nn.Module instead.")
        scripted = {c: m for c, m in self.points.modules.items() if isinstance(m, torch.jit.ScriptModule)}
        if scripted:
            def inside(n):
                c = self.points.canonical(n)
                return next((s for s in scripted if c == s or c.startswith(s + ".")), None)
            bad = [n for n in requested if n in explicit and inside(n)]
            if bad:
                raise UnsupportedModelError(
                    f"{bad} {'is' if len(bad) == 1 else 'are'} inside a TorchScript module "
                    f"({sorted({inside(n) for n in bad})}): TorchScript runs no Python hooks, so nothing can be "
                    f"captured there. Capture the original (unscripted) module, or name modules outside the script.")
            for n in requested:
                where = inside(n)
                if where is not None:
                    self._gated[n] = (f"it is inside the TorchScript module {where!r}, which runs no Python hooks; "
                                      f"capture the original (unscripted) module")
            requested = [n for n in requested if n not in self._gated]
        # One hook per module; the first requested name of a module is the key its values go under.
        self.key_of: dict[str, str] = {}  # canonical -> storage key
        for n in requested:
            self.key_of.setdefault(self.points.canonical(n), n)
        self.reduce_fn = resolve_reduce(reduce)
        self._reduce_any = callable(reduce)  # a callable takes any output; a named reduction only tensors
        self._reduce_name = reduce if isinstance(reduce, str) else None
        self.device = torch.device(device) if device is not None else None
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise InvalidOptionError(f"dtype must be a torch.dtype such as torch.float32 or None; got {dtype!r}.")
        self.dtype = dtype
        self._moves = device is not None or dtype is not None  # whether _to_target has anything to check
        self.budget = default_budget() if budget == "default" else (None if budget is None else parse_bytes(budget))
        self.strict = strict
        self.stop_keys = self._stop_keys(stop_at)
        self._handles: list = []
        self._guard: Optional[WriteGuard] = None
        self._canon_of = {k: c for c, k in self.key_of.items()}
        self.reset()

    def __deepcopy__(self, memo):
        # A hook of this capture is a bound method or a closure over it; copy.deepcopy of a module copies its hook
        # dicts, and deep-copied a bound method's capture with everything it held (every captured value) into the
        # copy (random_intertwiner's new model, made inside an open capture block), whose forwards then ran that
        # second capture forever. The copy's hooks share this capture instead, and do nothing there (_make_hook).
        return self

    def __copy__(self):
        return self

    def reset(self) -> None:
        """Forget everything captured so far (a new context; harvest empties the capture after every batch)."""
        self.calls: dict[str, list[torch.Tensor]] = {}  # a new dict: a cache handed out earlier keeps its own
        # Canonical names copied in the hook: both lists above, read once per context (a per-hook lookup in a
        # WeakKeyDictionary costs a weak reference each time). What the guard copies in this context is
        # copied in the hook from the next one (harvest: the next batch) on.
        self._copy: set[str] = _COPY_AT_CAPTURE.get(self.model, set()) | _COPY_SEEN.get(self.model, set())
        # storage address -> [[key, position in calls[key], tensor, version at capture], ...] held by reference
        self._watch: dict[int, list[list]] = {}
        self._stored: dict[int, int] = {}  # storage address -> bytes, for the budget
        self.needed = 0  # bytes the captures would need, stored or not
        self._overflow = False
        self._forward: Optional[dict] = None  # the open root forward: marks to roll back to
        self._depth = 0  # calls of the model made inside its own open forward
        self._inner_ok = False
        self._fired: set[str] = set()  # keys fired in the current forward (stop_at, failure reports)
        self._in_flight: set = set()  # CUDA devices with asynchronous copies to the host not yet waited for
        self.skipped: dict[str, str] = dict(self._gated)
        self._io: set[int] = set()  # storage addresses of what the root forwards were given and returned (shared_after)
        self.failures: list[str] = []
        self.lost: dict[str, str] = {}

    def _stop_keys(self, stop_at) -> Optional[set[str]]:
        if stop_at is None or stop_at is False:
            return None
        if stop_at is True:
            return set(self.key_of.values())
        if isinstance(stop_at, str):
            canon = self.points.canonical(self.points.resolve(stop_at, param="stop_at")[0])
            if canon not in self.key_of:
                raise InvalidOptionError(f"stop_at={stop_at!r} must be one of the captured names; add it to names=.")
            return {self.key_of[canon]}
        raise InvalidOptionError(f"stop_at must be None, True (after every requested name) or a hook name; got {stop_at!r}.")

    # ------------------------------------------------------------------ hook lifetime
    def attach(self) -> None:
        keep_freed_memory()  # once per process: the memory a capture holds is reused, not faulted in again
        try:
            for canon, key in self.key_of.items():
                module = self.points.modules[canon]
                self._handles.append(module.register_forward_hook(self._make_hook(canon, key)))
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._root_post))
            # Runs only when the forward raised (the hook above then did not): roll that forward back.
            self._handles.append(self.model.register_forward_hook(self._root_failed, always_call=True))
            self._guard = WriteGuard(self)
            self._guard.__enter__()
            opened(self)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        closed(self)
        if self._guard is not None:
            _remove_mode(self._guard)
            self._guard = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ per-module hook
    def _make_hook(self, canon: str, key: str) -> Callable:
        # A hook fires only for the module it was registered on: copy.deepcopy copies a module's hook dicts, so a
        # copy made while the capture is open (random_intertwiner's new model, a user's deepcopy) carries this
        # hook, and its forwards must not land in this cache (they did, and the root check then took the copy's
        # values for overwritten ones and refused the whole forward).
        # Nor for a forward a workbench verb runs for itself (_internal_forward: the symmetry map's example run).
        own = self.points.modules[canon]
        convert = _conversion(own)
        store = self._store

        if convert is None:
            def hook(module, args, output):
                if module is own and not paused(self):
                    store(canon, key, output)
        else:
            def hook(module, args, output):
                if module is own and not paused(self):
                    store(canon, key, convert.convert(output))
        return observing(hook)  # (returns None; a symmetry map made inside the capture reads the module as it is)

    def _store(self, canon: str, key: str, output: Any) -> None:
        if self.reduce_fn is not None and (self._reduce_any or isinstance(output, torch.Tensor)):
            # A callable reduce gets any output (it may pick the tensor of a tuple); the named reductions reduce a
            # tensor, and a tuple (a Hugging Face attention layer's (output, weights)) is skipped as without reduce.
            # Every tensor of the output is checked, not only a tensor output: a reduce writing into the first item
            # of a tuple (out[0].relu_()) changed the forward unseen.
            tracked = [t for t in _tensors(output) if not t.is_inference()]
            versions = [t._version for t in tracked]
            with torch.no_grad():  # the user's reduce runs under the write guard, like the model
                value = self.reduce_fn(output)
            if any(t._version != v for t, v in zip(tracked, versions)):
                raise InvalidOptionError(
                    f"reduce wrote into the output of {key!r} in place (e.g. out.relu_()), which the model goes on "
                    f"to use: the capture would change the forward. Make reduce work on a copy or out of place "
                    f"(out.relu() instead of out.relu_()).")
            if not isinstance(value, torch.Tensor):
                raise InvalidOptionError(f"reduce returned {type(value).__name__} for {key!r}; it must return a tensor.")
        elif isinstance(output, torch.Tensor):
            value = output
        else:
            # A reduce= applies to every captured name: the advice must leave tensor outputs as they are (out[0]
            # alone would keep only the first example of every other name).
            named = f" (reduce={self._reduce_name!r} reduces tensors)" if self.reduce_fn is not None else ""
            self.skipped[key] = (f"its module returned {type(output).__name__}, not a tensor{named}; pass "
                                 f"reduce=lambda out: out if torch.is_tensor(out) else out[0] (or similar) to pick "
                                 f"a tensor (a reduce= applies to every captured name)")
            if key in self.explicit:
                raise InvalidOptionError(f"{key!r}: " + self.skipped[key] + ".")
            return
        # The bookkeeping below is ours: with the write guard active, each tensor method it calls would
        # go through the guard's Python __torch_function__ (about ten per hook, most of a capture's
        # fixed cost on a small batch).
        with _quiet():
            self._keep(canon, key, value)
        if self.stop_keys is not None and self.stop_keys <= self._fired:
            raise _StopForward(self)

    def _keep(self, canon: str, key: str, value: torch.Tensor) -> None:
        t, private = self._to_target(value.detach()) if self._moves else (value.detach(), False)
        if t.layout != torch.strided:  # sparse: no one storage the guard could watch, so a private copy
            if not private:
                t = t.clone()
            self._account(t)
            self._fired.add(key)
            if not self._overflow:
                self.calls.setdefault(key, []).append(t)
            return
        if not private and (canon in self._copy or t.is_inference()):
            # Inference tensors keep no version counter, so an unseen overwrite could not be detected.
            t, private = t.clone(), True
        # _account's work, with the storage looked up once for both records (this runs once per hook).
        try:
            storage = t.untyped_storage()
        except NotImplementedError as exc:  # a torch.func wrapper (vmap's BatchedTensor, grad's TensorWrapper)
            raise UnsupportedModelError(
                f"{key!r}: its module gave a tensor with no memory of its own ({exc}): a value inside a torch.func "
                f"transform (vmap, grad, jacrev, ...) is a wrapper that means nothing outside it. Capture a direct "
                f"call of the model instead (for vmap: on the whole batch).") from None
        address = storage.data_ptr()
        if address not in self._stored:
            self._count(address, storage.nbytes())
        self._fired.add(key)
        if not self._overflow:
            calls = self.calls.setdefault(key, [])
            calls.append(t)
            if not private:
                self._watch.setdefault(address, []).append([key, len(calls) - 1, t, t._version])

    def _to_target(self, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``t`` on ``device=`` in ``dtype=``, and whether that made a private copy.

        A CUDA value bound for the CPU is copied asynchronously into pinned (page-locked) memory, on the
        stream that computed it, so the GPU keeps computing while it lands; the capture waits for those
        copies once, at the end of each forward (:meth:`_synchronize`). Every other move is ``Tensor.to``.
        """
        device, dtype = self.device, self.dtype
        if (device is None or t.device == device) and (dtype is None or t.dtype == dtype):
            return t, False
        if t.is_cuda and device is not None and device.type == "cpu":
            out = torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=True)
            out.copy_(t, non_blocking=True)
            self._in_flight.add(t.device)
            return out, True
        moved = t.to(device=device or t.device, dtype=dtype or t.dtype)
        return moved, moved is not t  # a converted copy: nothing else can write into it

    def _synchronize(self) -> None:
        """Wait for the asynchronous device-to-host copies of this forward (values are complete after)."""
        while self._in_flight:
            torch.cuda.current_stream(self._in_flight.pop()).synchronize()

    def _before_write(self, target) -> None:
        """A torch call is about to write into ``target``: clone the captured values that share its memory."""
        if not isinstance(target, torch.Tensor):
            return
        try:
            address = target.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # sparse, meta or other storage-less tensors
            return
        records = self._watch.pop(address, None)
        if not records:
            return
        clones: dict[tuple, torch.Tensor] = {}  # one copy per distinct view (aliases share it)
        if all(rec[2]._version == rec[3] for rec in records):
            # Every value held in the model's memory is about to be replaced by a copy: the capture no longer
            # holds that memory, so its bytes leave the budget's tally (else a budget fitting exactly what is
            # kept would be refused for memory only the model holds).
            self.needed -= self._stored.pop(address, 0)
        for rec in records:
            key, pos, ref, version = rec
            if ref._version != version:  # overwritten unseen earlier: leave it for check() to report
                self._watch.setdefault(address, []).append(rec)
                continue
            view = (ref.data_ptr(), ref.dtype, tuple(ref.shape), ref.stride())
            copy = clones.get(view)
            if copy is None:
                copy = clones[view] = ref.clone()
                self._account(copy)
                self._learn_copy(key)
            if self._overflow:
                return
            self.calls[key][pos] = copy

    def _learn_copy(self, key: str) -> None:
        """``key``'s values are overwritten in place after capture: copy them in the hook from the next context on."""
        canon = self._canon_of.get(key)
        if canon is not None:
            _COPY_SEEN.setdefault(self.model, set()).add(canon)

    def _account(self, t: torch.Tensor) -> None:
        address, nbytes = storage_key(t)
        if address in self._stored:
            return  # one storage under several names (aliases, views, identity modules) counts once
        self._count(address, nbytes)

    def _count(self, address: int, nbytes: int) -> None:
        """Add a storage not counted yet to the budget's tally."""
        self._stored[address] = nbytes
        self.needed += nbytes
        if self.budget is not None and self.needed > self.budget and not self._overflow:
            # Free what is stored and keep counting, so the error can say how much was needed.
            self._overflow = True
            self.calls.clear()
            self._watch.clear()

    # ------------------------------------------------------------------ root forward bookkeeping
    @observing
    def _root_pre(self, module, args, kwargs):
        if module is not self.model or paused(self):  # a copy of the model carrying this hook, or a verb's own forward
            return
        self._io.update(_storages((args, kwargs)))
        if self._forward is not None:
            if self._called_inside_itself():  # a forward that calls the model again (e.g. on each item of a list)
                self._depth += 1
                return
            self._abandon("it was interrupted")  # the previous forward never finished (interrupted inside)
        self._forward = {"marks": {k: len(v) for k, v in self.calls.items()}}
        self._fired = set()
        self._depth, self._inner_ok = 0, False

    def _called_inside_itself(self) -> bool:
        """Whether the model's forward is running further up this stack (runs only while a forward is open)."""
        code, seen, frame = nn.Module._call_impl.__code__, 0, sys._getframe(1)
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("self") is self.model:
                seen += 1
                if seen > 1:
                    return True
            frame = frame.f_back
        return False

    @observing
    def _root_post(self, module, args, output):
        if module is not self.model or paused(self):
            return
        self._io.update(_storages(output))
        if self._depth:  # the end of a call made inside the forward: the outer forward is still open
            self._depth -= 1
            self._inner_ok = True  # for _root_failed, which runs next (it runs on success too)
            return
        if self._forward is not None:
            self.finish_forward()

    @observing
    def _root_failed(self, module, args, output):
        if module is not self.model or self._forward is None or paused(self):
            return
        if self._inner_ok:  # an inner call that succeeded
            self._inner_ok = False
            return
        if self._depth:  # an inner call raised: its exception reaches the outer forward, which decides
            self._depth -= 1
            return
        exc = sys.exc_info()[1]  # torch calls always_call hooks inside its `except Exception:`
        if isinstance(exc, _StopForward) and exc.core is self:
            return  # stop_at: the capture's exit finishes this forward
        self._abandon(_describe(exc))

    def finish_forward(self) -> None:
        """End a successful root forward: check the budget and for overwrites nobody saw."""
        fwd, self._forward = self._forward, None
        self.check(fwd)

    def check(self, fwd: Optional[dict] = None, raise_errors: bool = True) -> None:
        """Raise if the budget overflowed; drop (and refuse) values an unseen op overwrote.

        ``fwd``: the root forward that just ended; on an overwrite all of its values are discarded (as
        for a forward that raised), and values of earlier forwards that were overwritten are dropped.
        """
        self._synchronize()
        if self._overflow:
            if raise_errors:
                raise self._budget_error()
            return
        bad = self._overwritten()
        if not bad:
            return
        _COPY_AT_CAPTURE.setdefault(self.model, set()).update(c for c, k in self.key_of.items() if k in bad)
        self._copy |= _COPY_AT_CAPTURE[self.model]
        why = ("overwritten in place after it was captured, by an op workbench's write guard could not see "
               "(run on another thread, or under torch._C.DisableTorchFunction); dropped instead of kept wrong")
        if fwd is not None:
            self._forward = fwd
            self._abandon(f"ActivationOverwrittenError ({bad} {why.split(';')[0]})")
        for key in self._overwritten():  # values of earlier forwards, or of a capture outside a root forward
            self.calls.pop(key, None)
            self.skipped[key] = why
        self._rebuild_after_change()
        if raise_errors:
            raise ActivationOverwrittenError(
                f"{bad} were {why}. workbench now copies these names at capture time on this model: run the "
                f"capture again."
            )

    def shared_after(self) -> list[torch.Tensor]:
        """The values held by reference, unchanged so far, that something other than the cache may write after the
        capture ends: those sharing memory with the model's parameters or buffers (an optimizer step, the next
        forward updating a buffer a module returned) or with the tensors the root forwards were given or returned
        (the caller's input and output). A value only the cache holds (an intermediate) is the caller's to edit,
        as any tensor handed out is."""
        if not self._watch:
            return []
        shared = self._io | _tensor_storages(self.model)
        with _quiet():
            return [rec[2] for address, recs in self._watch.items() if address in shared
                    for rec in recs if rec[2]._version == rec[3]]

    def by_reference(self) -> set[int]:
        """``id`` of every stored value that shares memory with the model (the others are private copies)."""
        return {id(rec[2]) for recs in self._watch.values() for rec in recs}

    def held_version(self, t: torch.Tensor) -> Optional[tuple]:
        """``(t, its version at capture)`` if ``t`` is a value held by reference, else None (one lookup)."""
        with _quiet():
            if t.layout != torch.strided:
                return None
            for rec in self._watch.get(t.untyped_storage().data_ptr(), ()):
                if rec[2] is t:
                    return rec[2], rec[3]
        return None

    def _overwritten(self) -> list[str]:
        with _quiet():
            return sorted({key for recs in self._watch.values() for key, _, ref, version in recs if ref._version != version})

    def _abandon(self, why: str) -> None:
        """A root forward raised: discard what it captured and record which names it never reached."""
        fwd, self._forward = self._forward, None
        self._roll_back(fwd)
        self._rebuild_after_change()
        missing = [k for k in self.key_of.values() if k not in self._fired]
        self.failures.append(
            f"a forward raised {why}; the values it captured ({len(self._fired)} names) were discarded"
            + (f"; names it never reached: {missing}" if missing else ""))
        for k in self.key_of.values():
            self.lost[k] = (f"the forward raised {why} before reaching it" if k in missing else
                            f"its value came from a forward that raised {why}, and was discarded with it")
        self._fired = set()

    def _roll_back(self, fwd: dict) -> None:
        marks = fwd["marks"]
        for k in list(self.calls):
            del self.calls[k][marks.get(k, 0):]
            if not self.calls[k]:
                del self.calls[k]

    def _rebuild_after_change(self) -> None:
        """Recount the budget and the watched values after values were removed from ``calls``."""
        kept = {(k, i) for k, ts in self.calls.items() for i in range(len(ts))}
        watch = ((a, [r for r in recs if (r[0], r[1]) in kept and self.calls[r[0]][r[1]] is r[2]])
                 for a, recs in self._watch.items())
        self._watch = {a: recs for a, recs in watch if recs}
        self._stored = dict(storage_key(t) for ts in self.calls.values() for t in ts)
        self.needed = sum(self._stored.values())

    def _budget_error(self) -> CacheBudgetError:
        return CacheBudgetError(
            f"capturing {len(self.key_of)} names needs {human_bytes(self.needed)}, over the memory budget of "
            f"{human_bytes(self.budget)}; nothing was kept. Narrow names= (e.g. 'blocks.*.hook_resid_post'), "
            f"shrink what is stored with reduce='spatial_mean' / 'token_mean', stream to disk with "
            f"wb.harvest(..., path=...), or raise budget= (None disables it)."
        )

    # ------------------------------------------------------------------ end of the context
    def unfired(self, stopped: bool = False) -> dict[str, str]:
        """Requested names without a value, with why."""
        out = {}
        for n in self.key_of.values():
            if n in self.calls or n in self.skipped:
                continue
            if stopped:  # names after the stop point were never meant to fire
                out[n] = "the forward was ended by stop_at before it ran"
            else:
                out[n] = self.lost.get(n) or unfired_reason(self.model, n, self.points)
        return out

    def _aliases(self) -> dict[str, str]:
        """Every other name of a captured module -> the key its values are stored under."""
        aliases = {a: self.key_of[c] for a, c in self.points.aliases.items() if c in self.key_of}
        aliases.update({c: k for c, k in self.key_of.items() if c != k})
        return aliases

    def report_unfired(self) -> None:
        missing = [n for n in self.explicit if self.key_of.get(self.points.canonical(n)) not in self.calls]
        if not missing:
            return
        detail = "; ".join(f"{n!r}: {self.lost.get(n) or unfired_reason(self.model, n, self.points)}" for n in missing)
        msg = f"requested hook(s) never fired: {detail}."
        if self.strict:
            raise HookNotFiredError(msg)
        warnings.warn(msg, stacklevel=3)
