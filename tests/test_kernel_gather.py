"""Each code path of the 2-D gather-and-scale kernel (workbench/symmetry/_kernels_numba.py) gives torch's bits.

The kernel picks, per call and per specialisation, between:

- the row loop in the source's order (a row index that is a permutation: output row = its inverse) and
  in the output's order (no row index, or one with repeats, which ``_kernels`` does not rule out);
- the column indices read two per 64-bit load (int32, contiguous) and one at a time (int64, or a
  strided int32 view);
- whole 64-byte lines (vector loads, non-temporal stores) and the scalar head/tail of each row (an
  output that starts anywhere, rows shorter than a line), with a contiguous or a strided source.

Every path is forced here and compared bit for bit with torch's gathers (``gather_scale_into(...,
fast=False)``: ``index_select`` then the two in-place products), and the largest |src| it returns with
one computed directly. Nothing here is timed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.symmetry import _kernels

numba = pytest.importorskip("numba", reason="the compiled kernel needs numba (the dev extra installs it)")
F64 = torch.float64
INT = {torch.float32: torch.int32, F64: torch.int64}


def kernel_2d():
    kernels = _kernels._kernels()
    if kernels is None:
        pytest.skip("the compiled kernels are off (WORKBENCH_NUMBA=0)")
    return kernels[0]


def reference(src, p, r, q, c):
    """torch's gathers and products, in the dtype of ``src`` (rows through index_select: repeats allowed)."""
    out = torch.empty(src.shape, dtype=src.dtype)
    _kernels.gather_scale_into(src, out, p, r, q, c, torch.empty_like, fast=False)
    return out


