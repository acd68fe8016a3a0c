"""GK prototype selection against a brute-force evaluation of docs/METHODS.md 1.2."""
import math

import numpy as np
import pytest
import torch

from d2kd.prototypes import select_prototypes
from d2kd.prototypes.selection import dense_candidates, density

ALPHA = 10.0


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return np.stack([r / max(np.linalg.norm(r), 1e-12) for r in x])


def _naive_density(x):
    n = len(x)
    rho = np.zeros(n)
    for i in range(n):
        for j in range(n):
            d = 1.0 - float(np.dot(x[i], x[j]))
            rho[i] += math.exp(-((d / 0.1) ** 2))
    return rho


def _naive_candidates(a, b):
    n = len(a)
    keep = []
    rho_a, rho_b = _naive_density(a), _naive_density(b)
    qa = sorted(rho_a)[int(math.floor(0.4 * n))]
    qb = sorted(rho_b)[int(math.floor(0.4 * n))]
    for i in range(n):
        if rho_a[i] > qa and rho_b[i] > qb:
            keep.append(i)
    return keep


def _brute_force(fs, ft, k, alpha=ALPHA):
    """Explicit residual vectors; per step, per candidate, per instance: the full error."""
    a, b = _unit(fs), _unit(ft)
    cands = _naive_candidates(a, b)
    ra, rb = a.copy(), b.copy()
    chosen = []
    for _ in range(min(k, len(cands))):
        errors = []
        for g in cands:
            if g in chosen:
                errors.append(np.inf)
                continue
            u, v = a[g], b[g]
            err = 0.0
            for n in range(len(a)):
                p, q = float(u @ ra[n]), float(v @ rb[n])
                wa = (alpha * (p + q) + p) / (1 + 2 * alpha)
                wb = (alpha * (p + q) + q) / (1 + 2 * alpha)
                err += np.sum((ra[n] - wa * u) ** 2) + np.sum((rb[n] - wb * v) ** 2)
                err += alpha * (wa - wb) ** 2
            errors.append(err)
        best = cands[int(np.argmin(errors))]  # np.argmin: first minimum
        u, v = a[best], b[best]
        for n in range(len(a)):
            p, q = float(u @ ra[n]), float(v @ rb[n])
            wa = (alpha * (p + q) + p) / (1 + 2 * alpha)
            wb = (alpha * (p + q) + q) / (1 + 2 * alpha)
            ra[n] = ra[n] - wa * u
            rb[n] = rb[n] - wb * v
        chosen.append(best)
    return chosen


def _clustered(seed, n, ds, dt, clusters=4, noise=0.35):
    # Clustered features in low dimensions, so densities differ and the filter matters.
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(clusters, (n,), generator=g)
    fs = torch.randn(clusters, ds, generator=g)[label] + noise * torch.randn(n, ds, generator=g)
    mix = torch.randn(ds, dt, generator=g)
    ft = fs @ mix + noise * torch.randn(n, dt, generator=g)
    return fs * 3.0, ft  # the scale must not matter


@pytest.mark.parametrize("seed,n,ds,dt,k", [
    (0, 40, 8, 8, 5), (1, 45, 8, 5, 6), (2, 30, 4, 12, 10), (3, 50, 6, 6, 4), (4, 37, 3, 7, 8),
])
def test_matches_brute_force(seed, n, ds, dt, k):
    fs, ft = _clustered(seed, n, ds, dt)
    expected = _brute_force(fs.numpy(), ft.numpy(), k)
    assert len(expected) > 0
    got = select_prototypes(fs, ft, k, alpha=ALPHA)
    assert got.dtype == torch.long
    assert got.tolist() == expected
    # The streamed path (P, Q recomputed per step from residuals) and tiny chunks agree.
    streamed = select_prototypes(fs, ft, k, alpha=ALPHA, cache_bytes=0, chunk_elements=7)
    assert streamed.tolist() == expected
    # float32 agrees on these well-separated problems.
    assert select_prototypes(fs, ft, k, dtype=torch.float32).tolist() == expected


def test_other_alpha_matches_brute_force():
    fs, ft = _clustered(7, 40, 6, 9)
    for alpha in (0.0, 1.0):
        assert select_prototypes(fs, ft, 6, alpha=alpha).tolist() == _brute_force(
            fs.numpy(), ft.numpy(), 6, alpha=alpha
        )


