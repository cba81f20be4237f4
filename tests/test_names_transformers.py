"""Hook names and captured values on transformers: Hugging Face GPT-2, Llama, BERT and ViT (small configs, random
weights, float64), TransformerLens (3.9's HookedTransformer and 4.x's bridge: the ``transformer`` tests run in both
passes), and models holding ``nn.ParameterList`` / ``nn.ParameterDict``.

Every expected value is computed here: by hand from the weights in float64, or by calling the model's own
submodules and its own outputs (``output_hidden_states``, TransformerLens's ``run_with_cache``, a plain torch hook on
a hook point), never by asking workbench. The hook layer's other adversaries are in test_hooks_adversary.py.
"""
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench import InvalidOptionError, UnknownNameError

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import make_transformer  # noqa: E402

from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, ViTConfig, ViTModel)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float64 rounding (a hand computation orders its sums differently from the model's kernels)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-12 * (1 + b.abs().max()))


# ---------------------------------------------------------------- GPT-2
def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).double().eval()


def gpt2_by_hand(model: GPT2LMHeadModel, ids: torch.Tensor, mask=None) -> dict:
    """GPT-2's forward from its weights (Conv1D: x @ W + b), float64; positions 0..T-1 as the model counts them."""
    t, cfg = model.transformer, model.config
    B, T = ids.shape
    D, H = cfg.n_embd, cfg.n_head
    d = D // H
    h = t.wte.weight[ids] + t.wpe.weight[torch.arange(T)]
    allow = torch.tril(torch.ones(T, T, dtype=torch.bool))
    if mask is not None:
        allow = allow & mask.bool()[:, None, None, :]
    out = {}
    for i, blk in enumerate(t.h):
        x = F.layer_norm(h, (D,), blk.ln_1.weight, blk.ln_1.bias, cfg.layer_norm_epsilon)
        q, k, v = (x @ blk.attn.c_attn.weight + blk.attn.c_attn.bias).split(D, -1)
        q, k, v = (z.view(B, T, H, d).transpose(1, 2) for z in (q, k, v))
        # the dtype's lowest value, not -inf: a padded query sees no key at all (a uniform row, as in the model,
        # instead of NaN that 0 * NaN would carry into the real positions of the next layer)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allow, torch.finfo(q.dtype).min)
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        out[f"attn{i}"] = z @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        h = h + out[f"attn{i}"]
        x = F.layer_norm(h, (D,), blk.ln_2.weight, blk.ln_2.bias, cfg.layer_norm_epsilon)
        pre = x @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
        out[f"act{i}"] = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre ** 3)))
        out[f"mlp{i}"] = out[f"act{i}"] @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
        h = h + out[f"mlp{i}"]
        out[f"resid{i}"] = h
    out["ln_f"] = F.layer_norm(h, (D,), t.ln_f.weight, t.ln_f.bias, cfg.layer_norm_epsilon)
    out["logits"] = out["ln_f"] @ model.lm_head.weight.T
    return out


IDS = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(3))


def test_gpt2_names_are_every_module_path_and_the_probe_says_why_some_never_fire():
    model = gpt2()
    names = wb.hook_names(model)
    assert list(names) == [n for n, _ in model.named_modules() if n] and names.aliases == {}
    assert names.family == "module" and names.unfired is None
    probed = wb.hook_names(model, example=IDS)
    # the ModuleList is a container (no forward); SDPA attention never calls its attention-dropout module
    assert probed.unfired == {"transformer.h": "it is a ModuleList, a container with no forward of its own, so it "
                                               "never fires; capture the modules it holds",
                              **{f"transformer.h.{i}.attn.attn_dropout": "not called on the example input"
                                 for i in range(2)}}