def run_kernel(src, p, r, q, c, *, index_dtype, offset, strided_q=False):
    """The compiled 2-D kernel called directly (so int64 and strided indices reach it), into an output
    that starts ``offset`` elements past a fresh allocation; returns (output, largest |src| it read)."""
    R, C = src.shape
    unsigned, mask = _kernels._BITS[src.dtype]
    store = torch.empty(R * C + offset, dtype=src.dtype)
    out = store[offset:].view(R, C)

    def index(perm):
        if perm is None:
            return None
        a = perm.numpy().astype(index_dtype)
        if strided_q:  # the same entries, every other one of a longer array
            wide = np.empty(2 * len(a), dtype=index_dtype)
            wide[::2] = a
            return wide[::2]
        return a

    def scale(s):
        return None if s is None else s.to(src.dtype).numpy()

    s_np = src.numpy()
    bits = kernel_2d()(s_np, out.numpy(), index(p), scale(r), index(q), scale(c), s_np.view(unsigned), mask,
                       out.data_ptr() % 64, 64 // src.element_size())
    return out, float(np.array([bits], dtype=unsigned).view(s_np.dtype)[0])


def assert_same(out, want):
    assert torch.equal(out.view(INT[out.dtype]), want.contiguous().view(INT[want.dtype]))


@st.composite
def cases(draw):
    R, C = draw(st.integers(1, 24)), draw(st.integers(1, 80))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    rows = draw(st.sampled_from(["none", "permutation", "repeats"]))
    cols = draw(st.booleans()) or rows == "none"  # at least one axis is gathered
    return (R, C, dtype, rows, cols, draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from([np.int32, np.int64])), draw(st.integers(0, 17)), draw(st.booleans()),
            draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_path_of_the_2d_kernel_gives_torchs_bits(case):
    R, C, dtype, rows, cols, rs, cs, index_dtype, offset, strided_src, strided_q, seed = case
    g = torch.Generator().manual_seed(seed)
    if strided_src:  # rows whose entries are not next to each other: one load each instead of a vector load
        src = torch.randn(R, 2 * C, generator=g, dtype=dtype)[:, ::2]
    else:
        src = torch.randn(R, C, generator=g, dtype=dtype)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, -3e-310, 1e30], dtype=dtype)
    with torch.no_grad():
        for k in range(int(torch.randint(0, 3, (1,), generator=g))):
            i, j = int(torch.randint(0, R, (1,), generator=g)), int(torch.randint(0, C, (1,), generator=g))
            src[i, j] = specials[(seed + k) % len(specials)]
    p = {"none": None, "permutation": torch.randperm(R, generator=g),
         "repeats": torch.randint(0, R, (R,), generator=g)}[rows]
    if rows == "repeats" and R > 1:
        p[0] = p[-1]  # at least one repeat: the output-order path
    q = torch.randperm(C, generator=g) if cols else None
    r = torch.exp(3.0 * torch.randn(R, generator=g, dtype=F64)) * torch.where(torch.rand(R, generator=g) < 0.3, -1.0,
                                                                                1.0).double() if rs else None
    c = torch.exp(3.0 * torch.randn(C, generator=g, dtype=F64)) if cs else None
    out, peak = run_kernel(src, p, r, q, c, index_dtype=index_dtype, offset=offset, strided_q=strided_q)
    assert_same(out, reference(src, p, r, q, c))
    read = src if p is None else src[p]  # the rows the kernel read (all of them for a permutation)
    a = read.abs()
    want = float("nan") if bool(a.isnan().any()) else float(a.max())
    assert (peak != peak and want != want) or peak == want


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_row_index_with_repeats_is_not_inverted(dtype):
    """The source-order loop writes output row inv[k] from source row k, which only exists for a
    permutation: with repeats some output rows have no source row. The kernel must see it and follow the
    output instead (a loop that inverted anyway would leave rows unwritten or write them twice)."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(64, 256, generator=g, dtype=dtype)
    p = torch.arange(64).flip(0)
    p[10] = p[11]  # row 53 is read twice, row 54 never
    q, r = torch.randperm(256, generator=g), torch.rand(64, generator=g, dtype=F64) + 0.5
    for index_dtype in (np.int32, np.int64):
        out, peak = run_kernel(src, p, r, q, None, index_dtype=index_dtype, offset=0)
        assert_same(out, reference(src, p, r, q, None))
        assert peak == float(src[p].abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rows", [False, True])
def test_large_weights_take_the_line_loop_and_give_torchs_bits(dtype, rows):
    """A weight of whole lines and more (the shapes a transform meets), through the public entry point: the
    permutations as torch gives them (int64, converted to int32 there), both scales."""
    g = torch.Generator().manual_seed(1)
    R, C = 300, 1027  # rows of 64 lines and some, starting at every offset within a line
    src = torch.randn(R, C, generator=g, dtype=dtype)
    src[17, 400] = float("nan") if rows else float("-inf")
    p = torch.randperm(R, generator=g) if rows else None
    q = torch.randperm(C, generator=g)
    r = torch.rand(R, generator=g, dtype=F64) + 0.5 if rows else None
    c = torch.rand(C, generator=g, dtype=F64) + 0.5
    kernel_2d()
    out = torch.empty_like(src)
    peak = _kernels.gather_scale_into(src, out, p, r, q, c, torch.empty_like, fast=True)
    assert_same(out, reference(src, p, r, q, c))
    assert (peak != peak) if rows else peak == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_a_conv_weight_through_the_3d_kernel_gives_torchs_bits(dtype, rows, cols):
    """``[out, in, kh, kw]``: the 3-D loop (next source row prefetched, max |src| taken as each entry moves,
    the scales read once per row and column), against torch's gathers, with a NaN or an inf in it."""
    g = torch.Generator().manual_seed(2)
    src = torch.randn(48, 40, 3, 3, generator=g, dtype=dtype)
    src[5, 7, 1, 2] = float("-inf") if cols else float("nan")
    p = torch.randperm(48, generator=g) if rows else None
    q = torch.randperm(40, generator=g) if cols else None
    r = torch.rand(48, generator=g, dtype=F64) + 0.5 if rows else None
    c = -(torch.rand(40, generator=g, dtype=F64) + 0.5) if cols else None
    kernel_2d()
    out = torch.empty_like(src)
    peak = _kernels.gather_scale_into(src, out, p, r, q, c, torch.empty_like, fast=True)
    assert_same(out, reference(src, p, r, q, c))
    assert peak == float("inf") if cols else peak != peak
