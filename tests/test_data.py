"""Concept data sets: determinism, shapes and dtypes, concept/mask consistency, loaders, reprs, errors."""
import base64
import re

import pytest
import torch

import workbench as wb
from hypothesis import given, settings, strategies as st

from workbench.data import (IGNORE_INDEX, ConceptDataset, decode, digits, encode, sentences, shapes,
                            synthetic_language, unigram_entropy)
from workbench.data._language import _CLASSES
from workbench.data._shapes import BACKGROUNDS, COLOURS, SHAPES
from workbench.data._text import WORDS


@pytest.fixture(scope="module")
def shp():
    return shapes(240, size=24, seed=0)


@pytest.fixture(scope="module")
def lang():
    return synthetic_language(300, seq_len=24, seed=0)


def test_shapes_types_and_layout(shp):
    assert shp.inputs.dtype == torch.float32 and shp.inputs.shape == (240, 3, 24, 24)
    assert 0 <= shp.inputs.min() and shp.inputs.max() <= 1
    assert shp.labels.dtype == torch.int64 and shp.labels.shape == (240,)
    k = len(shp.concept_names)
    assert shp.concepts.dtype == torch.bool and shp.concepts.shape == (240, k)
    assert shp.masks.dtype == torch.bool and shp.masks.shape == (240, k, 24, 24)
    assert shp.label_names == SHAPES and len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 3
    assert shp.vocab is None and shp.meta["generator"] == "shapes" and shp.meta["seed"] == 0


def test_shapes_same_seed_identical_different_seed_differs():
    threads = torch.get_num_threads()
    a, b, c = shapes(20, size=16, seed=3), shapes(20, size=16, seed=3), shapes(20, size=16, seed=4)
    assert torch.get_num_threads() == threads  # rendering restores the thread setting
    for name in ("inputs", "labels", "concepts", "segments"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.inputs, c.inputs)


def test_one_of_each_group_and_label_is_the_shape(shp):
    for group, names in shp.concept_groups.items():
        if group in ("shape", "colour", "texture", "size", "position", "background"):
            assert (shp.concepts[:, [shp.concept_names.index(n) for n in names]].sum(1) == 1).all(), group
    shape_onehot = shp.concepts[:, : len(SHAPES)]
    assert torch.equal(shape_onehot.float().argmax(1), shp.labels)
    assert shp.label_names[int(shp.labels[0])] == shp.concept_names[int(shp.labels[0])].split(":")[1]


def test_classes_are_balanced(shp):
    counts = torch.bincount(shp.labels, minlength=len(SHAPES))
    assert counts.max() - counts.min() <= 1


def _check_masks(ds):
    masks = ds.masks
    assert torch.equal(masks.flatten(2).any(2), ds.concepts)  # a present concept has pixels, and only then
    obj = ds.segments == 1
    for name in ds.concept_names:  # object concepts lie on the object, background ones off it
        m = ds.mask(name)
        if name.startswith(("shape:", "colour:", "texture:", "size:", "position:")):
            assert not (m & ~obj).any(), name
        elif name.startswith("background:"):
            assert not (m & obj).any(), name
    assert obj.flatten(1).any(1).all()


def test_masks_agree_with_concepts_and_regions(shp):
    _check_masks(shp)
    # the position concept says where the object is
    left = shp.concept("top-left") | shp.concept("bottom-left")
    cols = torch.arange(24).float()
    centre_x = (shp.segments == 1).float().mul(cols).sum((1, 2)) / (shp.segments == 1).sum((1, 2))
    assert (centre_x[left] < 14).float().mean() > 0.9 and (centre_x[~left] > 10).float().mean() > 0.9


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 12), size=st.integers(16, 28), seed=st.integers(0, 10**6),
       difficulty=st.floats(0, 1))
def test_shapes_masks_consistent_for_any_settings(n, size, seed, difficulty):
    ds = shapes(n, size=size, seed=seed, difficulty=difficulty)
    assert ds.inputs.shape == (n, 3, size, size) and torch.isfinite(ds.inputs).all()
    _check_masks(ds)


def test_difficulty_knobs_change_the_images():
    easy, hard = shapes(30, size=16, seed=1, difficulty=0.0), shapes(30, size=16, seed=1, difficulty=1.0)
    assert easy.meta["noise"] < hard.meta["noise"] and easy.meta["clutter"] < hard.meta["clutter"]
    clean = shapes(30, size=16, seed=1, noise=0.0, clutter=0)
    assert not clean.concept("clutter").any()


