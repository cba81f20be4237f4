"""Coverage of Hugging Face text models (issue 17): sites, groups, verify and the cost of a transform.

Rerun with ``.venv/bin/python benchmarks/coverage_text.py``; ``--quick`` uses the tests' tiny shapes
(hidden 32) and writes nothing; ``--reps N`` sets the repetitions (default 5); ``--only FAMILY …`` runs
those families; ``--kinds raw|bridge`` one kind of row; ``--merge`` with ``--only`` keeps the other families' rows
from the existing JSON, each with the date of the run that measured it (the page says which rows came from which run). Results go to ``benchmarks/results/coverage_text.md``
(raw numbers in ``coverage_text.json``), or to the folder ``--out DIR`` (a partial run kept apart from the table).

Method. Every family issue 17 names (Mistral, Qwen2, Gemma, Phi, OPT 125m- and 350m-like, GPT-NeoX)
plus GPT-2, LLaMA and BERT, and the families checked since (GPT-J, StableLM, StarCoder2, Nemotron, GPT-Neo; Qwen3,
Gemma 2, Gemma 3, OLMo 2, Phi-3, Cohere, GPT-BigCode, Granite and BLOOM, OLMo 3 and SmolLM3; and ViT, an encoder over image patches:
ViT-B/16's 224-pixel images in 16-pixel patches, 197 tokens, 1,000 labels, verified on 4 random images; and DINOv2 at
the same width, 224-pixel images in 14-pixel patches, 257 tokens, raw only: TransformerLens cannot boot a bridge; and
CLIP's vision tower with its projection, ViT-B/16's images and patches, image embeddings of 512, raw only too),
each at one shape the size of the smallest released checkpoints (hidden 512, 6 layers, 8 heads of 64, vocabulary
32,000, MLP 2,048 — Pythia-70m's size; GQA with 2 key/value heads for Mistral, Qwen2, LLaMA, StableLM, StarCoder2
and Nemotron, one for Gemma; GPT-J rotates 32 of 64 dimensions; GPT-Neo alternates global and local (window 16)
layers; 30-60M parameters),
random float32 weights with random norm gains and biases, built offline from a config. Each is
measured twice: the raw ``PreTrainedModel`` and a TransformerLens 4 bridge around a copy of it. Per row:

- the map: parameters, sites, the group of each kind of site, places skipped;
- ``verify`` of ``random_intertwiner(model, seed=0)`` on 4 × 16 random tokens at float32 (its
  tolerance 1e-5), and with ``dtype=torch.float64`` (1e-10; RMSNorm and eager softmax compute in float32
  inside Hugging Face, so those rows are held to 10× the measured floor, which verify's rule states);
- time: ``random_intertwiner(model, seed=i)`` against ``copy.deepcopy(model)``, interleaved in the same
  run by benchmarks/_timing.py, ``--reps`` each after one untimed call of both (first-call caches: the
  layout, the measured rotary pairs), on one torch thread and judged on the process's CPU time; the ratio
  is min over min, with the median of per-repetition ratios and the wall-clock ratio beside it. Target ≤ 3.
  Judged with freed memory reused, so neither side takes page faults (``_timing.reuse_freed_memory`` says why
  a benchmark must fix this), and measured again with every call on fresh memory (page faults on both sides,
  as for a process's first transform); the page faults per call are in the JSON (``faults_median``).

The machine is shared (2 cores; see the load average in the results): a wall clock there mostly measures
the scheduler (an earlier run of this script under a load of 7-10 timed the same 39M-parameter deepcopy
at 55 and 129 ms), while CPU time measures the work. Both are recorded.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import math
import os
import statistics
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import workbench as wb  # noqa: E402
from benchmarks import _timing  # noqa: E402
from benchmarks._timing import timed  # noqa: E402
from workbench.models import ensure_torchvision_importable  # noqa: E402

RESULTS = HERE / "results"
TARGET = 3.0
CLOCK = "cpu"  # judged on CPU time, one torch thread (see the docstring)


def shapes(quick: bool, positions: int = 512) -> dict:
    """Family -> (class name, config keywords). ``positions``: the position tables' length (tests/test_layout_bits.py
    pins transforms of the quick shapes with 64)."""
    d, L, H, V, f = (32, 2, 4, 50, 48) if quick else (512, 6, 8, 32000, 2048)
    kv = H // 4 if not quick else 2
    common = dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H, vocab_size=V,
                  max_position_embeddings=positions)
    return {
        "mistral": ("MistralForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, sliding_window=16)),
        "qwen2": ("Qwen2ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, tie_word_embeddings=True)),
        "gemma": ("GemmaForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=1, head_dim=d // H)),
        "phi": ("PhiForCausalLM", dict(common, intermediate_size=f)),
        "opt": ("OPTForCausalLM", dict(common, ffn_dim=f)),
        "opt350": ("OPTForCausalLM", dict(common, ffn_dim=f, word_embed_proj_dim=d // 2, do_layer_norm_before=False)),
        "gpt_neox": ("GPTNeoXForCausalLM", dict(common, intermediate_size=f)),
        "gpt2": ("GPT2LMHeadModel", dict(n_embd=d, n_layer=L, n_head=H, vocab_size=V, n_positions=positions)),
        "llama": ("LlamaForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv)),
        "bert": ("BertForMaskedLM", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H, vocab_size=V,
                                         intermediate_size=f, max_position_embeddings=positions)),
        # checked families added on 2026-12-04 (tests/test_hf_families_more.py)
        "gptj": ("GPTJForCausalLM", dict(n_embd=d, n_layer=L, n_head=H, vocab_size=V, n_positions=positions, n_inner=f,
                                         rotary_dim=d // H // 2)),
        "stablelm": ("StableLmForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv)),
        "starcoder2": ("Starcoder2ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv)),
        "nemotron": ("NemotronForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv)),
        "gpt_neo": ("GPTNeoForCausalLM", dict(hidden_size=d, num_layers=L, num_heads=H, vocab_size=V, intermediate_size=f,
                                              max_position_embeddings=positions, window_size=16,
                                              attention_types=[[["global", "local"], L // 2]])),
        # checked families added on 2026-12-05 (tests/test_hf_qwen3.py, tests/test_hf_gemma23.py): per-head q/k norms
        # (Qwen3, Gemma 3), norms on the blocks' outputs and soft caps (Gemma 2), local and global layers (Gemma 2, 3)
        "qwen3": ("Qwen3ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, head_dim=d // H)),
        "gemma2": ("Gemma2ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, head_dim=d // H,
                                             sliding_window=16)),
        "gemma3": ("Gemma3ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, head_dim=d // H,
                                             sliding_window=16)),
        "olmo2": ("Olmo2ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv)),
        "phi3": ("Phi3ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, pad_token_id=0, bos_token_id=0,
                                         eos_token_id=0)),  # fused qkv and gate_up; its default token ids lie past V
        "cohere": ("CohereForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, pad_token_id=0,
                                             bos_token_id=0, eos_token_id=0)),  # parallel, one LayerNorm, tied, logit_scale
        "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(n_embd=d, n_layer=L, n_head=H, vocab_size=V, n_positions=positions,
                                                      n_inner=f, multi_query=True)),  # GPT-2 with multi-query attention
        "granite": ("GraniteForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, pad_token_id=0,
                                               bos_token_id=0, eos_token_id=0, embedding_multiplier=12.0,
                                               residual_multiplier=0.22, attention_multiplier=1 / 64,
                                               logits_scaling=8.0)),  # a Llama with scalar multipliers
        "bloom": ("BloomForCausalLM", dict(hidden_size=d, n_layer=L, n_head=H, vocab_size=V)),  # ALiBi, embedding LN
        # Falcon-7B's form (tests/test_hf_falcon.py): fused multi-query q/k/v, one LayerNorm read by a parallel block
        "falcon": ("FalconForCausalLM", dict(common, ffn_hidden_size=f, multi_query=True, pad_token_id=0, bos_token_id=0,
                                             eos_token_id=0)),
        # a Llama whose MLPs are sparse mixtures of 8 experts, 2 per token (tests/test_hf_mixtral.py); eager experts:
        # Hugging Face's default grouped_mm refuses float64, which the table's verify runs in
        "mixtral": ("MixtralForCausalLM", dict(common, intermediate_size=f // 4, num_key_value_heads=kv, num_local_experts=8,
                                               num_experts_per_tok=2, experts_implementation="eager", pad_token_id=0,
                                               bos_token_id=0, eos_token_id=0)),
        # Mixtral's mixture behind other attentions (tests/test_hf_olmoe.py, test_hf_qwen3_moe.py, test_hf_qwen2_moe.py):
        # OLMoE's all-head q/k norms; Qwen3-MoE's per-head ones, layer 1 dense (mlp_only_layers); Qwen2-MoE's q/k/v
        # biases and a shared expert (f/2 units) beside 8 experts, layer 1 dense
        "olmoe": ("OlmoeForCausalLM", dict(common, intermediate_size=f // 4, num_key_value_heads=kv, num_experts=8,
                                           num_experts_per_tok=2, experts_implementation="eager", pad_token_id=0,
                                           bos_token_id=0, eos_token_id=0)),
        "qwen3_moe": ("Qwen3MoeForCausalLM", dict(common, intermediate_size=f, moe_intermediate_size=f // 4,
                                                  num_key_value_heads=kv, num_experts=8, num_experts_per_tok=2,
                                                  mlp_only_layers=[1], experts_implementation="eager", pad_token_id=0,
                                                  bos_token_id=0, eos_token_id=0)),
        "qwen2_moe": ("Qwen2MoeForCausalLM", dict(common, intermediate_size=f, moe_intermediate_size=f // 4,
                                                  shared_expert_intermediate_size=f // 2, num_key_value_heads=kv,
                                                  num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                                                  experts_implementation="eager", pad_token_id=0, bos_token_id=0,
                                                  eos_token_id=0)),
        # GPT-OSS (tests/test_hf_gpt_oss.py): q/k/v/o biases, a sink logit per query head, sliding layers (window 16)
        # alternating with full ones, YaRN rotary (the released models' 32 × 4,096 positions, which its factor assumes),
        # 8 experts (2 per token) of clamped SwiGLUs with biases, a router bias
        "gpt_oss": ("GptOssForCausalLM", dict(common, max_position_embeddings=131072, intermediate_size=f // 4,
                                              num_key_value_heads=kv, head_dim=d // H, num_local_experts=8,
                                              num_experts_per_tok=2, sliding_window=16, experts_implementation="eager",
                                              pad_token_id=0, bos_token_id=0, eos_token_id=0)),
        # a Llama whose LayerNorms have no parameters (tests/test_hf_olmo.py): the stream takes rotations fixing 1
        "olmo": ("OlmoForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, pad_token_id=0,
                                         bos_token_id=0, eos_token_id=0)),
        # OLMo 2's block with sliding (window 16) and full layers, every fourth full (Olmo3Config's default), each kind with
        # its own rotary embedding: YaRN on the full layers, as the checkpoints (tests/test_hf_olmo3.py)
        "olmo3": ("Olmo3ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, sliding_window=16,
                                           pad_token_id=0, bos_token_id=0, eos_token_id=0, rope_parameters={
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
                                               "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
                                                                  "original_max_position_embeddings": 64}})),
        # a tied Llama whose every fourth layer applies no rotary embedding (NoPE: GL query/key spaces there;
        # tests/test_hf_smollm3.py)
        "smollm3": ("SmolLM3ForCausalLM", dict(common, intermediate_size=f, num_key_value_heads=kv, pad_token_id=0,
                                               bos_token_id=0, eos_token_id=0)),
        # BERT's encoder with positions from padding_idx + 1 and its own heads (tests/test_hf_roberta.py): the table has 2
        # more rows than positions, as RoBERTa's checkpoints do (514 for 512)
        "roberta": ("RobertaForMaskedLM", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H, vocab_size=V,
                                               intermediate_size=f, max_position_embeddings=positions + 2, pad_token_id=1,
                                               bos_token_id=0, eos_token_id=2)),
        # an encoder over image patches (tests/test_hf_vit.py): ViT-B/16's image and patch, 1,000 labels; its inputs are
        # pixels (``inputs``)
        "vit": ("ViTForImageClassification", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                                  intermediate_size=f, image_size=32 if quick else 224,
                                                  patch_size=8 if quick else 16, num_labels=10 if quick else 1000)),
        # DINOv2 (tests/test_hf_dinov2.py): layer scales, a mask token, a classifier on [class token ; patch mean]; its
        # 14-pixel patches over 224-pixel images (257 tokens), MLP ratio 4; read raw only (NO_BRIDGE)
        "dinov2": ("Dinov2ForImageClassification", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                                        mlp_ratio=f // d, image_size=32 if quick else 224,
                                                        patch_size=8 if quick else 14, num_labels=10 if quick else 1000)),
        # CLIP's vision tower with its projection (tests/test_hf_clip.py): ViT-B/16's image and patch, a LayerNorm on the
        # embeddings before the first block (pre_layrnorm), quick_gelu, image_embeds of 512; read raw only (NO_BRIDGE)
        "clip": ("CLIPVisionModelWithProjection", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                                       intermediate_size=f, image_size=32 if quick else 224,
                                                       patch_size=8 if quick else 16, projection_dim=d)),
        # SigLIP's vision tower (tests/test_hf_siglip.py): ViT-B/16's image and patch, no class token, a patch projection
        # with bias, gelu_pytorch_tanh, post_layernorm on every token and the attention-pooling head (a probe, an
        # nn.MultiheadAttention, a LayerNorm and an MLP); read raw only (NO_BRIDGE)
        "siglip": ("SiglipVisionModel", dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                             intermediate_size=f, image_size=32 if quick else 224,
                                             patch_size=8 if quick else 16)),
    }


# Families TransformerLens cannot boot a bridge around (workbench reads them through its own adapter): raw rows only.
NO_BRIDGE = frozenset({"dinov2", "clip", "siglip"})


def inputs(kw: dict) -> torch.Tensor:
    """A batch of 4: 16 random tokens each, or for a vision model (its config has an ``image_size``) random pixels."""
    g = torch.Generator().manual_seed(0)
    if "image_size" in kw:
        return torch.randn(4, 3, kw["image_size"], kw["image_size"], generator=g)
    return torch.randint(0, kw.get("vocab_size", 50), (4, 16), generator=g)


def build(cls_name: str, kw: dict, seed: int = 0):
    import transformers

    config_cls = {"GPT2LMHeadModel": "GPT2Config", "BertForMaskedLM": "BertConfig", "RobertaForMaskedLM": "RobertaConfig", "Gemma3ForCausalLM": "Gemma3TextConfig",
                  "ViTForImageClassification": "ViTConfig", "Dinov2ForImageClassification": "Dinov2Config",
                  "CLIPVisionModelWithProjection": "CLIPVisionConfig", "SiglipVisionModel": "SiglipVisionConfig"}.get(cls_name, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(getattr(transformers, config_cls)(**kw)).eval()
    model.config.architectures = [cls_name]  # as a checkpoint's config names it (a TransformerLens boot reads it)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or "ln" in name or name.endswith("lambda1")):  # a fresh model's 1s
                # and 0s are degenerate (DINOv2's layer scales start at 1 too)
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def bridge(model):
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    vision = hasattr(model.config, "image_size")  # no tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            "local/x", hf_model=copy.deepcopy(model), dtype=torch.float32,
            tokenizer=None if vision else PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")).eval()


def groups(smap) -> str:
    kinds: dict[str, list] = {}
    for s in smap:
        key = ".".join(p for p in s.name.split(".") if not p.isdigit()).replace("blocks.", "").replace("attn.", "")
        if s.group.name not in kinds.setdefault(key, []):
            kinds[key].append(s.group.name)
    return "; ".join(f"{k}: {'/'.join(v)}" for k, v in kinds.items())


def measure(name: str, kind: str, model, ids, reps: int) -> dict:
    smap = wb.symmetry_map(model)
    new, t = wb.random_intertwiner(model, seed=0)
    seeds = itertools.count(1)
    r32 = wb.verify(model, new, ids, transform=t)
    r64 = wb.verify(model, new, ids, transform=t, dtype=torch.float64)
    variants = {"random_intertwiner": lambda: wb.random_intertwiner(model, seed=next(seeds)),
                "deepcopy": lambda: copy.deepcopy(model)}
    # Judged with freed memory reused (main() sets _timing.reuse_freed_memory; a collection after each call frees
    # a bridge copy's cycles before the next call allocates), then reported with every call on fresh memory.
    t_ = timed(variants, reps, warmup=1, after=gc.collect)
    fresh = timed(variants, reps, warmup=1, after=_timing.release_freed_memory)  # (its warm-up releases the memory)
    ratio, ratio_median = _timing.ratio(t_["random_intertwiner"], t_["deepcopy"], CLOCK)
    wall_ratio, _ = _timing.ratio(t_["random_intertwiner"], t_["deepcopy"], "wall")
    fresh_ratio, _ = _timing.ratio(fresh["random_intertwiner"], fresh["deepcopy"], CLOCK)
    faults = {f"{regime}_{k}": int(statistics.median(runs[k]["faults"]))
              for regime, runs in (("reused", t_), ("fresh", fresh)) for k in variants}
    return {"family": name, "kind": kind, "class": type(getattr(model, "original_model", model)).__name__,
            "parameters": sum(p.numel() for p in getattr(model, "original_model", model).parameters()),
            "sites": len(smap), "skipped": len(smap.skipped), "groups": groups(smap),
            "verify32": r32.verdict, "rel32": r32.max_rel_diff, "verify64": r64.verdict, "rel64": r64.max_rel_diff,
            "floor64": r64.floor, "checked": f"{len(r64.checked)}/{len(r64.sites)}",
            "random_intertwiner_s": min(t_["random_intertwiner"][CLOCK]), "deepcopy_s": min(t_["deepcopy"][CLOCK]),
            "clock": CLOCK, "ratio": ratio, "ratio_median": ratio_median, "wall_ratio": wall_ratio,
            "fresh_random_intertwiner_s": min(fresh["random_intertwiner"][CLOCK]),
            "fresh_deepcopy_s": min(fresh["deepcopy"][CLOCK]), "fresh_ratio": fresh_ratio,
            "faults_median": faults, "pass": ratio <= TARGET}


def fresh(r: dict) -> str:
    """A row's cost with every call on fresh memory: the two times and their ratio."""
    return (f"{r['fresh_random_intertwiner_s'] * 1e3:.0f} / {r['fresh_deepcopy_s'] * 1e3:.0f} ms = "
            f"{r['fresh_ratio']:.2f}")