def test_density_matches_naive_and_chunking():
    fs, ft = _clustered(5, 33, 5, 6)
    a = torch.from_numpy(_unit(fs.numpy()))
    np.testing.assert_allclose(density(a).numpy(), _naive_density(a.numpy()), rtol=1e-12)
    np.testing.assert_allclose(
        density(a, chunk_elements=1).numpy(), density(a).numpy(), rtol=1e-12
    )


def test_candidates_are_the_naive_dense_set():
    # With K large every candidate is chosen, so the set is the density-filtered set.
    fs, ft = _clustered(6, 50, 6, 4)
    expected = _naive_candidates(_unit(fs.numpy()), _unit(ft.numpy()))
    a, b = (torch.from_numpy(_unit(x.numpy())) for x in (fs, ft))
    assert dense_candidates(a, b).tolist() == expected
    assert dense_candidates(a, b, chunk_elements=3).tolist() == expected
    got = select_prototypes(fs, ft, 1000)
    assert sorted(got.tolist()) == expected
    assert len(got) == len(expected) < 50


def test_empty_and_single_instance():
    out = select_prototypes(torch.zeros(0, 8), torch.zeros(0, 4), 10)
    assert out.dtype == torch.long and out.shape == (0,)
    # N = 1: the only density is the quantile, and "strictly greater" excludes it.
    out = select_prototypes(torch.randn(1, 8), torch.randn(1, 4), 10)
    assert out.dtype == torch.long and out.shape == (0,)
    assert select_prototypes(torch.randn(20, 8), torch.randn(20, 4), 0).shape == (0,)


def test_fewer_candidates_than_k():
    fs, ft = _clustered(8, 6, 4, 4)
    out = select_prototypes(fs, ft, 10)
    assert 0 < len(out) < 10
    assert len(set(out.tolist())) == len(out)


def test_duplicates_ties_take_the_lowest_index():
    # Three well-separated directions, duplicated 5, 3 and 2 times in shuffled order: the
    # densest group (5 copies) is the only candidate set, its copies tie exactly at every
    # step, so the lowest remaining index must win each time.
    dirs = torch.eye(6)[:3] * torch.tensor([[2.0], [1.0], [0.5]])
    groups = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    groups = groups[perm]
    fs = dirs[groups]
    ft = fs[:, [2, 0, 1, 3]] * 7.0  # another space, same structure
    out = select_prototypes(fs, ft, 10)
    expected = (groups == 0).nonzero().squeeze(1).tolist()
    assert out.tolist() == expected
    assert out.tolist() == select_prototypes(fs, ft, 10, cache_bytes=0).tolist()


def test_duplicates_and_zero_rows_no_nan_no_repeat():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 16, generator=g)
    fs = torch.cat([base, base, base[:4], torch.zeros(3, 16)])
    ft = torch.cat([base[:, :10], base[:, :10], base[:4, :10], torch.zeros(3, 10)]) * 0.01
    out = select_prototypes(fs, ft, 10)
    assert len(set(out.tolist())) == len(out) <= 10
    assert all(i < 20 for i in out.tolist())  # zero rows are never dense
    # All-identical instances: all densities equal, nothing strictly denser.
    same = torch.ones(12, 5)
    assert select_prototypes(same, same, 4).shape == (0,)
    assert select_prototypes(torch.zeros(12, 5), torch.zeros(12, 3), 4).shape == (0,)


def test_deterministic():
    fs, ft = _clustered(11, 300, 32, 48, clusters=6)
    first = select_prototypes(fs, ft, 10)
    assert torch.equal(first, select_prototypes(fs, ft, 10))
    assert torch.equal(first, select_prototypes(fs.clone(), ft.clone(), 10))
    assert len(first) == 10 and len(set(first.tolist())) == 10


