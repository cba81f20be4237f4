"""Hugging Face's convolutional image models — ResNet, ConvNeXt (v1, v2), MobileNetV2, EfficientNet, RegNet — read
through their torch.fx trace (the graph backend), as their torchvision twins are: an attention-free ``pixel_values``
model of a family the layout does not read (``models._kind.is_traced_hf``) is traced through its decorated forward
with ``return_dict=True`` and ``output_hidden_states=False`` fixed (``_trace.hf_root``) and the example's shapes
(``_trace._ShapedProxy``: the embeddings' channel check, MobileNet's TensorFlow padding). A transformer keeps the layout.

Each family is a tiny random float64 model with every parameter random (BatchNorm running statistics, LayerNorm gains
and ConvNeXt's layer scale too: a fresh model's 1s and 0s, or its near-zero layer scale, would let a wrong transform
pass). The groups are the torchvision twins' (docs/DERIVATIONS.md: ReLU scaled permutations, ReLU6/GELU/SiLU
permutations, linear bottlenecks GL, ConvNeXt's stream s·P with its channels-first LayerNorm). Function preservation is
computed **directly** (both models run here, logits compared to 1e-10 of each row's largest |logit|); negative controls
force an element outside a site's group and must move the logits.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.models import has_layout, is_traced_hf

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")

F64, TOL, FAIL = torch.float64, 1e-10, 1e-6
PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=F64)

# family -> (class, config class, config keywords, {site group: count}): the groups as the torchvision twin's derivation
# gives them for this architecture.
FAMILIES = {
    # bottleneck blocks, ReLU: every site a scaled permutation (3 per stage; the stem shares stage 0's stream)
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=5),
               {"scaled_permutation": 12}),
    # per stage: the stream (LayerNorms with gains: s·P) and the MLP's hidden space (GELU: permutations)
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=5),
                 {"permutation_with_sign": 4, "permutation": 4}),
    # ReLU6 expansions (permutations) and the linear bottlenecks between blocks (GL), as torchvision's mobilenet_v2
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", dict(depth_multiplier=0.25, num_labels=5),
                     {"permutation": 18, "gl": 7}),
    # SiLU expansions and squeeze-excite reductions (permutations), linear bottlenecks (GL); the stem's ZeroPad2d and the
    # depthwise EfficientNetDepthwiseConv2d (an nn.Conv2d subclass with its forward) are read as what they are
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=5, image_size=32),
                     {"permutation": 15, "gl": 7}),
    # ReLU (scaled permutations); a grouped convolution's output read by the squeeze-excite gate (ReLU, then a sigmoid
    # gate multiplying it): grouped permutations (the first stage's, of one group: permutations)
    "regnet": ("RegNetForImageClassification", "RegNetConfig",
               dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], groups_width=8, num_labels=5),
               {"scaled_permutation": 10, "permutation": 1, "grouped_permutation": 3}),
}


def lively(model, seed: int = 0):
    """Every parameter and BatchNorm statistic of ``model`` random in float64, in place: convolutions and Linears
    torch's default init (Hugging Face's N(0, 0.02) leaves a deep net's logits constant), BatchNorm statistics and
    affine parts and LayerNorm gains around 1, biases N(0, 0.1²), layer scales and ConvNeXt V2's GRN γ, β U(0.5, 1.5)."""
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        for m in norms:  # statistics of a batch of 16 images (made-up ones let a deep net's signal die out)
            m.reset_running_stats()
            m.momentum = None
        model.train()(pixel_values=torch.randn(16, 3, 32, 32, dtype=F64))
        model.eval()
        for m in norms:
            m.momentum = 0.1
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        for name, p in model.named_parameters():  # (full names: a GRN's own are "weight" and "bias")
            if "layer_scale" in name or ".grn." in name:
                p.uniform_(0.5, 1.5)
    return model


def build(family, cls=None, **kw):
    name, config, own, _ = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls or name)(getattr(transformers, config)(**{**own, **kw}))
    return lively(model.to(F64))