def test_loader_split_and_subset(shp):
    x, y = next(iter(shp.loader(batch_size=32)))
    assert x.shape == (32, 3, 24, 24) and torch.equal(y, shp.labels[:32])
    seen = torch.cat([y for _, y in shp.loader(batch_size=50, shuffle=True, seed=1)])
    assert len(seen) == 240 and torch.equal(seen.sort().values, shp.labels.sort().values)
    again = torch.cat([y for _, y in shp.loader(batch_size=50, shuffle=True, seed=1)])
    assert torch.equal(seen, again)
    plain = torch.utils.data.DataLoader(shp, batch_size=16)  # the ordinary per-item protocol works too
    xb, yb = next(iter(plain))
    assert torch.equal(xb, shp.inputs[:16]) and torch.equal(yb, shp.labels[:16])

    train, test = shp.split(0.75, seed=2)
    assert (len(train), len(test)) == (180, 60)
    assert torch.equal(shp.split(0.75, seed=2)[0].inputs, train.inputs)
    assert not torch.equal(shp.split(0.75, seed=3)[0].labels, train.labels)
    both = torch.cat([train.inputs, test.inputs]).flatten(1).sum(1).sort().values
    assert torch.allclose(both, shp.inputs.flatten(1).sum(1).sort().values)

    sub = shp.subset([5, 7])
    assert len(sub) == 2 and torch.equal(sub.masks, shp.masks[[5, 7]]) and sub.concept_names == shp.concept_names
    assert torch.equal(shp.subset(shp.labels == 0).labels, shp.labels[shp.labels == 0])


def test_concept_lookup_and_frame(shp):
    assert torch.equal(shp.concept("circle"), shp.concept("shape:circle"))
    with pytest.raises(KeyError, match=r"no concept named 'circel'.*Did you mean 'shape:circle'"):
        shp.concept("circel")
    frame = shp.to_frame()
    assert list(frame.columns) == ["concept", "group", "count", "prevalence"]
    assert frame.set_index("concept").loc["shape:circle", "count"] == int(shp.concept("circle").sum())


def test_reprs_are_inline_and_short(shp, lang):
    assert "\n" not in repr(shp) and "shapes" in repr(shp) and "f32[240,3,24,24]" in repr(shp)
    page = shp.subset(range(8))._repr_html_()
    png = re.search(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]{100,})'", page)
    assert png and "http" not in page
    assert base64.b64decode(png.group(1)).startswith(b"\x89PNG") and b"http" not in base64.b64decode(png.group(1))
    text = sentences(4)._repr_html_()
    assert "<span" in text and "http" not in text and "<img" not in text
    assert "http" not in lang._repr_html_()


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"n must be a positive int.*n=0"):
        shapes(0)
    with pytest.raises(ValueError, match=r"size must be an int >= 16.*size=8"):
        shapes(4, size=8)
    with pytest.raises(ValueError, match="difficulty must lie in"):
        shapes(4, difficulty=2)
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        digits(size=4)
    with pytest.raises(ValueError, match="n must be a positive int"):
        sentences(-1)
    with pytest.raises(ValueError, match="seq_len must be an int >= 4"):
        synthetic_language(3, seq_len=2)
    with pytest.raises(ValueError, match="fraction must lie strictly between 0 and 1"):
        sentences(3).split(1.0)
    with pytest.raises(KeyError, match=r"token 'kat' is not in the vocabulary.*'cat'"):
        sentences(2).encode("the kat")
    with pytest.raises(ValueError, match="need a text data set"):
        shapes(2, size=16).decode([1, 2])


def test_digits():
    ds = digits(size=16)
    assert ds.inputs.shape == (1797, 1, 16, 16) and ds.inputs.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    assert torch.equal(ds.concept("loop"), torch.isin(ds.labels, torch.tensor([0, 6, 8, 9])))
    assert torch.equal(ds.concept("even"), ds.labels % 2 == 0)
    assert torch.equal(ds.masks.flatten(2).any(2), ds.concepts)
    small, other = digits(size=8), digits(size=8, seed=1)
    assert torch.equal(small.inputs, digits(size=8).inputs) and not torch.equal(other.labels, small.labels)
    assert torch.allclose(small.inputs.mean(), ds.inputs.mean(), atol=0.05)  # upsampling keeps the ink


