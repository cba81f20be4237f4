"""The sites of a sparse mixture of experts (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE, GPT-OSS) in the layout backend
(docs/DERIVATIONS.md §10, Mixtral and the bullets after it).

The canonical weights (``_hf_entries.experts``): the router ``blocks.{i}.mlp.W_router`` [d_model, experts] and every
expert's SwiGLU at once, the expert first: ``mlp.experts.W_gate`` and ``mlp.experts.W_in`` [experts, d_model, d_mlp],
``mlp.experts.W_out`` [experts, d_mlp, d_model]. The block computes, per token x (the stream after ln2),
    p = softmax(x·W_router) (float32), T = top-k(p), y = Σ_{e∈T} (p_e / Σ_{f∈T} p_f) · SwiGLU_e(x),
so
- the stream: the router and every expert's gate and up read it (``post``, the d_model axis), every expert's down
  projection writes it (``pre``): x ↦ x·M leaves x·W_router, hence the routing, unchanged when W_router ↦ M⁻¹·W_router;
- expert e's hidden units (site ``blocks.{i}.mlp.hidden.{e}``): a Llama MLP's group, P_e on the gate, D_e·P_e on the up
  branch, (D_e·P_e)⁻ᵀ on the down projection — each expert's element acts on its own slice of the 3-D weights, as a
  head's element does on its head (``heads=(e,)``);
- the experts' order (site ``blocks.{i}.mlp.experts``): a permutation of the expert axis of every expert weight and of
  the router's columns together: the softmax, the top-k and its renormalisation are permutation-equivariant, so each
  token meets the same experts with the same weights (a permutation of the head axis, as ``attn.heads``);
- Qwen2-MoE's shared expert (site ``blocks.{i}.mlp.shared``): a gated MLP every token meets, ``mlp.shared.W_gate``,
  ``W_in`` [d_model, d_shared], ``W_out`` [d_shared, d_model], its hidden units a Llama MLP's D·P; its output is scaled by
  sigmoid(x·W_shared_gate), W_shared_gate [d_model, 1] one more reader of the stream, whose one-dimensional output
  takes no element (the sigmoid is neither odd nor homogeneous: only the identity);
- GPT-OSS's experts (``hf.CLAMPED_SWIGLU``): biases on the router ``b_router`` [experts], the gate and up ``b_gate``,
  ``b_in`` [experts, d_mlp] and the down projection ``b_out`` [experts, d_model] (a writer of the stream, weighted by
  the token's share of the expert); each hidden unit computes (clamp(u, ±limit) + 1)·g·sigmoid(alpha·g), g = min(gate,
  limit): its group is the permutations only, gate, up, both biases and the down projection's rows together (no scale
  of either branch commutes with its clamp, nor one of the up branch with its + 1).
"""
from __future__ import annotations

from ..groups import get_group
from ..models import hf
from ._sites import Port, Site


#: why a layer's experts' order is no site of a model configured to return its load-balancing loss
BALANCE_LOSS = ("the model returns its load-balancing loss (config.output_router_logits=True), which sums expert e's "
                "share of tokens and mean probability over every layer before multiplying them: permuting one layer's "
                "experts changes it (the logits stay). Set config.output_router_logits = False to transform the "
                "experts' order per layer")


def is_moe(W: dict, layer: int) -> bool:
    return f"blocks.{layer}.mlp.W_router" in W


def stream_ports(W: dict, layer: int) -> tuple[list[Port], list[Port]]:
    """Writers and readers of the residual stream in layer ``layer``'s mixture of experts."""
    m = f"blocks.{layer}.mlp"
    writers = [Port(f"{m}.experts.W_out", "pre", axis=2)] + _bias(W, f"{m}.experts.b_out", "pre", 1)
    readers = [Port(f"{m}.W_router", "post", axis=0)] + [Port(f"{m}.experts.{w}", "post", axis=1) for w in ("W_in", "W_gate")]
    if f"{m}.shared.W_out" in W:  # Qwen2-MoE's shared expert and its gate
        writers.append(Port(f"{m}.shared.W_out", "pre", axis=1))
        readers += [Port(f"{m}.shared.{w}", "post", axis=0) for w in ("W_in", "W_gate")] + [Port(f"{m}.W_shared_gate", "post", axis=0)]
    return writers, readers


