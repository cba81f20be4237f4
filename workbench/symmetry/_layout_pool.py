"""The sites of SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``, canonical keys ``pool.*``):
docs/DERIVATIONS.md §10, SigLIP.

The head reads the stream after the final norm (post_layernorm's output y, every token) and returns one vector per
input: a = out_proj(MHA(probe, y, y)), then r = a + fc2(act(fc1(LN(a)))), its ``pooler_output``. Its spaces:

- the probe's (``pool.probe``, d): the probe p [1, 1, d] is read only by the query rows of the in-projection
  (q = p·W_Q + b_Q), so p ↦ p·M and W_Q ↦ M⁻¹·W_Q for any invertible M: GL(d);
- each head's query/key space (``pool.attn.qk.{h}``): q·k is read only as q·kᵀ, GL(d_head) as in a block (the one
  constant query adds the key bias's freedom, not a larger group on the space);
- each head's value space (``pool.attn.ov.{h}``): GL(d_head) as in a block (the attention weights sum to 1, so the value
  bias passes); the heads (``pool.attn.heads``) permute together;
- the MLP's hidden units (``pool.mlp``): the activation's group (gelu_pytorch_tanh: permutations);
- the head's residual (``pool.resid``, d): written by out_proj and fc2 (weights and biases), read by the head's
  LayerNorm, whose gain and bias move with it, and by nothing else but the output itself: r is compared in this space's
  new basis (``_backend``). A LayerNorm reads it, so permutations with its gain as built, rotations fixing 1 where the
  gain is 1.
"""
from __future__ import annotations

import copy

from ..groups import get_group, intertwiner_group
from ._sites import Observation, Port, Site


def is_pooled(W: dict) -> bool:
    return "pool.probe.w" in W


def sites(W: dict, H: int, dh: int, act: str, path: str) -> list[Site]:
    """The head's sites (see the module docstring); ``path``: the head module, whose output is ``pool.resid``'s."""
    d = W["pool.probe.w"].shape[-1]
    a = "pool.attn"
    out = [Site("pool.probe", d, get_group("gl", d), "linear (probe → queries)", path,
                [Port("pool.probe.w", "pre", axis=2)], [Port(f"{a}.W_Q", "post", axis=1)], [], [],
                ["the probe [1, 1, d] is read only by the query rows of the in-projection"])]
    qk, ov = get_group("gl", dh), get_group("gl", dh)
    for h in range(H):
        out.append(Site(f"{a}.qk.{h}", dh, copy.copy(qk), "attention scores (the probe's query)", path,
                        [Port(f"{a}.W_Q", "pre", axis=2, heads=(h,)), Port(f"{a}.b_Q", "pre", axis=1, heads=(h,))],
                        [Port(f"{a}.W_K", "pre", axis=2, heads=(h,)), Port(f"{a}.b_K", "pre", axis=1, heads=(h,))], [], []))
        out.append(Site(f"{a}.ov.{h}", dh, copy.copy(ov), "linear (value → output)", path,
                        [Port(f"{a}.W_V", "pre", axis=2, heads=(h,)), Port(f"{a}.b_V", "pre", axis=1, heads=(h,))],
                        [Port(f"{a}.W_O", "post", axis=1, heads=(h,))], [], []))
    out.append(Site(f"{a}.heads", H, get_group("permutation", H), "attention heads", path,
                    [Port(f"{a}.{p}", "heads", axis=0) for p in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")], [], [], []))
    n = W["pool.mlp.W_in"].shape[1]
    out.append(Site("pool.mlp", n, intertwiner_group(act, n), act, path,
                    [Port("pool.mlp.W_in", "pre", axis=1), Port("pool.mlp.b_in", "pre", axis=0)],
                    [Port("pool.mlp.W_out", "post", axis=0)], [], []))
    gain_one = bool((W["pool.ln.w"] == 1).all())
    group = get_group("orthogonal_ones" if gain_one else "permutation", d)
    notes = ["the exact group is larger: a global sign and the shears I + 1·aᵀ (the head's LayerNorm, its only reader, "
             "is blind to them); not sampled here"]
    if not gain_one:
        notes.insert(0, "the head's LayerNorm gain (read by fc1 alone) could be folded into fc1, which would enlarge this "
                        "to rotations fixing 1; wb.fold_layernorm does not fold it (it refuses a base model)")
    out.append(Site("pool.resid", d, group, "LayerNorm (the pooling head's residual)", path,
                    [Port(f"{a}.W_O", "pre", axis=2), Port(f"{a}.b_O", "pre", axis=0),
                     Port("pool.mlp.W_out", "pre", axis=1), Port("pool.mlp.b_out", "pre", axis=0)],
                    [Port("pool.mlp.W_in", "post", axis=0)], [("pool.ln.w", "perm"), ("pool.ln.b", "pre")],
                    [Observation(path, 0, "pre")], notes))
    return out
