"""Dynamic rotary embeddings (``rope_type: "dynamic"``), whose forward changes the model: an input longer than the
cached length (max_position_embeddings at first) grows the embedding's inv_freq (NTK scaling for that length) and sets
the cached length; the next input shorter than max_position_embeddings resets both (transformers'
``dynamic_rope_update``). An embedding with rotary parameters per kind of layer (OLMo 3, Gemma 3:
``rope_parameters={"sliding_attention": {...}, "full_attention": {"rope_type": "dynamic", ...}}``) keeps each kind's
length under the kind's prefix (``full_attention_max_seq_len_cached``), and its growth also sets an unprefixed
``attention_scaling`` that its forward never reads.

A per-pair rotation commutes with the rotation of that pair by any angle, so the rotary group holds whatever inv_freq
the embedding has grown to; what a transformed model must carry is the state, so that it grows and resets where the
original does. OLMo 3 and Gemma 3 were refused after a forward longer than max_position_embeddings ("the configuration
was edited": that unprefixed attention_scaling, and after a reset an integer ``full_attention_max_seq_len_cached``,
read as settings the class does not build). Their state is carried now and left out of the settings check.

The function is computed here on copies of the models themselves (their state kept: ``as_raw`` would rebuild a fresh
one), RMSNorms given their formula in float64 and SDPA attention, the same sequence of input lengths run on the
original and on the transformed model, each step's log-probabilities held to 1e-10 relative. Hugging Face's own
forward, its RMSNorms in float32, differs by ~1e-7 between a model and its transform whether or not it has grown
(OLMo 3 8.8e-8 grown and never grown): rounding, not state.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_derivations import exact_norms
from test_hf_families import DECODER, IDS, TOL, bridge, random_model, rel

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
KINDS = ["sliding_attention", "full_attention"]
FAMILIES = {  # family: (class, config class, config keywords, norm gain around)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"rope_parameters": {**DYNAMIC, "rope_theta": 10000.0}}, 1.0),
    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config",
              {"sliding_window": 4, "layer_types": KINDS,
               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {**DYNAMIC, "rope_theta": 500000.0}}}, 1.0),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",  # gains 1 + w
               {"head_dim": 8, "sliding_window": 4, "layer_types": KINDS,
                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {**DYNAMIC, "rope_theta": 1000000.0}}}, 0.0),
}
LONG = 40  # > max_position_embeddings (16)


def build(family, seed=0):
    cls, config_cls, kw, gain = FAMILIES[family]
    return random_model(cls, config_cls, {**DECODER, **copy.deepcopy(kw)}, seed, gain=gain)


def ids(n, seed=0):
    return torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(seed))


def forward(model, n):
    """``model``'s own forward on an input of ``n`` tokens (its rotary state changes as it would)."""
    with torch.no_grad():
        model(ids(n))


def runs(model, lengths):
    """Log-probabilities of a copy of ``model`` (its state kept), exact in float64, on inputs of ``lengths`` in turn
    (a bridge's own forward: its attention in float64)."""
    model = exact_norms(copy.deepcopy(model))
    if wb.models.model_kind(model) == wb.models.ModelKind.HF_BRIDGE:
        logits = lambda x: model(x)  # noqa: E731
    else:
        model.config._attn_implementation = "sdpa"
        logits = lambda x: model(input_ids=x).logits  # noqa: E731
    with torch.no_grad():
        return [logits(ids(n)).double().log_softmax(-1) for n in lengths]


def rotary(model):
    """The Hugging Face rotary embedding of ``model`` (in a bridge, the module its component wraps)."""
    m = getattr(model, "original_model", model).model.rotary_emb
    return getattr(m, "_original_component", m)


def bridged(family, tmp_path_factory):
    raw = build(family)
    raw.config.architectures = [FAMILIES[family][0]]
    return bridge(raw, tmp_path_factory.getbasetemp()).eval()