def test_sentence_concepts_align_with_tokens():
    ds = sentences(200, seed=0)
    n, t = ds.inputs.shape
    assert ds.inputs.dtype == torch.int64 and ds.concepts.shape == (n, t, len(ds.concept_names))
    for concept, classes in [("colour", ["colour"]), ("number", ["number"]), ("country", ["country"]),
                             ("animal", ["animal", "animals"]), ("plural_noun", ["animals", "objects"]),
                             ("punctuation", ["punctuation"])]:
        words = {ds.vocab[i] for i in ds.inputs[ds.concept(concept)].tolist()}
        allowed = {w for c in classes for w in WORDS[c]}
        assert words and words <= allowed, concept
        # and every such word is labelled
        ids = torch.tensor([ds.vocab.index(w) for w in allowed])
        assert torch.equal(torch.isin(ds.inputs, ids), ds.concept(concept))
    assert ds.concept("first_word")[:, 1].all() and ds.concept("first_word").sum() == n
    pad = ds.inputs == ds.meta["pad_id"]
    assert pad.any() and not ds.concepts[pad].any()  # padding carries no concept
    assert (ds.labels[pad] == IGNORE_INDEX).all()
    real = ds.labels != IGNORE_INDEX
    assert torch.equal(ds.labels[:, :-1][real[:, :-1]], ds.inputs[:, 1:][real[:, :-1]])
    assert torch.equal(sentences(200, seed=0).inputs, ds.inputs) and not torch.equal(sentences(200, seed=1).inputs, ds.inputs)


def test_encode_decode_round_trip():
    ds = sentences(5)
    assert ds.encode(ds.decode(ds.inputs[0])).tolist() == ds.inputs[0][ds.inputs[0] != 0].tolist()
    assert decode(encode("The cat.", ds.vocab), ds.vocab) == "the cat ."


def test_synthetic_language_structure(lang):
    x, y = lang.inputs, lang.labels
    assert x.shape == y.shape == (300, 24) and x.dtype == y.dtype == torch.int64
    assert (x[:, 0] == 0).all() and torch.equal(y[:, :-1], x[:, 1:])
    assert 64 <= len(lang.vocab) <= 128 and int(x.max()) < len(lang.vocab)
    assert lang.meta["entropy_rate"] < unigram_entropy(lang) - 1.0  # learnable well below unigram
    # brackets match: a closing bracket always closes the last open one of the same type
    pairs = dict(zip(_CLASSES["close"], _CLASSES["open"]))
    for row in lang.decode(torch.cat([x, y[:, -1:]], 1)):
        stack = []
        for tok in row.split():
            if tok in _CLASSES["open"]:
                stack.append(tok)
            elif tok in pairs:
                assert stack.pop() == pairs[tok]
    # token-class concepts partition the tokens; depth parity implies being inside brackets
    cls = lang.concepts[..., :9]
    assert (cls.sum(-1) == 1).all()
    assert not (lang.concept("depth_odd") & ~lang.concept("in_brackets")).any()
    assert torch.equal(lang.concept("bos"), x == 0)
    verbs = lang.concept("verb")
    agree = lang.concept("plural")[verbs] == lang.concept("subject_plural")[verbs]
    assert agree.all()  # verbs agree with their subject, across clauses


def test_synthetic_language_is_deterministic(lang):
    assert torch.equal(synthetic_language(300, seq_len=24, seed=0).inputs, lang.inputs)
    assert not torch.equal(synthetic_language(300, seq_len=24, seed=1).inputs, lang.inputs)


def test_generic_dataset_checks_its_parts():
    with pytest.raises(ValueError, match="labels has 3 rows but inputs has 4"):
        ConceptDataset(torch.zeros(4, 2), torch.zeros(3), label_names=[], concept_names=["a"],
                       concepts=torch.zeros(4, 1))


def test_retokenize_sentences_for_minilm_word_pieces_inherit_concepts():
    tok = wb.zoo.load("minilm").tokenizer
    ds = wb.data.sentences(20, seed=3)
    pieces = wb.data.retokenize(ds, tok)
    assert pieces.inputs.shape == (20, max(pieces.meta["pieces"])) and pieces.labels is None
    for i in range(20):
        words = [w for w in ds.decode(ds.inputs[i]).split() if w not in ("<bos>", "<pad>")]
        ids = pieces.inputs[i, :pieces.meta["pieces"][i]].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        expected = [p for w in words for p in tok(w, add_special_tokens=False)["input_ids"]]
        assert ids[1:-1] == expected  # every word's pieces, in order: nothing lost or added
        assert (pieces.inputs[i, len(ids):] == tok.pad_token_id).all() and not pieces.concepts[i, len(ids) - 1:].any()
    colour = pieces.concept("colour")
    assert colour.any() and all(tok.convert_ids_to_tokens(int(t)) in wb.data._text.WORDS["colour"]
                                for t in pieces.inputs[colour])
    assert pieces.concept("first_word")[:, 1].all() and pieces.concept("first_word").sum() == 20
    with pytest.raises(wb.InvalidOptionError, match="too short"):
        wb.data.retokenize(ds, tok, length=5)
    with pytest.raises(wb.InvalidOptionError, match="token-level text"):
        wb.data.retokenize(wb.data.digits(10), tok)