def logits(model, x=PIXELS):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel(new, old):
    """Largest |new − old| relative to each row's largest |old|, computed here."""
    new, old = new.flatten(1), old.flatten(1)
    return float(((new - old).abs() / old.abs().amax(-1, keepdim=True)).max())


def counts(smap) -> dict:
    out = {}
    for s in smap:
        out[s.group.name] = out.get(s.group.name, 0) + 1
    return out


@pytest.fixture(scope="module")
def models():
    cache = {}
    return lambda family: cache.setdefault(family, build(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_traced_with_the_twins_groups_and_a_random_element_is_exact(family, models):
    model = models(family)
    assert is_traced_hf(model) and not has_layout(model)
    assert float(logits(model).std(0).max()) > 1e-3  # the logits depend on the input (a dead net would hide anything)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smap = wb.symmetry_map(model, example=PIXELS)
    # nothing skipped but the model's output (the classifier writes it)
    assert [why for _, why in smap.skipped] == ["the model's output"], smap.skipped
    expected = FAMILIES[family][3]
    if expected is not None:
        assert counts(smap) == expected, counts(smap)
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert len(t.elements) == len(smap)
    assert rel(logits(new), logits(model)) <= TOL
    assert any(not torch.equal(p, q) for p, q in zip(new.parameters(), model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original untouched
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed, report.summary()
    # every site moved whose drawn element is not the identity (EfficientNet's squeeze-excite reductions have 2 channels:
    # half their permutations are)
    eye = {s.name: torch.eye(s.n, dtype=F64) for s in smap}
    identity = {n for n, e in t.elements.items() if torch.equal(e.act(eye[n], 0), eye[n])}
    assert all(c.representation_change > 100 * TOL for c in report.checked if c.site not in identity), report.summary()
    assert len(report.checked) == len(smap)


# (family, a site, a group just outside its own, inputs that reach the nonlinearity's kink or clip)
NEGATIVE = [
    ("resnet", "resnet.encoder.stages.0.layers.0.layer.0.activation", "orthogonal", PIXELS),
    ("convnext", "convnext.encoder.stages.0.layers.0.pwconv1", "orthogonal", PIXELS),
    # a positive scaling at a ReLU6 site: wrong only where an activation passes 6, so inputs ×20
    ("mobilenet_v2", "mobilenet_v2.conv_stem.first_conv.activation", "scaled_permutation", 20 * PIXELS),
    ("regnet", "regnet.embedder.embedder.activation", "orthogonal", PIXELS),
]


@pytest.mark.parametrize("family, site, group, x", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_an_element_outside_the_group_changes_the_logits(family, site, group, x, models):
    model = models(family)
    with pytest.raises(ValueError, match="not a symmetry"):
        wb.random_intertwiner(model, sites=[site], group=group, example=PIXELS)
    bad, bt = wb.random_intertwiner(model, seed=3, sites=[site], group=group, allow_non_symmetry=True, example=PIXELS)
    assert rel(logits(bad, x), logits(model, x)) > FAIL
    assert not wb.verify(model, bad, x, transform=bt).passed


def test_efficientnet_silu_site_takes_no_scaling(models):
    """SiLU is not positively homogeneous: a scaled permutation at an expansion's SiLU changes the logits."""
    model = models("efficientnet")
    smap = wb.symmetry_map(model, example=PIXELS)
    site = next(s.name for s in smap if s.group.name == "permutation" and "expand" in s.name)
    bad, bt = wb.random_intertwiner(model, seed=3, sites=[site], group="scaled_permutation", allow_non_symmetry=True,
                                    example=PIXELS)
    assert rel(logits(bad), logits(model)) > FAIL
    assert not wb.verify(model, bad, PIXELS, transform=bt).passed


def test_convnext_channels_first_layernorm_is_read_on_axis_1(models):
    """ConvNextLayerNorm(data_format="channels_first") normalises axis 1 (Hugging Face writes it as permute, nn.LayerNorm,
    permute back): the stream site after the patch embedding carries its gain, and a rotation of that stream — which a
    LayerNorm with random gains does not let pass — changes the logits."""
    model = models("convnext")
    smap = wb.symmetry_map(model, example=PIXELS)
    stem = smap["convnext.embeddings.patch_embeddings"]
    assert stem.group.name == "permutation_with_sign" and stem.n == 8
    assert "convnext.embeddings.layernorm.weight" in {p.name for p in stem.writers}
    assert model.convnext.embeddings.layernorm.data_format == "channels_first"
    bad, bt = wb.random_intertwiner(model, seed=3, sites=[stem.name], group="orthogonal", allow_non_symmetry=True,
                                    example=PIXELS)
    assert rel(logits(bad), logits(model)) > FAIL
    # the sign part is exact, moved through the channels-first norm by hand: negate the stem's output channels (conv
    # rows and bias), and the LayerNorm's bias — LN(−x) = −LN(x) before the gain
    by_hand = copy.deepcopy(model)
    e = by_hand.convnext.embeddings
    with torch.no_grad():
        e.patch_embeddings.weight.neg_()
        e.patch_embeddings.bias.neg_()
        e.layernorm.bias.neg_()
        stage0 = by_hand.convnext.encoder.stages[0].layers[0]
        stage0.dwconv.bias.neg_()  # the depthwise conv reads the stream channel by channel
        stage0.layernorm.bias.neg_()  # (channels last: the same rule)
        stage0.pwconv1.weight.neg_()  # the reader of a negated norm output takes the sign in its columns
        stage0.pwconv2.weight.neg_()
        stage0.pwconv2.bias.neg_()
        nxt = by_hand.convnext.encoder.stages[1].downsampling_layer
        nxt[0].bias.neg_()
        nxt[1].weight.neg_()
    assert rel(logits(by_hand), logits(model)) <= TOL


def test_convnext_v2_grn_moves_with_the_mlp_hidden_space():
    """ConvNeXt V2's GRN (``ConvNextV2GRN``, channels last: x + γ·x·‖x‖/mean‖x‖ + β) reads the MLP's hidden space and
    stays in it: after GELU that space is a permutation site with γ and β permuted (docs/DERIVATIONS.md §4, GRN; was a
    skipped place: 4 sites, 37 places). γ and β random (a fresh GRN's zeros make it the identity)."""
    model = lively(transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**FAMILIES["convnext"][2]))
                   .to(F64))
    smap = wb.symmetry_map(model, example=PIXELS)
    assert counts(smap) == {"permutation_with_sign": 4, "permutation": 4}
    assert [r for _, r in smap.skipped] == ["the model's output"]
    hidden = [s for s in smap if s.name.endswith("pwconv1")]
    assert len(hidden) == 4 and all({f"{s.name[:-len('pwconv1')]}grn.{a}" for a in ("weight", "bias")}
                                    <= {p.name for p in s.writers} for s in hidden)
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert rel(logits(new), logits(model)) <= TOL
    assert wb.verify(model, new, PIXELS, transform=t).passed
    layer = model.convnextv2.encoder.stages[0].layers[0]
    assert torch.equal(new.convnextv2.encoder.stages[0].layers[0].grn.weight,
                       layer.grn.weight[..., t.elements[hidden[0].name].perm])
    for attr in ("weight", "bias"):  # γ or β left in place
        kept = copy.deepcopy(new)
        with torch.no_grad():
            getattr(kept.convnextv2.encoder.stages[0].layers[0].grn, attr).copy_(getattr(layer.grn, attr))
        assert rel(logits(kept), logits(model)) > FAIL


def test_base_model_output_and_model_output_types(models):
    """A base model (ResNetModel) returns last_hidden_state and pooler_output: both are exact, and verify compares the
    last hidden state (the ModelOutput's tensor, as for the layout's models)."""
    model = build("resnet", "ResNetModel")
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    with torch.no_grad():
        a, b = model(pixel_values=PIXELS), new(pixel_values=PIXELS)
    assert type(a).__name__ == "BaseModelOutputWithPoolingAndNoAttention"
    assert rel(b.last_hidden_state, a.last_hidden_state) <= TOL and rel(b.pooler_output, a.pooler_output) <= TOL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed
    # a classifier's ModelOutput: verify compares its logits
    clf = models("resnet")
    assert type(clf(pixel_values=PIXELS)).__name__ == "ImageClassifierOutputWithNoAttention"


def test_model_in_train_mode_is_mapped_and_verified_in_eval_mode(models):
    """A model left in train mode (BatchNorm on batch statistics) is traced and verified as it runs in eval mode, and
    is handed back in train mode."""
    model = copy.deepcopy(models("resnet")).train()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert model.training and all(m.training for m in model.modules())
    model.eval(), new.eval()
    assert rel(logits(new), logits(model)) <= TOL
    model.train()
    assert wb.verify(model, new, PIXELS, transform=t).passed and model.training


def test_options_and_shapes_fixed_in_the_trace_only(models):
    """The trace fixes return_dict and output_hidden_states; the model's own calls keep them (a tuple output, hidden
    states), and another batch size runs the transformed model exactly (the trace read the example's shapes only where
    the forward checks or pads by them)."""
    model = models("mobilenet_v2")
    new, _ = wb.random_intertwiner(model, seed=2, example=PIXELS)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        assert isinstance(new(pixel_values=x, return_dict=False), tuple)
        assert len(new(pixel_values=x, output_hidden_states=True).hidden_states) > 1
    assert rel(logits(new, x), logits(model, x)) <= TOL


def test_capture_records_module_paths(models):
    model = models("resnet")
    with wb.capture(model, names="resnet.encoder.stages.0.layers.0.layer.0.activation") as cache:
        model(pixel_values=PIXELS)
    assert cache["resnet.encoder.stages.0.layers.0.layer.0.activation"].shape == (3, 4, 8, 8)


def test_an_image_channel_mismatch_is_the_models_own_error(models):
    """The embeddings' channel check is read on the example: a wrong example is the model's own ValueError, named."""
    with pytest.raises(wb.UntraceableModelError, match="channel dimension"):
        wb.random_intertwiner(models("resnet"), example=torch.randn(1, 4, 32, 32, dtype=F64))


def test_transformers_keep_the_layout():
    """Models with attention keep the layout backend: a checked family (ViT, GPT-2), and an unchecked one (Swin), whose
    refusal is the layout's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8))
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
        swin = transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4))
    for m in (vit, gpt2, swin):
        assert has_layout(m) and not is_traced_hf(m)
    from workbench.symmetry._backend import backend_for

    assert backend_for(vit).name == backend_for(gpt2).name == backend_for(swin).name == "layout"


def test_every_family_the_layout_reads_has_a_head_count():
    """``is_traced_hf`` tells a traced model from a layout one by its configuration's head count (it cannot import the
    layout's family list: ``_hf`` imports ``_kind``): every checked family's default configuration has one."""
    from transformers import AutoConfig

    from workbench.models._hf import CHECKED_FAMILIES
    from workbench.models._kind import _HEAD_COUNTS

    for family in sorted(CHECKED_FAMILIES):
        config = AutoConfig.for_model(family)
        assert any(getattr(config, k, None) for k in _HEAD_COUNTS), family


class _ShapeConfig(transformers.PretrainedConfig):
    model_type = "shape_branch"  # (a family no layout reads, with no attention: traced with the example's shapes)

    def __init__(self, channels=4, **kw):
        super().__init__(**kw)
        self.channels = channels


class _ShapeBranch(transformers.PreTrainedModel):
    """A convolutional classifier whose forward picks one of two convolutions by the input's width."""

    config_class = _ShapeConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.small = nn.Conv2d(3, config.channels, 3, padding=1)
        self.large = nn.Conv2d(3, config.channels, 5, padding=2)
        self.head = nn.Linear(config.channels, 3)
        self.post_init()

    def forward(self, pixel_values, return_dict=None, output_hidden_states=None):
        conv = self.small if pixel_values.shape[-1] <= 16 else self.large
        logits = self.head(torch.relu(conv(pixel_values)).mean((-2, -1)))
        return transformers.modeling_outputs.ImageClassifierOutput(logits=logits)


# read as a model shipped with transformers (models._kind recognises those by their class's module)
_ShapeBranch.__module__ = "transformers.models.shape_branch.modeling_shape_branch"


def test_a_forward_choosing_modules_by_the_inputs_shape_is_refused_not_mapped_from_one_branch():
    """Traced with the example's shapes read as numbers, the forward records the branch that shape takes: the map of
    a 16-pixel example held the small convolution alone, its transform was exact at 16 pixels and changed the logits
    at 32 (by 3e-3, computed here), where the large convolution, never moved, reads the permuted head. Refused now,
    naming the module the trace never reached."""
    torch.manual_seed(0)
    model = _ShapeBranch(_ShapeConfig()).to(F64).eval()
    assert is_traced_hf(model)
    x16 = torch.randn(2, 3, 16, 16, dtype=F64)
    smap = wb.symmetry_map(model, example=x16)
    assert len(smap) == 0 and "never reaches ['large']" in smap.skipped[0][1], smap.skipped
    assert "specialised to inputs of shape (1, 3, 16, 16)" in smap.skipped[0][1]
    with pytest.raises(wb.UntraceableModelError, match=r"never reaches \['large'\]"):
        wb.random_intertwiner(model, seed=1, example=x16)
    with pytest.raises(wb.UntraceableModelError, match=r"never reaches \['small'\]"):
        wb.random_intertwiner(model, seed=1, example=torch.randn(2, 3, 32, 32, dtype=F64))


@pytest.mark.parametrize("example", [None, PIXELS])
def test_fold_layernorm_on_convnext_is_exact(example, models):
    """ConvNeXt's LayerNorms (channels-last in the blocks, channels-first in the stem and the downsampling layers) fold
    where their readers take the gain, the rest kept: the logits computed here agree to 1e-10. fold_layernorm traced the
    model without the example's shapes and refused on the embeddings' channel check, asking for an example it then
    did not use."""
    model = models("convnext")
    assert len(model.convnext.encoder.stages) == 4
    folded = wb.fold_layernorm(model, example=example)
    assert rel(logits(folded), logits(model)) <= TOL
    norms = [(n, m) for n, m in folded.named_modules() if isinstance(m, nn.LayerNorm)]
    moved = [n for n, m in norms if torch.equal(m.weight, torch.ones_like(m.weight))]
    assert moved and all(not torch.equal(dict(model.named_modules())[n].weight, torch.ones_like(m.weight)) for n, m in norms
                         if n in moved), moved  # some gains moved into their readers (each was not 1 before)


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_verify_on_images_of_another_size_than_the_maps_example(family, models):
    """The map is traced on 32-pixel images; verify on 48-pixel ones gives the verdict computed here: PASS for a random
    element (logits within 1e-10), FAIL for a rotation forced at every site (logits moved beyond 1e-6)."""
    model, x48 = models(family), torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=F64)
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert rel(logits(new, x48), logits(model, x48)) <= TOL
    assert wb.verify(model, new, x48, transform=t).passed
    bad, bt = wb.random_intertwiner(model, seed=1, example=PIXELS, group="orthogonal", allow_non_symmetry=True)
    assert rel(logits(bad, x48), logits(model, x48)) > FAIL
    assert not wb.verify(model, bad, x48, transform=bt).passed
