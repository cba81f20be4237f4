"""Parity: wb.similarity against an independent implementation written here from the paper's formulas.

Plain Python loops over float64 scalars (no matrix products, no Hungarian algorithm: the best
permutation is found by trying them all), on random activations and on intertwined ones — a
representation and its image under a random P·D₊ element, where every G_ReLU-invariant measure
must read exactly 1 and the rotation-invariant ones must not. Formulas (Godfrey et al. 2022 §5;
Kornblith et al. 2019; Song et al. 2012 for the unbiased HSIC):

- G_ReLU-Procrustes: each unit scaled to norm 1 over (examples, positions), not centred; cross-Gram
  C_ij = ⟨H1_i, H2_j⟩; d = sqrt((‖H1‖² + ‖H2‖² − 2·max_π Σ_i C_{i,π(i)}) / (4C)); report 1 − d.
- orthogonal / permutation Procrustes: both sets scaled to Frobenius norm 1; d² = min ‖A − BR‖² / 4.
- G_ReLU-CKA: channels centred and scaled to norm 1 over (examples, positions); K_ij = max_c
  Σ_p H_i[c, p]·H_j[c, p]; unbiased HSIC; CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)).
- standardised CKA: the same channels, K_ij = Σ_c Σ_p H_i[c, p]·H_j[c, p].
- linear CKA: examples flattened and centred over examples, K = XXᵀ; biased HSIC tr(KHLH)/(n − 1)².
"""
import itertools
import math

import pytest
import torch

import workbench as wb

S = wb.similarity
TOL = 1e-10


# ------------------------------------------------------------------------------- the reference, in loops
def to_lists(acts):
    """[N, C, P] nested lists of floats (a [N, C] input gets P = 1)."""
    a = acts.double().reshape(acts.shape[0], acts.shape[1], -1)
    return [[[float(a[n, c, p]) for p in range(a.shape[2])] for c in range(a.shape[1])] for n in range(a.shape[0])]


def samples(H):
    """[M, C] rows: every (example, position) is one sample of the C units."""
    N, C, P = len(H), len(H[0]), len(H[0][0])
    return [[H[n][c][p] for c in range(C)] for n in range(N) for p in range(P)]


def dot_units(R1, R2, i, j):
    return sum(r1[i] * r2[j] for r1, r2 in zip(R1, R2))


def unit_norm(R):
    C = len(R[0])
    norms = [math.sqrt(dot_units(R, R, c, c)) for c in range(C)]
    return [[r[c] / norms[c] if norms[c] > 0 else 0.0 for c in range(C)] for r in R]


def frob_norm(R):
    s = math.sqrt(sum(v * v for r in R for v in r))
    return [[v / s for v in r] for r in R]


def best_permutation_total(G):
    C = len(G)
    return max(sum(G[i][perm[i]] for i in range(C)) for perm in itertools.permutations(range(C)))


def ref_grelu_procrustes(A, B):
    R1, R2 = unit_norm(samples(A)), unit_norm(samples(B))
    C = len(R1[0])
    G = [[dot_units(R1, R2, i, j) for j in range(C)] for i in range(C)]
    n1 = sum(v * v for r in R1 for v in r)
    n2 = sum(v * v for r in R2 for v in r)
    return 1 - math.sqrt(max(n1 + n2 - 2 * best_permutation_total(G), 0.0) / (4 * C))


def ref_permutation_procrustes(A, B):
    R1, R2 = frob_norm(samples(A)), frob_norm(samples(B))
    C = len(R1[0])
    G = [[dot_units(R1, R2, i, j) for j in range(C)] for i in range(C)]
    return 1 - math.sqrt(max(2 - 2 * best_permutation_total(G), 0.0) / 4)


