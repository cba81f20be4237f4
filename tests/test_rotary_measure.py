"""Rotary pairs are measured on a copy of the model, never through the user's own hooks.

The measurement runs attention with queries and keys replaced and reads the pattern. A hook the user
left on the model (a permanent one, or one on a HookPoint) between ``hook_q``/``hook_k`` and
``hook_pattern`` would change what is read, and the pairs are kept per configuration, so one hooked
model would give every later model of that configuration the wrong query/key group.
"""
import pytest
import torch

from conftest import make_transformer
from workbench.symmetry import _rotary_pairs
from workbench.symmetry._layout_push import clone

pytestmark = pytest.mark.transformer


def _rotary64():
    return clone(make_transformer(positional_embedding_type="rotary", normalization_type="RMS", seed=3), torch.float64)


def test_a_users_hook_does_not_reach_the_rotary_measurement(monkeypatch):
    monkeypatch.setattr(_rotary_pairs, "_PAIRS", {})
    plain = _rotary64()
    truth = _rotary_pairs._measure_pairs(clone(plain, torch.float64), 0)
    assert len(truth) == int(plain.cfg.d_head) // 2  # every dimension has a partner

    model = _rotary64()
    g = torch.Generator().manual_seed(0)
    calls = []

    def scramble(pattern, hook):  # the user's own analysis hook: it rewrites the attention pattern
        calls.append(hook.name)
        return pattern.flip(-1) + torch.rand(pattern.shape, generator=g, dtype=pattern.dtype)

    model.hook_dict["blocks.0.attn.hook_pattern"].add_hook(scramble, is_permanent=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = _rotary_pairs.rotary_pairs(model, 0)
    assert not calls  # the measurement never ran the user's model
    assert got == truth
    # the user's hook is still there and still fires on the user's model; nothing was written
    model(torch.zeros(1, 4, dtype=torch.long))
    assert calls and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and what was kept for this configuration is the truth for a model without hooks
    assert _rotary_pairs.rotary_pairs(plain, 0) == truth