def test_gpt2_values_are_the_blocks_computed_by_hand_and_tuples_are_skipped_saying_so():
    model = gpt2()
    with torch.no_grad():
        want = gpt2_by_hand(model, IDS)
        out, cache = wb.run_with_cache(model, IDS)
    for i in range(2):
        assert close(cache[f"transformer.h.{i}.attn.c_proj"], want[f"attn{i}"])
        assert close(cache[f"transformer.h.{i}.mlp.act"], want[f"act{i}"])
        assert close(cache[f"transformer.h.{i}.mlp"], want[f"mlp{i}"])
        assert close(cache[f"transformer.h.{i}"], want[f"resid{i}"])  # the block returns the residual stream
        # the attention layer returns (output, weights): not stored, and the cache says why
        assert "returned tuple" in cache.skipped[f"transformer.h.{i}.attn"]
    assert close(cache["transformer.ln_f"], want["ln_f"]) and torch.equal(cache["lm_head"], out.logits)
    assert close(out.logits, want["logits"])
    assert "returned BaseModelOutputWithPastAndCrossAttentions" in cache.skipped["transformer"]
    # the advice of the skip reason works on a pattern: tensors stay whole, the tuple gives its output
    pick = lambda o: o if torch.is_tensor(o) else o[0]  # noqa: E731
    _, picked = wb.run_with_cache(model, IDS, names="transformer.h.0*", reduce=pick)
    assert close(picked["transformer.h.0.attn"], want["attn0"]) and close(picked["transformer.h.0"], want["resid0"])
    assert not picked.skipped


def test_a_named_reduce_skips_tuple_outputs_instead_of_raising_attribute_error():
    # Was: AttributeError 'tuple' object has no attribute 'ndim' from inside the hook, for names="*" on any
    # Hugging Face model (attention layers return tuples).
    model = gpt2()
    with torch.no_grad():
        want = gpt2_by_hand(model, IDS)
    for reduce, axis in (("token_mean", 1), ("spatial_mean", 2)):  # spatial: every axis after the second
        _, cache = wb.run_with_cache(model, IDS, names="*", reduce=reduce)
        assert set(cache.skipped) == {"transformer", "transformer.h.0.attn", "transformer.h.1.attn"}
        assert f"reduce='{reduce}' reduces tensors" in cache.skipped["transformer.h.0.attn"]
        assert close(cache["transformer.h.1"], want["resid1"].mean(axis))
        with pytest.raises(InvalidOptionError, match=r"'transformer.h.0.attn': its module returned tuple"):
            wb.run_with_cache(model, IDS, names="transformer.h.0.attn", reduce=reduce)


def test_a_reduce_writing_into_an_item_of_a_tuple_output_is_refused():
    # Was: the version check covered tensor outputs only, so reduce=lambda o: o[0].relu_() on an attention layer
    # rewrote the attention output the block goes on to add, and the capture returned other logits, silently.
    model = gpt2()
    with torch.no_grad():
        plain = model(IDS).logits
    with pytest.raises(InvalidOptionError, match="reduce wrote into the output of 'transformer.h.0.attn' in place"):
        wb.run_with_cache(model, IDS, names="transformer.h.0.attn", reduce=lambda o: o[0].relu_())
    out, cache = wb.run_with_cache(model, IDS, names="transformer.h.0.attn", reduce=lambda o: o[0].relu())
    assert torch.equal(out.logits, plain)
    with torch.no_grad():
        assert close(cache["transformer.h.0.attn"], gpt2_by_hand(model, IDS)["attn0"].relu())


def test_padded_positions_are_stored_as_the_model_computed_them():
    model = gpt2()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the second row
    with torch.no_grad():
        hidden = model(IDS, attention_mask=mask, output_hidden_states=True).hidden_states
        want = gpt2_by_hand(model, IDS, mask)
        with wb.capture(model, names=["transformer.h.?", "transformer.h.*.mlp"]) as cache:
            model(IDS, attention_mask=mask)
    real = mask.bool()
    # GPT-2's hidden_states: the embeddings, each block's output but the last, then ln_f's output
    assert torch.equal(cache["transformer.h.0"], hidden[1])  # every position, padded ones too
    for i in range(2):
        assert close(cache[f"transformer.h.{i}"][real], want[f"resid{i}"][real])
        assert close(cache[f"transformer.h.{i}.mlp"][real], want[f"mlp{i}"][real])
    assert not cache.skipped and not cache.unfired and not cache.failures


