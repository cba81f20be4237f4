"""``seed=`` everywhere: an int, None, a torch.Generator or a numpy Generator (scikit-learn's random_state)."""
import numpy as np
import pytest
import torch

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench._random import as_generator, as_seed


def test_an_int_is_its_own_effective_seed_and_the_other_kinds_reduce_to_one():
    assert as_seed(0) == 0 and as_seed(np.int64(12)) == 12
    assert as_seed(torch.Generator().manual_seed(3)) == as_seed(torch.Generator().manual_seed(3))
    assert as_seed(np.random.default_rng(3)) == as_seed(np.random.default_rng(3))
    # a shared generator advances: two calls draw two different seeds, as in scikit-learn
    g = np.random.default_rng(0)
    assert as_seed(g) != as_seed(g)
    # None is fresh randomness each call
    assert len({as_seed(None) for _ in range(4)}) == 4
    gen, value = as_generator(5)
    assert value == 5 and torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("bad", [True, False, "0", 1.5, [1], 2 ** 64])
def test_what_is_not_a_seed_is_refused_by_name(bad):
    with pytest.raises(InvalidOptionError, match="seed="):
        as_seed(bad)


def _verbs():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(120, 5, generator=g)
    y = acts[:, 0] > 0
    maps = torch.rand(6, 3, 2, 2, generator=g)
    masks = torch.rand(6, 2, 4, 4, generator=g) > 0.5
    return {
        "privileged_basis_test": lambda s: wb.probing.privileged_basis_test(acts, y, bases=["orthogonal"], n_bases=9,
                                                                            seed=s).null["orthogonal"],
        "basis_alignment": lambda s: wb.probing.basis_alignment(acts, n_bases=5, seed=s).null,
        "dissection_sweep": lambda s: torch.tensor(
            wb.probing.dissection_sweep(maps, masks, alphas=[1.0], quantile=0.2, seed=s).to_frame().iloc[:, -1].tolist()),
        "random_transform": lambda s: wb.similarity.random_transform(acts.double(), "orthogonal", seed=s),
        "shapes": lambda s: wb.data.shapes(3, size=16, seed=s).inputs,
        "sentences": lambda s: wb.data.sentences(4, seed=s).inputs,
        "synthetic_language": lambda s: wb.data.synthetic_language(4, seq_len=8, seed=s).inputs,
        "split": lambda s: wb.data.sentences(10, seed=0).split(0.5, seed=s)[0].inputs,
    }


@pytest.mark.parametrize("verb", list(_verbs()))
def test_every_random_verb_takes_every_kind_of_seed(verb):
    run = _verbs()[verb]
    same = run(7)
    assert torch.equal(same, run(7))  # same int, same numbers
    effective = as_seed(np.random.default_rng(1))
    assert torch.equal(run(np.random.default_rng(1)), run(effective))  # a generator's draw reproduces it
    assert torch.equal(run(torch.Generator().manual_seed(2)), run(as_seed(torch.Generator().manual_seed(2))))
    run(None)  # fresh randomness runs
    with pytest.raises(InvalidOptionError, match="seed='7' is not a seed"):
        run("7")


def test_the_report_records_the_effective_seed():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(60, 4, generator=g)
    t = wb.probing.privileged_basis_test(acts, acts[:, 0] > 0, bases=["orthogonal"], n_bases=5,
                                         seed=np.random.default_rng(4))
    again = wb.probing.privileged_basis_test(acts, acts[:, 0] > 0, bases=["orthogonal"], n_bases=5, seed=t.seed)
    assert torch.equal(t.null["orthogonal"], again.null["orthogonal"])


@pytest.mark.parametrize("bad", [True, "0", None, 1.0])
def test_zoo_seed_names_a_training_run_and_is_never_coerced(bad):
    with pytest.raises(InvalidOptionError, match=r"picks one of the shipped training runs.*\[0, 1, 2, 3(, \d+)*\]"):
        wb.zoo.load("myrtle_relu", seed=bad)
    assert wb.zoo.load("mlp_relu", seed=np.int64(1)) is not None
