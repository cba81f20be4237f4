"""The structure check of a Hugging Face model read in the canonical layout (``_hf.py``): does the layout, read from
the model's class and configuration, describe the model itself?

The layout's facts come from ``type(model)(config)``, and a transformed model is built from them, so a model changed
after it was built (a module swapped, added or deleted, a forward set on an instance, weights tied or untied by hand,
a configuration edited so that its modules' settings differ from what it now builds) is refused, naming the change.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .._errors import UnsupportedModelError, WorkbenchError
from .._offload import foreign_forward, offloaded_modules, offloaded_tensor
from ._kind import ModelKind, model_kind

# Module attributes that say nothing about what an eval-mode forward computes; a config edit of pad_token_id (common
# before batched generation) changes an embedding's padding_idx, which only masks its gradient.
STATE = frozenset({"training", "gradient_checkpointing", "name_or_path", "kernel_config", "loss_type", "padding_idx", "p",
                    "inplace"})


def rope_state(m: nn.Module) -> frozenset:
    """The attributes a Hugging Face rotary embedding ``m`` sets on itself in a forward (transformers'
    ``dynamic_rope_update``): rope_type "dynamic" grows its inv_freq buffer for an input longer than the cached length
    and sets that length, and resets both at the next input shorter than max_position_embeddings; "longrope" caches its
    long frequencies. An embedding with rotary parameters per kind of layer (``rope_type`` a dict: OLMo 3, Gemma 3) keeps
    each kind's under the kind's prefix (``full_attention_max_seq_len_cached``), and its growth also sets an unprefixed
    ``attention_scaling`` that its forward never reads (it reads ``{kind}_attention_scaling``, built from the config).
    State, not settings: ``copy_rope_state`` carries them to a transformed model and ``settings`` leaves them out. A
    one-kind embedding's ``attention_scaling`` is its setting (YaRN's factor, read by its forward): growth sets it to the
    value it was built with (1 for "dynamic")."""
    kinds = getattr(m, "rope_type", None)
    if not isinstance(kinds, dict):
        return frozenset({"max_seq_len_cached", "long_inv_freq"})
    return frozenset({"max_seq_len_cached", "long_inv_freq", "attention_scaling"}
                     | {f"{k}_{a}" for k in kinds for a in ("max_seq_len_cached", "long_inv_freq")})


def unrunnable(config) -> Optional[str]:
    """Why a configuration of a checked family builds a model whose own forward cannot run (read anyway, its layout was
    taken for other heads and a transform failed deep inside on an axis length); None where it can run."""
    if getattr(config, "model_type", None) != "falcon":
        return None
    heads, kv = config.num_attention_heads, config.num_kv_heads
    if not config.new_decoder_architecture and not config.multi_query and kv != heads:
        # FalconAttention: query_key_value writes 3·hidden_size (a key and a value per query head) while num_kv_heads
        # (1 or 2 of 4) sets num_key_value_groups, so the keys are repeated into heads·heads/num_kv_heads heads
        return (f"new_decoder_architecture=False with multi_query=False builds one key and one value per query head in "
                f"query_key_value, but num_kv_heads={kv} makes its attention repeat those {heads} keys for "
                f"{kv} key/value heads: this configuration's own forward cannot run, so nothing is transformed; use "
                f"num_kv_heads={heads} (= num_attention_heads, or leave it None), or multi_query=True for one key/value head.")
    if config.new_decoder_architecture and not config.parallel_attn:
        # FalconDecoderLayer builds input_layernorm and post_attention_layernorm, and its forward reads ln_attn
        return ("new_decoder_architecture=True with parallel_attn=False builds a sequential block's two LayerNorms, but "
                "the new decoder architecture's forward reads its parallel ones (ln_attn): this configuration's own "
                "forward cannot run, so nothing is transformed; use parallel_attn=True.")
    return None


# Hugging Face's experts implementations that run torch's grouped_mm kernel: ``grouped_mm``, what ``from_pretrained``
# and ``Class(config)`` pick by default. Its kernel refuses float64 ("Expected mat_a to be Float32, BFloat16 or Float16
# matrix, got Double"), and any matrix whose strides are not whole 16-byte units ("strides should be multiple of 16
# bytes": a bfloat16 expert of 12 hidden units); measured with torch 2.13 on the CPU for every mixture family checked
# here, and on a grid of shapes with the kernel itself. ``eager`` and ``batched_mm`` run float64 and any shape.
_GROUPED_MM = frozenset({"grouped_mm"})


def experts_cannot_run(model: nn.Module, which: str = "model") -> Optional[str]:
    """Why ``model``'s forward fails inside transformers because a mixture of experts runs torch's ``grouped_mm`` kernel
    on weights it refuses: float64 (a model loaded with the default, then ``.double()``), or an expert matrix whose rows
    are not whole 16-byte units (tiny shapes only: a bfloat16 row of 12 values); None where it runs (``which``: the
    model's name in the fix the text gives). An experts module is one transformers' ``use_experts_implementation``
    decorated: its forward dispatches on its own ``config._experts_implementation`` at every call, and ``grouped_mm``
    casts the tokens to its weights' dtype and multiplies them by each weight (transposed unless ``is_transposed``).
    Where transformers would take its own loop instead of torch's kernel (``_can_use_grouped_mm``: torch <= 2.8 on the
    CPU, an old GPU), the model runs and is not refused."""
    for name, m in model.named_modules():
        own = vars(m)  # (the decorator sets both on the experts module itself: no nn.Module lookup per module)
        impl = getattr(own.get("config"), "_experts_implementation", None) if "is_concatenated" in own else None
        if impl not in _GROUPED_MM:
            continue
        weights = [p for p in m.parameters(recurse=False) if p.ndim == 3]
        if not weights or not _torch_kernel(weights[0]):
            continue
        if any(w.dtype == torch.float64 for w in weights):
            why = "computes in float32, bfloat16 or float16 only, and their weights are float64"
        else:
            odd = next((w for w in weights if _unaligned(w if own["is_transposed"] else w.transpose(-2, -1))), None)
            if odd is None:
                continue
            why = (f"takes matrices whose rows are whole 16-byte units only, and a weight of shape {tuple(odd.shape)} in "
                   f"{str(odd.dtype).replace('torch.', '')} has rows of another length")
        owner = f"{which}.original_model" if model_kind(model) == ModelKind.HF_BRIDGE else which
        where = name.replace("._original_component", "")
        return (f"its experts {where!r} ({type(m).__name__}) run Hugging Face's {impl!r} experts implementation (its "
                f"config's _experts_implementation, the default a mixture of experts is built and loaded with), whose "
                f"torch kernel {why}: the model's own forward fails inside transformers. Run the experts one at a "
                f"time, the same function: {owner}.set_experts_implementation(\"eager\") (or load it with "
                f"experts_implementation=\"eager\")" + ("; or keep the model in float32 and pass dtype=torch.float64 to "
                f"verify, which checks on a float64 copy running the eager experts." if "float64" in why else "."))
    return None


def _unaligned(b: torch.Tensor) -> bool:
    """Whether torch's grouped_mm refuses ``b`` [experts, K, N] as its right operand, the tokens [S, K] its left:
    a stride other than 1 (of either) that is not a whole number of 16-byte units."""
    size = b.element_size()
    return any(s != 1 and s * size % 16 for s in (*b.stride(), b.shape[-2]))


def _torch_kernel(weight: torch.Tensor) -> bool:
    """Whether transformers runs ``grouped_mm`` with torch's kernel for ``weight`` (else its own loop of matrix
    products, which takes any dtype)."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError:
        return True
    try:
        return bool(_can_use_grouped_mm(weight, weight, torch.zeros(1, dtype=torch.int32, device=weight.device)))
    except TypeError:  # (another signature: the kernel, as in every release that has this implementation)
        return True


