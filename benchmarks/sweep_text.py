"""Hugging Face text families beyond the checked ones: is each transformed exactly or refused clearly?

The checked families (``workbench.models.hf.CHECKED_FAMILIES``) have coverage rows and tests. A user's first
model is often another one. This sweep builds one small model of each family below from its configuration
class with random weights (norm gains and biases drawn around 1 and 0: a fresh model's 1s and 0s hide mistakes),
in float64, raw and (where TransformerLens 4.x has an adapter) not wrapped, and asks for a random intertwiner.
The transformed copy and the original are run here on the same token ids and compared: the largest |Δ| of each
output unit over that unit's largest |value|. A row is ``exact`` (≤ 1e-10), ``at its floor`` (within ten times
what rounding alone moves the outputs by, ``sweep_timm.floor``: one unit of float64 rounding in every parameter, or
of float32 rounding where the float64 model computes in float32 inside, as Hugging Face's RMSNorms do), ``WRONG``
(above both: a silent wrong transform), ``refused`` (workbench's own error, its message kept), ``no sites`` or ``crash`` (any other
exception: a raw error where a clear refusal belongs).

Run: ``.venv/bin/python benchmarks/sweep_text.py``; results in ``benchmarks/results/sweep_text.md``/``.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/transformers.py would shadow the package (as in coverage_text.py)
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
RESULTS = HERE / "results"
EXACT = 1e-10

D, L, H, V, F = 32, 2, 4, 64, 48
COMMON = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, vocab_size=V, intermediate_size=F,
              max_position_embeddings=64)
# family -> (auto class, config keywords beyond COMMON); None: COMMON as is.
FAMILIES = {
    "falcon": ("AutoModelForCausalLM", dict(num_kv_heads=H, new_decoder_architecture=False, multi_query=True)),
    "bloom": ("AutoModelForCausalLM", dict(n_layer=L, n_head=H)),
    "mpt": ("AutoModelForCausalLM", dict(d_model=D, n_heads=H, n_layers=L, expansion_ratio=2, max_seq_len=64)),
    "codegen": ("AutoModelForCausalLM", dict(n_embd=D, n_layer=L, n_head=H, n_positions=64, rotary_dim=4)),
    "gpt_bigcode": ("AutoModelForCausalLM", dict(n_embd=D, n_layer=L, n_head=H, n_positions=64, multi_query=True)),
    "olmo": ("AutoModelForCausalLM", dict(num_key_value_heads=H)),
    "olmo2": ("AutoModelForCausalLM", dict(num_key_value_heads=H)),
    "qwen3": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=D // H)),
    "gemma2": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=D // H)),
    "gemma3_text": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=D // H)),
    "cohere": ("AutoModelForCausalLM", dict(num_key_value_heads=H)),
    "persimmon": ("AutoModelForCausalLM", {}),
    # (Hugging Face's default grouped_mm experts refuse float64: the eager ones are the same mathematics)
    "mixtral": ("AutoModelForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                             experts_implementation="eager")),
    "olmoe": ("AutoModelForCausalLM", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                           experts_implementation="eager")),
    "qwen3_moe": ("AutoModelForCausalLM", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=12, mlp_only_layers=[1],
                                               experts_implementation="eager")),
    "qwen2_moe": ("AutoModelForCausalLM", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                               mlp_only_layers=[1], experts_implementation="eager")),
    "phi3": ("AutoModelForCausalLM", dict(num_key_value_heads=H, pad_token_id=0)),
    "granite": ("AutoModelForCausalLM", dict(num_key_value_heads=2)),
    "xglm": ("AutoModelForCausalLM", dict(d_model=D, num_layers=L, attention_heads=H, ffn_dim=F)),
    "biogpt": ("AutoModelForCausalLM", {}),
    "roberta": ("AutoModelForMaskedLM", {}),
    "xlm-roberta": ("AutoModelForSequenceClassification", dict(num_labels=3)),
    "electra": ("AutoModelForMaskedLM", dict(embedding_size=D)),
    "distilbert": ("AutoModelForMaskedLM", dict(dim=D, n_layers=L, n_heads=H, hidden_dim=F)),
    "albert": ("AutoModelForMaskedLM", dict(embedding_size=16)),
    "deberta-v2": ("AutoModelForMaskedLM", {}),
    "t5": ("AutoModelForSeq2SeqLM", dict(d_model=D, d_kv=D // H, d_ff=F, num_layers=L, num_heads=H)),
    "bart": ("AutoModelForSeq2SeqLM", dict(d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
                                          decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F)),
    "llama": ("AutoModelForSequenceClassification", dict(num_key_value_heads=2, pad_token_id=0, num_labels=3)),
    "gpt2": ("AutoModelForTokenClassification", dict(n_embd=D, n_layer=L, n_head=H, n_positions=64, num_labels=3)),
    "bert": ("AutoModel", {}),
}


def build(family: str):
    import torch
    import transformers

    auto, extra = FAMILIES[family]
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **extra})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto).from_config(config).eval().double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def outputs(model, ids):
    import torch

    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=ids, decoder_input_ids=ids)
        else:
            out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def computes_in_float32(model, ids) -> bool:
    """Whether a torch call in the (float64) model's forward returns a float32 tensor: then float64 outputs carry
    float32 rounding, and so does any comparison of two of them."""
    import torch
    from torch.overrides import TorchFunctionMode

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                seen.append(getattr(func, "__name__", str(func)))
            return out

    with Spy():
        outputs(model, ids)
    return bool(seen)


def one(family: str) -> dict:
    import torch

    import workbench as wb
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    torch.set_num_threads(1)
    sys.path.append(str(HERE))  # sweep_timm (appended: benchmarks/transformers.py must not shadow the package)
    from sweep_timm import failed, floor, judge
    row: dict = {"family": family, "class": FAMILIES[family][0]}
    t0 = time.perf_counter()
    try:
        model = build(family)
    except Exception as exc:  # noqa: BLE001 - transformers itself: recorded
        return {**row, "status": "not built", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    row.update(model=type(model).__name__, parameters=sum(p.numel() for p in model.parameters()))
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        smap = wb.symmetry_map(model)
        row.update(sites=len(smap), skipped=len(smap.skipped))
        if not len(smap):
            row.update(status="no sites", error="; ".join(sorted({r[:200] for _, r in smap.skipped})[:2]))
        else:
            new, t = wb.random_intertwiner(model, seed=0)
            a, b = outputs(model, ids), outputs(new, ids)
            if wb.models.hf.is_base(model) and "resid" in t.elements:  # no head (what AutoModel loads)
                # a model without a head returns the stream itself, which moves by the stream's element (docs/COVERAGE.md):
                # the original's moved here by hand, out[..., c] = old[..., perm[c]] * scale[c]
                e = t.elements["resid"]
                a = a[..., e.perm_part().perm] * (1 if e.scale is None else e.scale.to(a.dtype))
                row["compared"] = "last hidden state, moved by the stream's element"
            err = float(((a - b).abs() / a.abs().flatten(0, -2).amax(0).clamp_min(1e-300)).max())
            # Hugging Face norms often compute in float32 inside a float64 model (LlamaRMSNorm casts): then the floor
            # is float32's
            narrow = computes_in_float32(model, ids) if err > EXACT else False
            judge(row, err, lambda: floor(model, lambda m: outputs(m, ids), 2.0 ** -24 if narrow else 2.0 ** -52))
            if narrow:
                row["float32_inside"] = True
    except Exception as exc:  # noqa: BLE001 - a refusal, or a raw error where a clear refusal belongs
        failed(row, exc)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def page(rows: list, started: str, command: str) -> str:
    from collections import Counter

    counts = Counter(r["status"] for r in rows)
    lines = ["# Hugging Face text families beyond the checked ones, transformed", "",
             f"Run {started} with `{command}`; method in the script's docstring. {len(rows)} models: "
             + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".", "",
             "| family | model | status | sites (skipped) | direct float64 | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        sites = f"{r['sites']} ({r['skipped']})" if "sites" in r else "–"
        err = f"{r['direct64']:.0e}" if "direct64" in r else "–"
        err += f" (floor {r['floor']:.0e}{', float32 inside' if r.get('float32_inside') else ''})" if "floor" in r else ""
        note = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:400]
        lines.append(f"| {r['family']} | {r.get('model', r['class'])} | {r['status']} | {sites} | {err} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import os

    sys.path.append(str(HERE))
    from sweep_timm import isolated

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out", default=str(RESULTS / "sweep_text"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        print("ROW " + json.dumps(one(args.one), default=str), flush=True)
        return
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    rows = []
    for family in args.only or FAMILIES:
        rows.append(isolated(__file__, family, {"family": family, "class": FAMILIES[family][0]}, 600, env))
        row = rows[-1]
        print(f"{family:14s} {row['status']:9s} {row.get('sites', '')} {row.get('direct64', '')} "
              f"{(row.get('error') or '')[:150]}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"started": started, "rows": rows}, indent=1, default=str))
    command = (".venv/bin/python benchmarks/sweep_text.py " + " ".join(sys.argv[1:])).strip()
    out.with_suffix(".md").write_text(page(rows, started, command))


if __name__ == "__main__":
    main()