def sites(W: dict, layer: int, act: str, see, order: bool = True) -> list[Site]:
    """Each expert's hidden units, and the experts' order (observed in the router's logits, ``see.router``) unless
    ``order`` is False (a model returning its load-balancing loss: :data:`BALANCE_LOSS`)."""
    m = f"blocks.{layer}.mlp"
    E, _, n = W[f"{m}.experts.W_in"].shape
    clamped = act == hf.CLAMPED_SWIGLU
    # the experts' hidden units are inside one fused forward (no module output shows them): not observed
    out = [Site(f"{m}.hidden.{e}", n, get_group("permutation" if clamped else "diagonal_permutation", n),
                f"{'clamped SwiGLU' if clamped else f'gated {act}'} (expert {e})", f"{m}.hook_out",
                [Port(f"{m}.experts.W_in", "pre", axis=2, heads=(e,)),
                 Port(f"{m}.experts.W_gate", "pre" if clamped else "perm", axis=2, heads=(e,))]
                + [p for b in ("b_in", "b_gate") for p in _bias(W, f"{m}.experts.{b}", "pre", 1, (e,))],
                [Port(f"{m}.experts.W_out", "post", axis=1, heads=(e,))], [], [],
                [f"expert {e} of {E}: " + ("(clamp(up) + 1) ⊙ min(gate, limit)·sigmoid(alpha·min(gate, limit)): gate, up "
                                           "and their biases permuted together, no scale on either branch" if clamped else
                                           "act(gate) ⊙ up, permuted together, any nonzero diagonal on the up branch")])
           for e in range(E)]
    if order:
        ports = [Port(f"{m}.experts.{w}", "heads", axis=0) for w in ("W_gate", "W_in", "W_out")]
        ports += [p for b in ("b_gate", "b_in", "b_out") for p in _bias(W, f"{m}.experts.{b}", "heads", 0)]
        ports += [Port(f"{m}.W_router", "heads", axis=1)] + _bias(W, f"{m}.b_router", "heads", 0)
        seen = see.router(m)  # (a lens model's router hook: Mixtral's gate.hook_out, GPT-OSS's router.hook_out)
        out.append(Site(f"{m}.experts", E, get_group("permutation", E), "experts (router columns with their experts)",
                        seen[0].name if seen else f"{m}.gate.hook_out", ports, [], [], seen,
                        ["softmax, top-k and the (renormalised) weights are permutation-equivariant"]))
    if f"{m}.shared.W_out" in W and W[f"{m}.shared.W_in"].shape[1]:  # Qwen2-MoE: a gated MLP on its own hidden units,
        # scaled by a gate read from the stream (shared_expert_intermediate_size=0: no units, only the stream moves it)
        s = f"{m}.shared"
        n = W[f"{s}.W_in"].shape[1]
        out.append(Site(s, n, get_group("diagonal_permutation", n), f"gated {act} (shared expert)", f"{s}.hook_out",
                        [Port(f"{s}.W_in", "pre", axis=1), Port(f"{s}.W_gate", "perm", axis=1)],
                        [Port(f"{s}.W_out", "post", axis=0)], [], see.shared(m),
                        ["act(gate) ⊙ up, permuted together, any nonzero diagonal on the up branch; the output's scale "
                         "sigmoid(shared_expert_gate(x)) is read from the stream and stays"]))
    return out


def _bias(W: dict, key: str, level: str, axis: int, heads=None) -> list[Port]:
    """A port on the bias ``key`` where the model has one (GPT-OSS's experts and router), else none."""
    return [Port(key, level, axis=axis, heads=heads)] if key in W else []