def refuse_unrunnable(model: nn.Module, which: str = "model") -> None:
    """An :class:`UnsupportedModelError` where ``model`` (``which``: the argument's name) cannot run its own forward
    (:func:`experts_cannot_run`), before a verb runs it: torch's error from deep inside transformers named neither the
    construct nor the fix. A cheap walk of the modules; a model of no Hugging Face class has none of these."""
    err = _unrunnable_error(model, which)
    if err is not None:
        raise err


def unrunnable_failure(model: nn.Module, exc: BaseException, which: str = "model") -> Optional[UnsupportedModelError]:
    """The :class:`UnsupportedModelError` to raise from ``exc``, an error raised while ``model`` (or part of it) ran, where
    it is torch's RuntimeError and ``model`` cannot run its own forward (:func:`experts_cannot_run`); None otherwise."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, WorkbenchError):
        return None
    return _unrunnable_error(model, which)


def _unrunnable_error(model: nn.Module, which: str) -> Optional[UnsupportedModelError]:
    """The error naming why ``model`` cannot run (:func:`experts_cannot_run`), or None where it runs."""
    why = experts_cannot_run(model, which)
    return UnsupportedModelError(f"{which} ({type(model).__name__}) cannot run: {why}") if why else None


@contextmanager
def unrunnable_explained(model: nn.Module, which: str = "model"):
    """A block that runs ``model`` (or part of it), whose failure inside transformers' experts is explained
    (:func:`unrunnable_failure`). What the hooks use instead of :func:`refuse_unrunnable`: a capture or an intervention
    that never reaches the experts (``stop_at`` before them, a sub-module called inside the block) runs, as it did
    before that refusal, and the walk of the modules is made only where something failed (up front it cost ~0.9 µs a
    module on every capture: 58 µs for a ResNet-18's)."""
    try:
        yield
    except RuntimeError as exc:
        err = unrunnable_failure(model, exc, which)
        if err is not None:
            raise err from exc
        raise


def qk_norm_sizes(cfg, entries: dict, names: dict) -> None:
    """An all-head q/k norm (OLMo 2, OLMoE) must normalise every value its projection writes: heads·d_head. OLMoE sizes
    its q_norm by ``hidden_size``, so a config with ``head_dim != hidden_size / heads`` builds a model whose own forward
    fails; read anyway, its norm was taken for other heads and the transform failed on an unclear permutation error."""
    d_head = int(cfg.d_head)
    for which, heads in (("q", int(cfg.n_heads)), ("k", int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads))):
        for e in entries.values():
            if e.key.endswith(f".attn.{which}_norm.weight") and e.param in names:
                size = names[e.param].shape[0]
                if size not in (d_head, heads * d_head):
                    raise UnsupportedModelError(
                        f"its {which}_norm normalises {size} values where {which}_proj writes {heads} heads of {d_head} "
                        f"({heads * d_head}): this configuration's own forward cannot run (the norm is sized by the hidden "
                        f"size), so nothing is transformed; use head_dim = hidden_size / num_attention_heads.")