def regimes(rows: list[dict]) -> str:
    """The page's sentence on the two memory regimes, with the page faults each row's calls took (medians)."""
    most = {k: max(r["faults_median"][k] for r in rows) for k in rows[0]["faults_median"]}
    return ("Memory. The ratio judged is measured with freed memory reused (`_timing.reuse_freed_memory`: "
            "glibc serves every allocation from its heap and keeps what is freed), so neither side takes page "
            f"faults (the most any row's median call took: {most['reused_random_intertwiner']:,} for the transform, "
            f"{most['reused_deepcopy']:,} for the copy). *On fresh memory*: every call starts after freed memory is "
            "handed back to the kernel (`_timing.release_freed_memory`), as a process's first transform does; both "
            f"sides then fault in all they write (up to {most['fresh_random_intertwiner']:,} and "
            f"{most['fresh_deepcopy']:,} faults per call), a cost of the same order on both sides that lowers the ratio. "
            "What a fault costs depends on the host (its transparent huge pages setting): the first ratio does not.")


def table(rows: list[dict]) -> str:
    head = ("| model | kind | parameters | sites (skipped) | groups | verify float32 | verify float64 | "
            "random_intertwiner (CPU) | deepcopy (CPU) | ratio (median; wall) | on fresh memory |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        floor = f", floor {r['floor64']:.0e}" if r["floor64"] is not None else ""
        lines.append(f"| {r['family']} ({r['class']}) | {r['kind']} | {r['parameters'] / 1e6:.2f}M | {r['sites']} "
                     f"({r['skipped']}) | {r['groups']} | {r['verify32']} ({r['rel32']:.0e}) | {r['verify64']} "
                     f"({r['rel64']:.0e}{floor}) | {r['random_intertwiner_s'] * 1e3:.0f} ms | {r['deepcopy_s'] * 1e3:.0f} ms | "
                     f"{r['ratio']:.2f} ({r['ratio_median']:.2f}; {r['wall_ratio']:.2f}) {'PASS' if r['pass'] else 'MISS'} | "
                     f"{fresh(r)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--kinds", nargs="*", choices=("raw", "bridge"), default=("raw", "bridge"))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for coverage_text.md/.json")
    parser.add_argument("--merge", action="store_true", help="with --only: keep the other rows of the existing JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what CPU time judges is one thread's work (the docstring)
    _timing.reuse_freed_memory()  # the judged regime: no page faults on either side (see measure)
    ensure_torchvision_importable()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load0 = os.getloadavg()[0]
    rows = []
    for name, (cls_name, kw) in shapes(args.quick).items():
        if args.only and name not in args.only:
            continue
        raw = build(cls_name, kw)
        ids = inputs(kw)
        for kind in args.kinds:
            if kind == "bridge" and name in NO_BRIDGE:
                continue
            model = raw if kind == "raw" else bridge(raw)
            row = measure(name, kind, model, ids, args.reps)
            row["run"] = started
            rows.append(row)
            print(f"{name:9s} {kind:6s} {row['parameters'] / 1e6:6.2f}M sites {row['sites']:3d} {row['verify32']}/"
                  f"{row['verify64']} ratio {row['ratio']:.2f} ({row['ratio_median']:.2f})", flush=True)
    if args.quick:
        return
    load1 = os.getloadavg()[0]
    import platform

    runs = ""
    if args.merge:  # the rows of the families not run now, as the last run measured them (with that run's date)
        old = json.loads((args.out / "coverage_text.json").read_text())
        new = {(r["family"], r["kind"]) for r in rows}
        kept = [dict(r, run=r.get("run", old["started"])) for r in old["rows"] if (r["family"], r["kind"]) not in new]
        rows = kept + rows
        order = list(shapes(False))
        rows.sort(key=lambda r: (order.index(r["family"]) if r["family"] in order else len(order), r["kind"] != "raw"))
        when: dict = {}
        for r in rows:
            when.setdefault(r["run"], []).append(r["family"])
        runs = " Rows come from more than one run (`--merge`): " + "; ".join(
            f"{t}: {', '.join(dict.fromkeys(fams))}" for t, fams in when.items()) + "."

    text = "\n".join([
        "# Coverage of Hugging Face text models: sites, groups, verify, cost", "",
        f"Run {started} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}) with "
        f"`.venv/bin/python benchmarks/coverage_text.py{' --only ' + ' '.join(args.only) + ' --merge' if args.merge else ''}"
        f"{' --kinds ' + ' '.join(args.kinds) if tuple(args.kinds) != ('raw', 'bridge') else ''}`; "
        f"method in the script's docstring. Load average (1 min) at "
        f"start / end: {load0:.1f} / {load1:.1f} on {os.cpu_count()} cores.{runs}", "",
        "Groups per kind of site (`qk`/`ov`: per key/value head; `heads`: key/value groups, or all heads; "
        "`heads.k`: query heads within group k; `word`: OPT-350m's tied word space behind project_in/out). "
        "verify: the verdict and the largest relative output difference; `checked` sites are in the JSON.", "",
        table(rows), "",
        regimes(rows), "",
        f"{sum(r['pass'] for r in rows)}/{len(rows)} rows within {TARGET:g}× copy.deepcopy. Where each row's time "
        "goes, measured, and which ratios the group's arithmetic alone puts above the line: "
        "[coverage_costs.md](coverage_costs.md) (hand-written, dated; this page is generated).", "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage_text.md").write_text(text)
    (args.out / "coverage_text.json").write_text(json.dumps({"started": started, "load": [load0, load1], "rows": rows},
                                                          indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))


if __name__ == "__main__":
    main()