def test_gradients_and_inputs_untouched():
    fs, ft = _clustered(12, 30, 4, 4)
    fs.requires_grad_(True)
    before = fs.detach().clone()
    out = select_prototypes(fs, ft, 3)
    assert not out.requires_grad
    assert torch.equal(fs.detach(), before)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="same instances"):
        select_prototypes(torch.randn(5, 4), torch.randn(6, 4), 2)
    with pytest.raises(ValueError, match=r"\(N, D_s\)"):
        select_prototypes(torch.randn(5), torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match=r"\(N, D_s\)"):
        select_prototypes(torch.randn(5, 4, 1), torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match="num_prototypes"):
        select_prototypes(torch.randn(5, 4), torch.randn(5, 4), -1)
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        select_prototypes(bad, torch.randn(5, 4), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    fs, ft = _clustered(13, 500, 32, 64, clusters=8)
    cpu = select_prototypes(fs, ft, 10)
    gpu = select_prototypes(fs.cuda(), ft.cuda(), 10)
    assert gpu.device.type == "cuda"
    assert gpu.cpu().tolist() == cpu.tolist()


# ---- PGM at scale: every pursuit method and the float32 Gram products give the float64 picks
@pytest.mark.parametrize("seed,n,ds,dt,k", [
    (0, 40, 8, 8, 5), (1, 45, 8, 5, 6), (2, 30, 4, 12, 10), (3, 50, 6, 6, 4), (4, 37, 3, 7, 8),
])
def test_every_method_and_precision_matches_brute_force(seed, n, ds, dt, k):
    fs, ft = _clustered(seed, n, ds, dt)
    expected = _brute_force(fs.numpy(), ft.numpy(), k)
    for method in ("gram", "cached", "streamed"):
        for gram_dtype in (None, torch.float32):
            got = select_prototypes(fs, ft, k, alpha=ALPHA, method=method, gram_dtype=gram_dtype)
            assert got.tolist() == expected, (method, gram_dtype)


def _reference(fs, ft, k, **kwargs):
    """The float64 path of the previous implementation: float64 Gram products, cached P, Q."""
    return select_prototypes(fs, ft, k, gram_dtype=None, method="cached", cache_bytes=None, **kwargs)


@pytest.mark.parametrize("n,ds,dt,clusters,noise", [(2000, 64, 96, 12, 0.35), (2000, 32, 32, 40, 0.8)])
def test_clustered_2000_float32_products_give_the_float64_picks(n, ds, dt, clusters, noise):
    fs, ft = _clustered(21, n, ds, dt, clusters=clusters, noise=noise)
    expected = _reference(fs, ft, 10)
    assert len(expected) == 10
    for method in ("auto", "gram", "streamed"):
        assert select_prototypes(fs, ft, 10, method=method).tolist() == expected.tolist(), method
    # the candidate set itself is the float64 one
    from d2kd.prototypes.selection import _unit_rows

    a, b = _unit_rows(fs.double(), 1e-12), _unit_rows(ft.double(), 1e-12)
    assert torch.equal(dense_candidates(a, b, gram_dtype=torch.float32), dense_candidates(a, b))


def test_float32_density_bound_holds():
    from d2kd.prototypes.selection import _unit_rows, density_with_bound

    fs, _ = _clustered(22, 1500, 48, 8, clusters=10, noise=0.3)
    a = _unit_rows(fs.double(), 1e-12)
    exact = density(a)
    approx, err = density_with_bound(a, 0.1, torch.float32)
    assert ((approx - exact).abs() <= err).all()
    assert (err < 1e-2 * exact).all()  # and it is tight enough to decide most rows


@pytest.mark.parametrize("chunk_elements", [37 * 37, 1 << 21])
def test_float32_density_tiles_cover_the_matrix_once(chunk_elements):
    # ragged tiles (37 does not divide 300), tiles dense enough to take the dense kernel
    # (tight clusters) and sparse ones: every pair is counted once, within the bound
    from d2kd.prototypes.selection import _unit_rows, density_with_bound

    fs, _ = _clustered(23, 300, 24, 8, clusters=3, noise=0.05)
    fs = torch.cat([fs, torch.randn(40, 24, generator=torch.Generator().manual_seed(5))])
    a = _unit_rows(fs.double(), 1e-12)
    exact = density(a)
    approx, err = density_with_bound(a, 0.1, torch.float32, chunk_elements=chunk_elements)
    assert ((approx - exact).abs() <= err).all()
    assert (err < 1e-2 * exact).all()


def test_density_ties_survive_float32_products():
    # exact duplicates tie in density; the float32 path must decide them as float64 does
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 16, generator=g)
    fs = torch.cat([base[:10]] * 4 + [base[10:]])
    ft = fs @ torch.randn(16, 12, generator=g)
    assert select_prototypes(fs, ft, 10).tolist() == _reference(fs, ft, 10).tolist()


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        select_prototypes(torch.randn(20, 4), torch.randn(20, 4), 2, method="fast")