# ---------------------------------------------------------------- Llama (RMSNorm, rotary, grouped keys, SwiGLU)
def test_llama_values_are_the_decoder_computed_by_hand():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    B, T, H, KV, d = 2, 6, 4, 2, 8

    def rms(x, w):  # LlamaRMSNorm normalises in float32 whatever the model's dtype, then casts back
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).double()

    def rotate(x):
        a, b = x.chunk(2, -1)
        return torch.cat([-b, a], -1)

    with torch.no_grad():
        out, cache = wb.run_with_cache(model, ids)
        h = model.model.embed_tokens.weight[ids]
        # the model's rotary module computes its angles in float32 whatever the model's dtype: its cos/sin are used
        cos, sin = model.model.rotary_emb(h, torch.arange(T)[None])
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            x = rms(h, layer.input_layernorm.weight)
            q = (x @ a.q_proj.weight.T).view(B, T, H, d).transpose(1, 2)
            k = (x @ a.k_proj.weight.T).view(B, T, KV, d).transpose(1, 2)
            v = (x @ a.v_proj.weight.T).view(B, T, KV, d).transpose(1, 2)
            q, k = q * cos[:, None] + rotate(q) * sin[:, None], k * cos[:, None] + rotate(k) * sin[:, None]
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
            attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d) @ a.o_proj.weight.T
            assert close(cache[f"model.layers.{i}.self_attn.o_proj"], attn)
            h = h + attn
            x = rms(h, layer.post_attention_layernorm.weight)
            gate = F.silu(x @ layer.mlp.gate_proj.weight.T)
            assert close(cache[f"model.layers.{i}.mlp.act_fn"], gate)
            mlp = (gate * (x @ layer.mlp.up_proj.weight.T)) @ layer.mlp.down_proj.weight.T
            assert close(cache[f"model.layers.{i}.mlp"], mlp)
            h = h + mlp
            assert close(cache[f"model.layers.{i}"], h)
        assert close(cache["model.norm"], rms(h, model.model.norm.weight))
        assert torch.equal(cache["lm_head"], out.logits)
    assert set(cache.skipped) == {"model", "model.rotary_emb", "model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert set(cache.unfired) == {"model.layers"} and "ModuleList" in cache.unfired["model.layers"]


# ---------------------------------------------------------------- BERT with padding, ViT
def test_bert_values_with_a_padding_mask_are_the_encoder_computed_by_hand():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg).double().eval()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0  # right padding on the first row
    B, T, H, d, eps = 2, 6, 4, 8, cfg.layer_norm_eps
    with torch.no_grad():
        with wb.capture(model, names=["embeddings", "encoder.layer.*.attention.output", "encoder.layer.*.intermediate",
                                      "encoder.layer.?"]) as cache:
            out = model(ids, attention_mask=mask)
        emb = model.embeddings
        h = F.layer_norm(emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[:T]
                         + emb.token_type_embeddings.weight[0], (32,), emb.LayerNorm.weight, emb.LayerNorm.bias, eps)
        assert close(cache["embeddings"], h)
        keep = mask.bool()[:, None, None, :]
        for i, layer in enumerate(model.encoder.layer):
            s = layer.attention.self
            q, k, v = ((h @ lin.weight.T + lin.bias).view(B, T, H, d).transpose(1, 2)
                       for lin in (s.query, s.key, s.value))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~keep, float("-inf"))
            z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32)
            o = layer.attention.output
            h = F.layer_norm(z @ o.dense.weight.T + o.dense.bias + h, (32,), o.LayerNorm.weight, o.LayerNorm.bias, eps)
            assert close(cache[f"encoder.layer.{i}.attention.output"], h)  # padded positions too: keys are masked
            inner = F.gelu(h @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
            assert close(cache[f"encoder.layer.{i}.intermediate"], inner)
            o = layer.output
            h = F.layer_norm(inner @ o.dense.weight.T + o.dense.bias + h, (32,), o.LayerNorm.weight, o.LayerNorm.bias,
                             eps)
            assert close(cache[f"encoder.layer.{i}"], h)
        assert torch.equal(cache["encoder.layer.1"], out.last_hidden_state)
    assert not cache.unfired and not cache.failures


def test_vit_values_are_the_encoder_by_hand_and_a_module_called_twice_keeps_both_calls_in_order():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    B, T, H, d, eps = 2, 5, 4, 8, model.config.layer_norm_eps
    with torch.no_grad():
        out, cache = wb.run_with_cache(model, x)
        e = model.embeddings
        patches = e.patch_embeddings.projection(x).flatten(2).transpose(1, 2)  # the conv, called as a submodule
        h = torch.cat([e.cls_token.expand(B, -1, -1), patches], 1) + e.position_embeddings
        assert close(cache["embeddings"], h)
        for i, layer in enumerate(model.layers):
            a = layer.attention
            x1 = F.layer_norm(h, (32,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
            q, k, v = ((x1 @ lin.weight.T + lin.bias).view(B, T, H, d).transpose(1, 2)
                       for lin in (a.q_proj, a.k_proj, a.v_proj))
            z = ((q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32)
            attn = z @ a.o_proj.weight.T + a.o_proj.bias
            h = h + attn
            x2 = F.layer_norm(h, (32,), layer.layernorm_after.weight, layer.layernorm_after.bias, eps)
            mlp = F.gelu(x2 @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias) @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias
            h = h + mlp
            assert close(cache[f"layers.{i}.attention.o_proj"], attn) and close(cache[f"layers.{i}.mlp"], mlp)
            assert close(cache[f"layers.{i}"], h)
            # the layer's one dropout module runs twice: after the attention, then after the MLP
            first, second = cache.calls(f"layers.{i}.dropout")
            assert close(first, attn) and close(second, mlp)
            with pytest.raises(UnknownNameError, match=r"fired 2 times with different values.*cache.calls"):
                cache[f"layers.{i}.dropout"]
        assert close(cache["layernorm"], F.layer_norm(h, (32,), model.layernorm.weight, model.layernorm.bias, eps))
        assert torch.equal(cache["layernorm"], out.last_hidden_state)
    assert set(cache.skipped) == {"layers.0.attention", "layers.1.attention"}


# ---------------------------------------------------------------- generation inside a capture
def test_generate_inside_a_capture_records_one_call_per_step_in_order():
    model = gpt2()
    ids = IDS[:1, :4]
    with wb.capture(model, names=["transformer.h.1", "lm_head"]) as cache:
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    steps = cache.calls("transformer.h.1")
    assert [tuple(t.shape) for t in steps] == [(1, 4, 32), (1, 1, 32), (1, 1, 32)]  # the prompt, then one token each
    assert [tuple(t.shape) for t in cache.calls("lm_head")] == [(1, 1, 50)] * 3  # generate asks for the last logits
    with torch.no_grad():  # by hand: the whole sequence at every step, no KV cache
        for step, value in enumerate(steps):
            seq = generated[:, :4 + step]
            want = gpt2_by_hand(model, seq)
            assert close(value, want["resid1"][:, -value.shape[1]:])
            assert close(cache.calls("lm_head")[step], want["logits"][:, -1:])
            assert torch.equal(want["logits"][:, -1].argmax(-1), generated[:, 4 + step])
    with pytest.raises(UnknownNameError, match=r"fired 3 times with different values.*model.generate"):
        cache["transformer.h.1"]
    assert not cache.failures and not cache.unfired


# ---------------------------------------------------------------- harvest on a decoder, sequences of other lengths
@pytest.mark.parametrize("on_disk", [False, True])
def test_harvest_rows_follow_the_batches_and_ragged_lengths_are_refused_unreduced(tmp_path, on_disk):
    model = gpt2()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 50, (3, 5), generator=gen), torch.randint(1, 50, (2, 8), generator=gen),
               torch.randint(1, 50, (4, 3), generator=gen)]
    with torch.no_grad():
        hand = [gpt2_by_hand(model, b) for b in batches]
    names = ["transformer.h.0", "transformer.h.1.mlp"]
    for label, reduce, pick in [("mean", "token_mean", lambda t: t.mean(1)),
                                ("last", lambda out: out[:, -1], lambda t: t[:, -1]),
                                ("tokens", lambda out: out.flatten(0, 1), lambda t: t.flatten(0, 1))]:
        store = wb.harvest(model, batches, names=names, reduce=reduce, path=tmp_path / label if on_disk else None)
        assert store.complete
        for name, key in zip(names, ["resid0", "mlp1"]):
            want = torch.cat([pick(h[key]) for h in hand])
            assert close(store[name], want), (label, name)
        per_batch = [pick(h["resid0"]).shape[0] for h in hand]
        assert store.batch_index.tolist() == [i for i, n in enumerate(per_batch) for _ in range(n)]
    with pytest.raises(InvalidOptionError, match=r"rows of shape \[8, 32\].*in batch 1.*\[5, 32\]"):
        wb.harvest(model, batches, names=names, path=tmp_path / "raw" if on_disk else None)
    if on_disk:
        with pytest.warns(UserWarning, match="incomplete"):
            left = wb.ActivationStore.open(tmp_path / "raw")
        assert len(left) == 0 and not left.complete  # nothing of the refused harvest is listed


# ---------------------------------------------------------------- ParameterList / ParameterDict
class Tables(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(8, 4, dtype=torch.float64, generator=gen))
                                        for _ in range(2)])
        self.gains = nn.ParameterDict({"a": nn.Parameter(torch.randn(4, dtype=torch.float64, generator=gen))})

    def forward(self, x):
        return self.tables[1][: x.shape[1]]  # a view of a parameter held by a ParameterList