def ref_orthogonal_procrustes(A, B):
    """min_R ‖A − BR‖² = 2 − 2·(sum of singular values of BᵀA); the singular values as square roots of the
    eigenvalues of MᵀM, found by Jacobi rotations written out here."""
    R1, R2 = frob_norm(samples(A)), frob_norm(samples(B))
    C = len(R1[0])
    M = [[dot_units(R2, R1, i, j) for j in range(C)] for i in range(C)]
    S_ = [[sum(M[k][i] * M[k][j] for k in range(C)) for j in range(C)] for i in range(C)]
    for _ in range(100):  # cyclic Jacobi: zero every off-diagonal entry of the symmetric S in turn
        off = sum(S_[i][j] ** 2 for i in range(C) for j in range(C) if i != j)
        if off < 1e-30:
            break
        for p, q in itertools.combinations(range(C), 2):
            if abs(S_[p][q]) < 1e-300:
                continue
            theta = 0.5 * math.atan2(2 * S_[p][q], S_[q][q] - S_[p][p])
            c, s = math.cos(theta), math.sin(theta)
            for k in range(C):  # S ← JᵀSJ, columns then rows
                skp, skq = S_[k][p], S_[k][q]
                S_[k][p], S_[k][q] = c * skp - s * skq, s * skp + c * skq
            for k in range(C):
                spk, sqk = S_[p][k], S_[q][k]
                S_[p][k], S_[q][k] = c * spk - s * sqk, s * spk + c * sqk
    nuclear = sum(math.sqrt(max(S_[i][i], 0.0)) for i in range(C))
    return 1 - math.sqrt(max(2 - 2 * nuclear, 0.0) / 4)


def standardise_channels(H):
    N, C, P = len(H), len(H[0]), len(H[0][0])
    out = [[[0.0] * P for _ in range(C)] for _ in range(N)]
    for c in range(C):
        vals = [H[n][c][p] for n in range(N) for p in range(P)]
        mean = sum(vals) / len(vals)
        norm = math.sqrt(sum((v - mean) ** 2 for v in vals))
        for n in range(N):
            for p in range(P):
                out[n][c][p] = (H[n][c][p] - mean) / norm if norm > 0 else 0.0
    return out


def grelu_gram(H):
    Hs = standardise_channels(H)
    N, C, P = len(Hs), len(Hs[0]), len(Hs[0][0])
    return [[max(sum(Hs[i][c][p] * Hs[j][c][p] for p in range(P)) for c in range(C)) for j in range(N)] for i in range(N)]


def standardised_gram(H):
    Hs = standardise_channels(H)
    N, C, P = len(Hs), len(Hs[0]), len(Hs[0][0])
    return [[sum(Hs[i][c][p] * Hs[j][c][p] for c in range(C) for p in range(P)) for j in range(N)] for i in range(N)]


def linear_gram(H):
    N = len(H)
    X = [[v for ch in H[n] for v in ch] for n in range(N)]
    D = len(X[0])
    mean = [sum(X[n][d] for n in range(N)) / N for d in range(D)]
    X = [[X[n][d] - mean[d] for d in range(D)] for n in range(N)]
    return [[sum(X[i][d] * X[j][d] for d in range(D)) for j in range(N)] for i in range(N)]


def hsic_unbiased(K, L):
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sk = sum(Kt[i][j] for i in range(n) for j in range(n))
    sl = sum(Lt[i][j] for i in range(n) for j in range(n))
    kl = sum(Kt[i][k] * Lt[k][j] for i in range(n) for k in range(n) for j in range(n))
    return (trace + sk * sl / ((n - 1) * (n - 2)) - 2 * kl / (n - 2)) / (n * (n - 3))


def hsic_biased(K, L):
    n = len(K)
    def centred(M):
        row = [sum(M[i]) / n for i in range(n)]
        col = [sum(M[i][j] for i in range(n)) / n for j in range(n)]
        tot = sum(row) / n
        return [[M[i][j] - row[i] - col[j] + tot for j in range(n)] for i in range(n)]
    Kc, Lc = centred(K), centred(L)
    return sum(Kc[i][j] * Lc[i][j] for i in range(n) for j in range(n)) / (n - 1) ** 2


def cka(K, L, hsic):
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