def settings(m: nn.Module) -> dict:
    """What a module took from the configuration when it was built: its plain attributes (a norm's ``eps``, how many
    dimensions a head rotates, the score scale, whether a block is parallel), without ``STATE`` or what a rotary
    embedding's forward sets (``rope_state``)."""
    skip = STATE | rope_state(m)
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k not in skip
            and isinstance(v, (bool, int, float, str, tuple))}  # not None: an empty module slot (OPT's final_layer_norm),
    # which a bridge fills with its own component; a setting that is None on one side only still differs


def edited(hf: nn.Module, lay) -> Optional[str]:
    """Where a module of ``hf`` was built with settings other than ``type(hf)(config)`` gives it now: the configuration
    was edited after building (``config.layer_norm_epsilon``, ``config.rope_parameters["partial_rotary_factor"]``).
    A transformed model is built from the configuration, so it would compute something else: with the norm's eps
    edited from 1e-5 to 0.5, GPT-2's log-probabilities moved by 0.1, and verify, measuring its float64 floor on a
    copy rebuilt the same way, took that 0.1 for rounding and said PASS. In a bridge, the Hugging Face modules its
    components wrap (``._original_component``) are compared."""
    for name, m in hf.named_modules():
        name = name.replace("._original_component", "")
        if type(m) is not lay.modules.get(name):  # a bridge's wrapper (its own attributes), or a module unread names
            continue
        have, want = settings(m), lay.settings.get(name, {})
        for k in sorted(set(have) | set(want)):
            if have.get(k, "(none)") != want.get(k, "(none)"):
                return (f"its module {name or type(hf).__name__!r} ({type(m).__name__}) has {k} = {have.get(k, '(none)')!r} "
                        f"where {type(hf).__name__}(config) builds {want.get(k, '(none)')!r}: the configuration was edited "
                        f"after the model was built, and a transformed model, built from the configuration, would compute "
                        f"something else; nothing is transformed (rebuild the model from the edited configuration, or "
                        f"undo the edit).")
    return None