def carried(model, lengths, seed=1):
    """The largest relative change of the log-probabilities over ``lengths`` (in turn) from ``model`` to a random
    element of every site; and that element's model and transform."""
    new, t = wb.random_intertwiner(model, seed=seed)
    return max(rel(b, a) for a, b in zip(runs(model, lengths), runs(new, lengths))), new, t


@pytest.mark.parametrize("family,bridge", [(f, False) for f in sorted(FAMILIES)] + [("olmo3", True)])
def test_a_grown_rotary_embedding_is_carried_to_the_transformed_model(family, bridge, tmp_path_factory):
    """After a 40-token forward: the transformed model grows and resets where the original does — a 20-token input
    (the original keeps the frequencies grown for 40), a 9-token one (it resets), then 20 (it grows for 20) and 40 —
    exact at every step. Negative control: the same transformed model with its grown length dropped (as built:
    max_position_embeddings) keeps the grown frequencies at the 9-token input where the original resets them."""
    model = bridged(family, tmp_path_factory) if bridge else build(family)
    forward(model, LONG)
    worst, new, t = carried(model, [20, 9, 20, LONG, 9])
    assert worst <= TOL
    length = "max_seq_len_cached" if family == "llama" else "full_attention_max_seq_len_cached"
    assert int(vars(rotary(new))[length]) == LONG
    dropped = copy.deepcopy(new)
    setattr(rotary(dropped), length, rotary(dropped).original_max_seq_len)
    assert rel(runs(dropped, [9])[0], runs(model, [9])[0]) > 1e-5
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed, report.summary()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_map_leaves_a_grown_bridge_as_it_was(family, tmp_path_factory):
    """symmetry_map lists a bridge's hooks, which runs a two-token probe through the user's model: a grown embedding
    reset there, and the model computed a 20-token input with frequencies for 20 where it had them for 40 (its
    log-probabilities moved by 9.7e-4 for Gemma 3, 5.2e-2 for OLMo 3, 6.5e-2 for Llama), the transformed model exact
    to the reset one all the same. Its state is restored after the probe: the same log-probabilities, bit for bit."""
    model = bridged(family, tmp_path_factory)
    forward(model, LONG)
    before = runs(model, [20])[0]
    wb.symmetry_map(model)
    assert int(rotary(model).max_seq_len_cached if family == "llama" else
               vars(rotary(model))["full_attention_max_seq_len_cached"]) == LONG
    assert torch.equal(runs(model, [20])[0], before)


@pytest.mark.parametrize("family", ["olmo3", "gemma3"])
def test_a_reset_per_kind_length_is_no_setting(family):
    """Grown, then reset by a short input: the kind's length is an integer again (16, where the class builds none);
    not read as an edited configuration. The kind's own attention scaling is still a setting: edited in the
    configuration (YaRN's attention factor on the full layers) it is refused, naming it."""
    model = build(family)
    forward(model, LONG)
    forward(model, 9)
    assert vars(rotary(model))["full_attention_max_seq_len_cached"] == 16
    assert carried(model, [9, 20, LONG, 20, 9])[0] <= TOL
    cls, config_cls, kw, gain = FAMILIES[family]
    yarn = {**kw["rope_parameters"], "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 4}}
    edited = random_model(cls, config_cls, {**DECODER, **kw, "rope_parameters": yarn}, 0, gain=gain)
    edited.config.rope_parameters["full_attention"]["attention_factor"] = 2.0
    with pytest.raises(wb.UnsupportedModelError, match="full_attention_attention_scaling .* builds 2.0"):
        wb.random_intertwiner(edited, seed=1)


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), seed=st.integers(0, 3),
       history=st.lists(st.integers(1, LONG), max_size=4), after=st.lists(st.integers(1, LONG), min_size=1, max_size=4))
def test_any_history_of_lengths_is_carried(family, seed, history, after):
    """Any history of forwards (short, long, long then short, …) on the original, then a transform, then any sequence
    of lengths on both: the same log-probabilities at every step."""
    model = build(family, seed)
    for n in history:
        forward(model, n)
    assert carried(model, after, seed=seed + 1)[0] <= TOL