class WithParameterContainers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.pos, self.lin = Tables(), nn.Linear(4, 4).double()
        self.scales = nn.ParameterList([nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))])

    def forward(self, x):
        return self.lin(x + self.pos(x)) * self.scales[0] * self.pos.gains["a"]


def test_parameter_containers_are_named_never_fire_and_say_why_and_their_views_are_guarded():
    model, x = WithParameterContainers(), torch.randn(2, 5, 4, dtype=torch.float64)
    names = wb.hook_names(model, example=x)
    assert list(names) == ["pos", "pos.tables", "pos.gains", "lin", "scales"]
    assert names.unfired == {n: f"it is a {kind}, a container with no forward of its own, so it never fires; capture "
                                f"the modules that read its parameters"
                             for n, kind in [("pos.tables", "ParameterList"), ("pos.gains", "ParameterDict"),
                                             ("scales", "ParameterList")]}
    with pytest.warns(UserWarning, match="'scales': it is a ParameterList, a container with no forward"):
        out, cache = wb.run_with_cache(model, x, names=["pos", "lin", "scales"])
    with torch.no_grad():
        pos = model.pos.tables[1][:5]
        assert torch.equal(cache["pos"], pos) and torch.equal(cache["lin"], model.lin(x + pos))
        assert torch.equal(out, model.lin(x + pos) * model.scales[0] * model.pos.gains["a"])
    out.sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # writes into the ParameterList's table in place
    with pytest.raises(wb.ActivationOverwrittenError, match="'pos' is no longer the value its module produced"):
        cache["pos"]
    assert torch.equal(cache["lin"], cache.calls("lin")[0])  # an intermediate only the cache holds stays readable