def ties(model: nn.Module, params: Optional[dict] = None, expected: frozenset = frozenset()) -> frozenset:
    """The groups of parameter names that are one tensor (a tied unembedding), as a set of frozensets. A group of
    ``expected`` (what the class and config tie) with a weight accelerate offloaded counts where every member is
    served the same values: the offload gives each module its own parameter, so identity cannot show it."""
    groups: dict[int, set] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(n)
    found = {frozenset(g) for g in groups.values() if len(g) > 1}
    missing = expected - found
    offloaded = [name + "." for name, _ in offloaded_modules(model)] if missing else []
    for group in missing:  # (a transform reads the model onloaded: its parameters are then the served values)
        if any(n.startswith(m) for n in group for m in offloaded):
            first, *rest = (torch.as_tensor(offloaded_tensor(model, n, params[n])) for n in sorted(group))
            if all(torch.equal(first, t) for t in rest):
                found = {g for g in found if not g <= group} | {group}
    return frozenset(found)


def unread(model: nn.Module, hf: nn.Module, lay) -> Optional[str]:
    """Why the layout ``lay`` (``_hf.Layout``, read from the class and config) does not describe ``model`` (its Hugging
    Face model ``hf``) itself; None where it does.

    A bridge's Hugging Face model is wrapped by TransformerLens, so it is held to the class's own parameters: each
    must be reached. A raw model is compared with ``type(model)(config)``: a module added or replaced (another
    activation module at the same name), a forward set on an instance, a parameter of another shape, weights tied
    or untied by hand: any of these would make the layout's facts wrong for it. Modules the class builds and this
    model lacks are fine where nothing the layout reads is among them (``BertModel(add_pooling_layer=False)``)."""
    missing = [n for n in lay.shapes if n not in lay.reached]  # the class's own: a rebuilt model would not write them
    if missing:
        return (f"the parameters {missing[:4]} are not in TransformerLens's mapping of this architecture, so its "
                f"symmetries are not derived here (e.g. Phi's qk_layernorm); nothing is transformed.")
    if model_kind(model) == ModelKind.HF_BRIDGE:
        if lay.absent:  # TransformerLens's OPT adapter maps a final norm that post-LN OPT (and _remove_final_layer_norm) lacks
            key, path = lay.absent[0]
            return (f"TransformerLens's bridge maps its {key!r} to {path}, which {type(hf).__name__}(config) "
                    f"does not build: the bridge's forward fails there ('Original component not set'), so nothing is "
                    f"transformed or verified; the raw Hugging Face model (bridge.original_model) is read.")
        return edited(hf, lay)
    for name, m in hf.named_modules():
        if name not in lay.modules or type(m) is not lay.modules[name]:
            got = "no such module" if name not in lay.modules else lay.modules[name].__name__
            return (f"its module {name or type(hf).__name__!r} is a {type(m).__name__} where "
                    f"{type(hf).__name__}(config) has {got}: the model was changed after it was built, and what the "
                    f"layout reads from its class and config may not hold; nothing is transformed.")
        why = foreign_forward(m)
        if why:
            return (f"its module {name or type(hf).__name__!r} runs {why}: the layout reads the class's computation, "
                    f"not this one; nothing is transformed.")
    params = dict(hf.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        if name not in lay.shapes:  # built with other arguments than the config (ViTModel(config, use_mask_token=True))
            return (f"its parameter {name!r} is not one {type(hf).__name__}(config) builds (a constructor argument "
                    f"beyond the configuration, or added after building), and a transformed model is built from the "
                    f"configuration; nothing is transformed.")
        if lay.shapes.get(name) != tuple(p.shape):
            return (f"its parameter {name!r} has shape {tuple(p.shape)} where {type(hf).__name__}(config) has "
                    f"{lay.shapes.get(name)}; nothing is transformed.")
    lacking = [e.param for e in lay.entries if e.param not in params]
    if lacking:
        return f"it lacks {lacking[:3]}, which {type(hf).__name__}(config) has and the layout reads; nothing is transformed."
    missing = [n for n in params if n not in lay.reached]
    if missing:
        return (f"the parameters {missing[:4]} are not in TransformerLens's mapping of this architecture, so its "
                f"symmetries are not derived here (e.g. Phi's qk_layernorm); nothing is transformed.")
    expected = {t for t in lay.ties if t <= params.keys()}
    if ties(hf, params, expected) != expected:
        return (f"its weights are tied as {sorted(map(sorted, ties(hf)))} where {type(hf).__name__}(config) ties "
                f"{sorted(map(sorted, expected))} (tied or untied by hand: wb.untie_embeddings unties and says so in the "
                f"config); nothing is transformed.")
    return edited(hf, lay)