REFERENCE = {
    "grelu_procrustes": ref_grelu_procrustes,
    "permutation_procrustes": ref_permutation_procrustes,
    "orthogonal_procrustes": ref_orthogonal_procrustes,
    "grelu_cka": lambda A, B: cka(grelu_gram(A), grelu_gram(B), hsic_unbiased),
    "standardized_cka": lambda A, B: cka(standardised_gram(A), standardised_gram(B), hsic_unbiased),
    "linear_cka": lambda A, B: cka(linear_gram(A), linear_gram(B), hsic_biased),
    "linear_cka_unbiased": lambda A, B: cka(linear_gram(A), linear_gram(B), hsic_unbiased),
}
GRELU_INVARIANT = {"grelu_procrustes", "grelu_cka", "standardized_cka"}


# ------------------------------------------------------------------------------- the data
def relu_acts(shape, seed):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    return torch.einsum("nc...,dc->nd...", z, mix).relu() + 0.01 * torch.rand(*shape, generator=g, dtype=torch.float64)


def intertwined(x, seed):
    """φ(M)·x for a random M = P·D₊ on the channel axis (exactly what a G_ReLU transform does to a layer)."""
    M = wb.get_group("relu", x.shape[1]).sample(seed=seed)
    return M.act(x, dim=1)


CASES = {
    "random conv maps": lambda: (relu_acts((10, 4, 2, 2), 0), relu_acts((10, 4, 2, 2), 1)),
    "related conv maps": lambda: (relu_acts((10, 4, 2, 2), 2), relu_acts((10, 4, 2, 2), 3) + 0.7 * relu_acts((10, 4, 2, 2), 2)),
    "random units [N, C]": lambda: (relu_acts((12, 5), 4), relu_acts((12, 5), 5)),
    "intertwined conv maps": lambda: (relu_acts((10, 4, 2, 2), 6), intertwined(relu_acts((10, 4, 2, 2), 6), 7)),
    "intertwined units": lambda: (relu_acts((12, 5), 8), intertwined(relu_acts((12, 5), 8), 9)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("measure", list(REFERENCE))
def test_measure_equals_the_loop_reference(measure, case):
    a, b = CASES[case]()
    ours = S.get_measure(measure)(a, b)
    ref = REFERENCE[measure](to_lists(a), to_lists(b))
    assert ours == pytest.approx(ref, abs=TOL, rel=TOL)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("intertwined")])
def test_intertwined_activations_read_one_exactly_where_the_formula_is_invariant(case):
    a, b = CASES[case]()
    for measure, ref in REFERENCE.items():
        value = ref(to_lists(a), to_lists(b))
        if measure in GRELU_INVARIANT:
            assert value == pytest.approx(1.0, abs=TOL)  # the reference itself sees the symmetry...
            assert S.get_measure(measure)(a, b) == pytest.approx(1.0, abs=TOL)  # ...and so does ours
        elif measure != "permutation_procrustes":
            assert value < 1 - 1e-3  # rotation-invariant measures miss a per-unit scaling (negative control)


def test_the_reference_is_not_trivially_equal_to_ours():
    """Negative control for the parity test itself: a wrong formula (centred units in G_ReLU-Procrustes,
    biased HSIC in G_ReLU-CKA) disagrees with ours by far more than the tolerance."""
    a, b = CASES["related conv maps"]()
    A, B = to_lists(a), to_lists(b)

    def centred_grelu_procrustes(A, B):
        R = [samples(A), samples(B)]
        for k in range(2):
            C = len(R[k][0])
            means = [sum(r[c] for r in R[k]) / len(R[k]) for c in range(C)]
            R[k] = [[r[c] - means[c] for c in range(C)] for r in R[k]]
        R1, R2 = unit_norm(R[0]), unit_norm(R[1])
        C = len(R1[0])
        G = [[dot_units(R1, R2, i, j) for j in range(C)] for i in range(C)]
        return 1 - math.sqrt(max(2 * C - 2 * best_permutation_total(G), 0.0) / (4 * C))

    assert abs(centred_grelu_procrustes(A, B) - S.grelu_procrustes(a, b)) > 1e-3
    assert abs(cka(grelu_gram(A), grelu_gram(B), hsic_biased) - S.grelu_cka(a, b)) > 1e-3