def test_a_harvest_resumed_after_a_parameter_dict_entry_changed_is_refused(tmp_path):
    model, x = WithParameterContainers(), torch.randn(2, 5, 4, dtype=torch.float64)
    wb.harvest(model, [x, x], names="lin", path=tmp_path / "s")
    with torch.no_grad():
        model.pos.gains["a"].add_(1.0)  # read only in the root's forward, held by a ParameterDict
    with pytest.raises(wb.ResumeMismatchError, match="model"):
        wb.harvest(model, [x, x], names="lin", path=tmp_path / "s", resume=True)


# ---------------------------------------------------------------- cache conveniences against direct values
def test_cache_conveniences_on_a_hugging_face_decoder_match_the_values_by_hand():
    model = gpt2()
    with torch.no_grad():
        want = gpt2_by_hand(model, IDS)
    _, cache = wb.run_with_cache(model, IDS, names=["transformer.h.*.mlp", "transformer.h.*.mlp.act"])
    stacked = cache.stack_activation("mlp")
    assert stacked.shape == (2, 2, 5, 32) and all(close(stacked[i], want[f"mlp{i}"]) for i in range(2))
    assert close(cache["mlp", 1], want["mlp1"]) and close(cache["act", -1], want["act1"])
    as32 = cache.to(torch.float32)
    assert as32["transformer.h.0.mlp"].dtype == torch.float32
    assert torch.equal(as32["transformer.h.0.mlp"], cache["transformer.h.0.mlp"].float())
    assert as32.names == cache.names and cache["transformer.h.0.mlp"].dtype == torch.float64  # the original kept
    with pytest.raises(InvalidOptionError, match="TransformerLens model"):
        cache.accumulated_resid()


# ---------------------------------------------------------------- TransformerLens (3.9 HookedTransformer, 4.x bridge)
FLAGS = [{}, {"use_attn_result": True}, {"use_split_qkv_input": True}, {"use_hook_mlp_in": True, "use_attn_in": True}]
TOKENS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(8))


def transformer_lens_model(**flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_transformer(**flags).to(torch.float64)


def fired_by_plain_hooks(model) -> set:
    """The hook points whose module runs on a forward, found with plain torch hooks (no workbench)."""
    fired, handles = set(), []
    for name, point in model.hook_dict.items():
        handles.append(point.register_forward_hook(lambda m, a, o, name=name: fired.add(name)))
    with torch.no_grad():
        model(TOKENS)
    for h in handles:
        h.remove()
    return fired


@pytest.mark.transformer
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "default")
def test_transformer_lens_names_are_its_hook_points_and_unfired_means_a_gate_or_no_call(flags):
    model = transformer_lens_model(**flags)
    names = wb.hook_names(model)
    assert names.family == "transformer_lens"
    assert sorted([*names, *names.aliases]) == sorted(model.hook_dict)  # every hook point, under one name each
    assert all(model.hook_dict[a] is model.hook_dict[c] for a, c in names.aliases.items())
    fired = fired_by_plain_hooks(model)
    assert {n for n in names if n not in names.unfired} == {n for n in names if n in fired}
    for name, why in names.unfired.items():
        flag = next((f for s, f in [("attn.hook_result", "use_attn_result"), ("_input", "use_split_qkv_input"),
                                    ("mlp_in", "use_hook_mlp_in"), ("attn_in", "use_attn_in")] if name.endswith(s)),
                    None)
        # a gate switched off is named; anything else (the bridge's hook_hidden_states, or a gated hook the bridge
        # does not fire even with its flag on) did not fire, which the plain hooks above confirmed
        gated = flag is not None and not getattr(model.cfg, flag)
        assert why == (f"fires only with model.cfg.{flag}=True" if gated else "did not fire on a default forward pass")


@pytest.mark.transformer
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "default")
def test_transformer_lens_values_equal_its_own_cache_and_the_weights_by_hand(flags):
    model = transformer_lens_model(**flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every name fires or is skipped as gated: nothing to warn about
        logits, cache = wb.run_with_cache(model, TOKENS)
    own_logits, own = model.run_with_cache(TOKENS)
    assert torch.equal(logits, own_logits) and sorted(cache) == sorted(own.keys())
    for key in own.keys():
        assert torch.equal(cache[key], own[key]), key
    for i in range(model.cfg.n_layers):
        b = f"blocks.{i}"
        z, pattern = cache[f"{b}.attn.hook_z"], cache[f"{b}.attn.hook_pattern"]
        assert close(torch.einsum("bhqk,bkhd->bqhd", pattern, cache[f"{b}.attn.hook_v"]), z)
        # (no check of hook_attn_scores against the pattern: TransformerLens 4.3's natively booted bridge feeds its
        # attention weights, after the softmax, to hook_attn_scores; the capture gives what the hook point got)
        attn_out = torch.einsum("bqhd,hdm->bqm", z, model.W_O[i]) + model.b_O[i]
        assert close(cache[f"{b}.hook_attn_out"], attn_out)
        assert close(cache[f"{b}.hook_resid_mid"], cache[f"{b}.hook_resid_pre"] + attn_out)
        assert close(cache[f"{b}.mlp.hook_post"], F.gelu(cache[f"{b}.mlp.hook_pre"]))
        mlp_out = cache[f"{b}.mlp.hook_post"] @ model.W_out[i] + model.b_out[i]
        assert close(cache[f"{b}.hook_mlp_out"], mlp_out)
        assert close(cache[f"{b}.hook_resid_post"], cache[f"{b}.hook_resid_mid"] + mlp_out)
        # per head: z_h W_O[h], summing (with b_O) to the attention output (3.9 only: TransformerLens 4.3's natively
        # booted bridge does not fire hook_result even with the flag on, nor does its own cache hold it)
        if model.cfg.use_attn_result and type(model).__name__ == "HookedTransformer":
            result = cache[f"{b}.attn.hook_result"]
            assert close(result, torch.einsum("bqhd,hdm->bqhm", z, model.W_O[i]))
            assert close(result.sum(2) + model.b_O[i], attn_out)
    assert torch.equal(cache.accumulated_resid(), own.accumulated_resid())
    assert torch.equal(cache.stack_activation("resid_post"), torch.stack([own[f"blocks.{i}.hook_resid_post"]
                                                                        for i in range(model.cfg.n_layers)]))


@pytest.mark.transformer
def test_transformer_lens_generate_inside_a_capture_records_each_step_as_its_hook_point_saw_it():
    model = transformer_lens_model()
    name = "blocks.1.hook_resid_post"
    seen = []
    handle = model.hook_dict[name].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with wb.capture(model, names=[name, "ln_final.hook_normalized"]) as cache:
            generated = model.generate(TOKENS[:1, :4], max_new_tokens=3, do_sample=False, verbose=False,
                                       stop_at_eos=False)
    handle.remove()
    steps = cache.calls(name)
    assert generated.shape == (1, 7) and len(steps) == len(seen) == 3
    assert all(torch.equal(a, b) for a, b in zip(steps, seen))
    assert len(cache.calls("ln_final.hook_normalized")) == 3 and not cache.failures


@pytest.mark.transformer
def test_transformer_lens_reads_of_a_name_captured_in_several_forwards_say_so():
    # Was: cache.accumulated_resid() raised TransformerLens's bare KeyError 'blocks.0.hook_resid_pre', and
    # cache["resid_post", 0] said the name "names no captured value", after two forwards in one capture block.
    model = transformer_lens_model()
    with wb.capture(model) as cache:
        model(TOKENS)
        model(TOKENS[:, :3])
    with pytest.raises(UnknownNameError, match=r"accumulated_resid needs 'blocks.0.hook_resid_pre', which fired 2 "
                                               r"times.*cache.calls"):
        cache.accumulated_resid()
    with pytest.raises(UnknownNameError, match=r"needs 'blocks.0.hook_resid_post', which fired 2 times"):
        cache["resid_post", 0]
    own = [model.run_with_cache(t)[1] for t in (TOKENS, TOKENS[:, :3])]
    assert all(torch.equal(a, b["blocks.0.hook_resid_post"])
               for a, b in zip(cache.calls("blocks.0.hook_resid_post"), own))
    with wb.capture(model) as one:  # one forward: TransformerLens's own numbers
        model(TOKENS)
    assert torch.equal(one.accumulated_resid(), own[0].accumulated_resid())
