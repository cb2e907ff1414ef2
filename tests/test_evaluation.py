"""Metrics against closed forms; feature extractors by construction and round trips; the
`eval fid` command on a tiny .npz."""
import argparse
import json
import math

import mpmath
import numpy as np
import pytest
import torch

import fastdiff.metrics.features as feat_mod
import fastdiff.metrics.fid as fid_mod
from fastdiff.metrics import (FeatureStats, FIDInceptionV3, InceptionV3Features, ShapesCNN, ShapesFeatures,
                              fid_from_features, frechet_distance, kid, load_shapes_features, precision_recall)
from fastdiff.train.features import train_shapes_features

METHODS = ("eigh", "sqrtm")


def _rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _fd_2x2(mu1, s1, mu2, s2):
    """Independent 2-D closed form: a 2x2 matrix A with eigenvalues > 0 has
    tr √A = √(tr A + 2 √det A) (Cayley–Hamilton: √A = (A + √det A · I) / √(tr A + 2√det A))."""
    a = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(a) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _fd_mpmath(mu1, s1, mu2, s2, dps=40):
    """Independent high-precision route: mpmath's matrix square root of Σ1 Σ2 itself."""
    mpmath.mp.dps = dps
    A = mpmath.matrix(s1.tolist()) * mpmath.matrix(s2.tolist())
    root = mpmath.sqrtm(A)
    tr = sum(root[i, i] for i in range(A.rows))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * float(mpmath.re(tr)))


# --------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [1, 5, 64])  # minimal, small, feature-like
def test_fd_diagonal_closed_form(method, d):
    rng = np.random.default_rng(d)
    a, b = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_fd_rotated_commuting_same_as_diagonal(method):
    d = 16
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    q = _rotation(d, 2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    mu = rng.normal(size=d)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + 4.0  # mean shift of norm 2
    shift = q[:, 0] * 2.0
    assert frechet_distance(mu, s1, mu + shift, s2, method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fd_non_commuting_2d_closed_form(method):
    rng = np.random.default_rng(3)
    for _ in range(5):
        s1 = _rotation(2, rng.integers(1 << 30)) @ np.diag(rng.uniform(0.05, 4, 2)) @ _rotation(2, 7).T
        s1 = s1 @ s1.T
        s2 = _rotation(2, rng.integers(1 << 30)) @ np.diag(rng.uniform(0.05, 4, 2))
        s2 = s2 @ s2.T
        assert not np.allclose(s1 @ s2, s2 @ s1)  # a genuinely rotated case
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(
            _fd_2x2(mu1, s1, mu2, s2), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_fd_general_against_mpmath(method):
    d = 6
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(
        _fd_mpmath(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fd_identity_and_symmetry(method):
    rng = np.random.default_rng(5)
    f1 = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    f2 = rng.standard_normal((200, 40)) * 1.5 + 0.3
    m1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    m2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    scale = np.trace(s1)
    assert abs(frechet_distance(m1, s1, m1, s1, method=method)) <= 1e-9 * scale
    ab = frechet_distance(m1, s1, m2, s2, method=method)
    ba = frechet_distance(m2, s2, m1, s1, method=method)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)
    # the two routes are independent algorithms: they must agree
    other = "sqrtm" if method == "eigh" else "eigh"
    assert ab == pytest.approx(frechet_distance(m1, s1, m2, s2, method=other), rel=1e-8)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm says so; expected here
@pytest.mark.parametrize("method", METHODS)
def test_fd_rank_deficient_finite_and_correct(method):
    # exactly singular diagonal covariances: the closed form still holds (√0 = 0)
    a = np.array([1.0, 2.0, 0.0, 0.0, 0.5])
    b = np.array([0.0, 3.0, 0.0, 1.0, 0.5])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(np.zeros(5), np.diag(a), np.zeros(5), np.diag(b), method=method)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, abs=1e-3)  # the eps·I offset may move it by O(√eps)
    # rank-deficient sample covariances (fewer samples than dimensions), rotated
    rng = np.random.default_rng(6)
    f1, f2 = rng.standard_normal((20, 64)), rng.standard_normal((25, 64)) + 0.1
    m1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    m2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    assert np.linalg.matrix_rank(s1) < 64
    fd = frechet_distance(m1, s1, m2, s2, method=method)
    assert math.isfinite(fd) and fd > 0
    assert abs(frechet_distance(m1, s1, m1, s1, method=method)) < 1e-6 * np.trace(s1)


def test_fd_offset_applied_when_root_not_finite(monkeypatch):
    """A non-finite square root triggers exactly one retry with eps·I added to both covariances."""
    import scipy.linalg
    real = scipy.linalg.sqrtm
    seen = []

    def flaky_sqrtm(a):
        seen.append(a.copy())
        return np.full_like(a, np.nan) if len(seen) == 1 else real(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    a, b = np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])
    eps = 1e-4
    got = frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b), eps=eps, method="sqrtm")
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], np.diag(a + eps) @ np.diag(b + eps))
    # tr Σ1 + tr Σ2 are taken without the offset; only the cross term sees it
    expected_with_offset = 3.0 + a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert got == pytest.approx(expected_with_offset, rel=1e-9)


def test_fd_offset_for_eigh_route(monkeypatch):
    real = fid_mod._trace_sqrt_product_eigh
    calls = []

    def flaky(s1, s2):
        calls.append((s1.copy(), s2.copy()))
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real(s1, s2)

    monkeypatch.setattr(fid_mod, "_trace_sqrt_product_eigh", flaky)
    s = np.diag([1.0, 0.0])
    got = frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1][0], s + 1e-6 * np.eye(2))
    assert math.isfinite(got) and abs(got) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_fd_significant_imaginary_part_raises(method):
    # Σ2 is symmetric but indefinite: (Σ1 Σ2)^{1/2} = diag(1, i)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_fd_negligible_imaginary_part_dropped(method):
    # roundoff-level negative eigenvalue: tolerated, result is a real float
    s2 = np.diag([1.0, -1e-14])
    got = frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), s2, method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(1.0, abs=1e-6)  # (1-1)² + (1-0)²


def test_fd_sample_estimate_converges_to_closed_form():
    """FD of sample statistics of two known Gaussians -> the closed form: bias O(D/n), noise
    O(1/√n). D=4 as two independent non-commuting 2-D blocks, so the exact value is the sum
    of two 2-D closed forms."""
    rng = np.random.default_rng(7)
    blocks1 = [np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.2], [-0.2, 0.3]])]
    blocks2 = [np.array([[1.0, -0.3], [-0.3, 0.6]]), np.array([[1.5, 0.4], [0.4, 0.4]])]
    mu1, mu2 = np.array([0.0, 0.5, -0.3, 0.1]), np.array([0.4, 0.0, 0.2, -0.2])
    exact = sum(_fd_2x2(mu1[2 * i:2 * i + 2], blocks1[i], mu2[2 * i:2 * i + 2], blocks2[i]) for i in range(2))
    s1 = np.zeros((4, 4)); s1[:2, :2], s1[2:, 2:] = blocks1  # noqa: E702
    s2 = np.zeros((4, 4)); s2[:2, :2], s2[2:, 2:] = blocks2  # noqa: E702
    errors = {}
    for n in (300, 3000, 100_000):
        errs = []
        for _ in range(4):
            x = rng.multivariate_normal(mu1, s1, size=n)
            y = rng.multivariate_normal(mu2, s2, size=n)
            errs.append(fid_from_features(x, y) - exact)
        errors[n] = np.sqrt(np.mean(np.square(errs)))
    assert errors[100_000] < errors[300]
    assert errors[100_000] < 0.02 * exact  # exact ≈ 1.8; sampling error here ≈ 0.005
    assert errors[300] > errors[100_000] * 3  # it does move with n: the check can see an error


# --------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.eye(3)[:2], np.zeros(3), np.eye(3)), "square"),                     # non-square
    ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "D=3"),                            # sigma vs mu
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "dimensions differ"),              # mismatched
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "vector"),                    # mu not 1-D
    ((np.array([0, np.nan, 0]), np.eye(3), np.zeros(3), np.eye(3)), "mu1.*non-finite"),   # NaN mean
    ((np.zeros(3), np.eye(3), np.zeros(3), np.diag([1, np.nan, 1])), "sigma2.*non-finite"),
    ((np.zeros(2), np.array([[1, 0.5], [0, 1]]), np.zeros(2), np.eye(2)), "symmetric"),
])
def test_fd_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_fd_bad_method_and_eps():
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), method="svd")
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), eps=-1)


def test_features_bad_inputs():
    with pytest.raises(ValueError, match="dimensions differ"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        fid_from_features(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        kid(np.zeros(5), np.zeros((5, 1)))
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="dimension 4"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.update(np.zeros((1, 3))).cov


# --------------------------------------------------------------------------- FeatureStats
def test_feature_stats_merge_equals_one_pass(tmp_path):
    rng = np.random.default_rng(8)
    f = rng.standard_normal((1000, 7)) * [1, 2, 3, 0.1, 1, 1, 1] + 1e4  # large offset: no cancellation
    ref_mean, ref_cov = f.mean(0), np.cov(f, rowvar=False)
    one = FeatureStats(7).update(f)
    parts = [FeatureStats(7).update(f[a:b]) for a, b in ((0, 1), (1, 333), (333, 334), (334, 1000))]
    merged = FeatureStats(7)
    for p in reversed(parts):  # order does not matter
        merged.merge(p)
    streamed = FeatureStats(7)
    for a in range(0, 1000, 64):
        streamed.update(torch.from_numpy(f[a:a + 64]))
    for s in (one, merged, streamed):
        assert s.n == 1000
        np.testing.assert_allclose(s.mean, ref_mean, rtol=1e-14)
        np.testing.assert_allclose(s.cov, ref_cov, rtol=1e-9, atol=1e-12)
    merged.merge(FeatureStats(7))  # empty merge is a no-op
    assert merged.n == 1000
    with pytest.raises(ValueError, match="dimension"):
        merged.merge(FeatureStats(3))
    # save / load without pickle
    path = tmp_path / "stats.npz"
    merged.name = "test-features"
    merged.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) >= {"n", "mean", "m2"}
    back = FeatureStats.load(path)
    assert back.n == 1000 and back.name == "test-features"
    np.testing.assert_array_equal(back.cov, merged.cov)
    assert back.frechet_distance(one) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        FeatureStats.load(tmp_path / "other.npz")


# --------------------------------------------------------------------------- KID
def _mmd2_by_definition(x, y):
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_definition():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    mean, std = kid(x, y, subsets=3, subset_size=12)  # whole sets: every subset is the same
    assert mean == pytest.approx(_mmd2_by_definition(x, y), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_law_near_zero_shifted_positive():
    rng = np.random.default_rng(10)
    d = 16
    x, y = rng.standard_normal((2000, d)), rng.standard_normal((2000, d))
    mean, std = kid(x, y, subsets=30, subset_size=400)
    assert std > 0
    assert abs(mean) < 2 * std
    z = rng.standard_normal((2000, d)) + 0.5
    mean_s, std_s = kid(x, z, subsets=30, subset_size=400)
    assert mean_s > 10 * std_s and mean_s > 20 * abs(mean)


# --------------------------------------------------------------------------- precision / recall
def test_precision_recall_hand_computed():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0]])
    # k=1 radii: real 1,1,1,1,7 -> 0.5 in, 5 in (|5-10| <= 7), 20 out: precision 2/3;
    # fake 4.5,4.5,15 -> every real point is in some fake ball: recall 1
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3) and r == 1.0
    rng = np.random.default_rng(11)
    x = rng.standard_normal((200, 3))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x[:3], x, k=3)


# --------------------------------------------------------------------------- Inception-v3
def test_inception_pools():
    # count_include_pad=False: a constant image stays constant at the borders
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(feat_mod._avg_pool_3x3(ones), ones)
    net = FIDInceptionV3()
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    assert not any(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert net.fc.weight.shape == (1008, 2048)


def test_inception_features_shape_and_strict_round_trip(tmp_path):
    torch.set_num_threads(2)
    extractor = InceptionV3Features.random(seed=0)
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape)  # returns None: the output is not replaced
        return hook

    extractor.net.Mixed_7c.register_forward_hook(record("7c"))
    extractor.net.Conv2d_4a_3x3.register_forward_hook(record("4a"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = extractor(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert shapes == {"4a": (2, 192, 71, 71), "7c": (2, 2048, 8, 8)}  # Szegedy et al. 2016, Table 1 grid
    assert torch.isfinite(f).all() and (f >= 0).all()  # average of ReLU outputs
    path = tmp_path / "inception.pth"
    torch.save(extractor.net.state_dict(), path)
    loaded = InceptionV3Features(path)
    assert loaded.name == "inception-v3-fid" and loaded.dim == 2048
    assert torch.equal(loaded(x), f)
    assert not torch.equal(InceptionV3Features.random(seed=1)(x[:1]), f[:1])


def test_inception_weights_errors(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        InceptionV3Features(missing)
    state = FIDInceptionV3().state_dict()
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"bad.pth.*Mixed_6b.branch7x7_2.conv.weight.*AuxLogits.fc.weight"):
        InceptionV3Features(bad)
    state = FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)  # an ImageNet-1000 head: right names, wrong shape
    torch.save(state, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        InceptionV3Features(bad)
    with pytest.raises(ValueError, match="images must be"):
        InceptionV3Features.random()(torch.zeros(1, 2, 8, 8))


# --------------------------------------------------------------------------- shapes features
def test_shapes_features_train_save_reload(tmp_path):
    torch.set_num_threads(2)
    kw = dict(steps=3, batch_size=16, dataset_size=64)
    a = train_shapes_features(tmp_path / "a", seed=3, **kw)
    b = train_shapes_features(tmp_path / "b", seed=3, **kw)
    c = train_shapes_features(tmp_path / "c", seed=4, **kw)
    record = json.loads((a / feat_mod.SHAPES_RECORD).read_text())
    assert record["steps"] == 3 and record["seed"] == 3 and 0 <= record["held_out_accuracy"] <= 1
    fa, fb, fc = (load_shapes_features(p) for p in (a, b, c))
    assert isinstance(fa, ShapesFeatures) and fa.dim == record["feature_dim"]
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    feats = fa(x)
    assert feats.shape == (5, fa.dim)
    assert torch.equal(feats, fb(x))            # deterministic by seed, and the reload is exact
    assert not torch.equal(feats, fc(x))        # ... and the seed matters
    assert not torch.equal(feats, ShapesFeatures(ShapesCNN())(x))  # weights really were loaded
    assert torch.equal(load_shapes_features(a / feat_mod.SHAPES_RECORD)(x), feats)
    # other sizes and grey images go through the same features
    assert fa(torch.zeros(2, 1, 48, 48)).shape == (2, fa.dim)
    small = load_shapes_features(train_shapes_features(tmp_path / "d", seed=3, image_size=16, **kw))
    assert small.cnn.config["image_size"] == 16 and small(x).shape == (5, small.dim)
    with pytest.raises(ValueError, match="image_size"):
        train_shapes_features(tmp_path / "e", image_size=8, **kw)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_shapes_features(tmp_path / "nowhere")
    (tmp_path / "a" / feat_mod.SHAPES_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=feat_mod.SHAPES_WEIGHTS):
        load_shapes_features(a)


# --------------------------------------------------------------------------- command line
def _parser():
    from fastdiff.cli import build_parser
    return build_parser()


def test_cli_eval_fid_on_npz(tmp_path, capsys):
    from fastdiff.data import load_dataset
    torch.set_num_threads(2)
    parser = _parser()
    feats_dir = tmp_path / "features"
    args = parser.parse_args(["train-features", "--out", str(feats_dir), "--steps", "2", "--seed", "1",
                              "--dataset-size", "32", "--no-progress"])
    assert args.func(args) == 0
    assert "saved to" in capsys.readouterr().out
    # "samples": held-out shapes images, uint8 NHWC as `fastdiff sample` writes them
    samples = load_dataset("shapes", n=40, train=False).images
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=samples.permute(0, 2, 3, 1).numpy())
    out_json = tmp_path / "fid.json"
    args = parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--shapes-features", str(feats_dir),
                              "--n", "40", "--kid", "--kid-subsets", "5", "--kid-subset-size", "20",
                              "--precision-recall", "--json", str(out_json), "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert f"FID: {result['fid']:.4f}" in printed and "KID:" in printed and "±" in printed
    assert result["n_generated"] == 40 and result["n_reference"] == 40
    # the number is the FID of these two image sets under that network, computed directly
    extractor = load_shapes_features(feats_dir)
    reference = load_dataset("shapes", n=40, train=True).batch(range(40))[0]
    direct = fid_from_features(extractor(reference), extractor(samples.float() / 127.5 - 1))
    assert result["fid"] == pytest.approx(direct, rel=1e-6)
    assert math.isfinite(result["kid"]) and result["kid_std"] >= 0
    # without --shapes-features: trained on the fly into a cache next to the samples, then reused
    argv = ["eval", "fid", str(npz), "--data", "shapes", "--n", "20", "--features-steps", "2",
            "--features-dataset-size", "32", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "training the shapes feature network" in printed
    cache = tmp_path / "fid-cache" / "shapes-features-32px-steps2-seed0"
    assert (cache / feat_mod.SHAPES_RECORD).is_file()
    assert parser.parse_args(argv).func(parser.parse_args(argv)) == 0
    assert "using the cached" in capsys.readouterr().out


def test_cli_eval_fid_errors(tmp_path):
    from fastdiff.errors import UserError
    parser = _parser()
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((4, 32, 32, 3), np.uint8))
    args = parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--features", "inception", "--n", "4"])
    with pytest.raises(UserError, match="--inception-weights"):
        args.func(args)
    args = parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--features", "inception",
                              "--inception-weights", str(tmp_path / "none.pth"), "--n", "4"])
    with pytest.raises(FileNotFoundError, match="none.pth"):
        args.func(args)
    args = parser.parse_args(["eval", "fid", str(tmp_path / "nothing"), "--data", "shapes"])
    with pytest.raises(FileNotFoundError, match="nothing"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--features", "clip"])
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--protocol", "imagenet-50k"])
    if not torch.cuda.is_available():  # a device that is not there is an error, never a silent CPU run
        args = parser.parse_args(["eval", "fid", str(npz), "--data", "shapes", "--device", "cuda"])
        with pytest.raises(UserError, match="'cuda'"):
            args.func(args)


def _tiny_class_model(w):
    import fastdiff
    from fastdiff.models.unet import PRESETS
    diffusion = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(T=20))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fastdiff.UNet(**PRESETS["tiny"], num_classes=3, diffusion=diffusion).eval()
        for p in model.parameters():  # not the zero inits: the label and guidance must show
            torch.nn.init.normal_(p, std=0.1)
    model.default_guidance_scale = w
    return model


def test_cli_eval_fid_samples_what_fastdiff_sample_draws(tmp_path, capsys, monkeypatch):
    """A run folder is sampled exactly as `fastdiff sample` samples it: the same labels, the
    model's default guidance scale and the same noise, whatever --batch-size (it used to sample
    without guidance and with a seed per batch). The loader is replaced by an untrained tiny
    class-conditional U-Net (training one here would cost more than the rest of this file)."""
    import fastdiff.cli.eval
    import fastdiff.cli.sample
    torch.set_num_threads(2)
    model = _tiny_class_model(w=2.0)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(fastdiff.cli.sample, "load_for_sampling", lambda src, no_ema=False: (model, "step 7"))
    monkeypatch.setattr(fastdiff.cli.eval, "load_for_sampling", lambda src, no_ema=False: (model, "step 7"))
    seen = []
    real_features = fastdiff.cli.eval._features_of

    def recording_features(extractor, batches):
        batches = list(batches)
        seen.append(torch.cat(batches))
        return real_features(extractor, batches)

    monkeypatch.setattr(fastdiff.cli.eval, "_features_of", recording_features)
    parser = _parser()
    out_json = tmp_path / "fid.json"
    generated = []
    for batch_size in ("3", "5"):
        seen.clear()
        args = parser.parse_args(["eval", "fid", str(run), "--data", "shapes", "--n", "5", "--steps", "2",
                                  "--batch-size", batch_size, "--features-steps", "1",
                                  "--features-dataset-size", "16", "--json", str(out_json), "--no-progress"])
        assert args.func(args) == 0
        generated.append(seen[0])  # the first feature pass is the generated set
    printed = capsys.readouterr().out
    assert "sampling 5 images" in printed and "step 7" in printed and "FID:" in printed
    assert torch.equal(generated[0], generated[1])
    args = parser.parse_args(["sample", str(run), "--n", "5", "--steps", "2", "--out", str(tmp_path / "s.png"),
                              "--no-progress"])
    assert args.func(args) == 0
    drawn = np.load(tmp_path / "s.npz")
    assert drawn["labels"].tolist() == [0, 1, 2, 0, 1]
    assert torch.equal(torch.from_numpy(drawn["images"]).permute(0, 3, 1, 2), generated[0])
    # and guidance is on: unguided samples (w = 0) differ
    args = parser.parse_args(["sample", str(run), "--n", "5", "--steps", "2", "--guidance-scale", "0",
                              "--out", str(tmp_path / "u.png"), "--no-progress"])
    assert args.func(args) == 0
    assert not np.array_equal(np.load(tmp_path / "u.npz")["images"], drawn["images"])
    result = json.loads(out_json.read_text())
    assert result["n_generated"] == 5 and math.isfinite(result["fid"])
    assert (run / "fid-cache" / "shapes-features-32px-steps1-seed0" / feat_mod.SHAPES_RECORD).is_file()


# --------------------------------------------------------------------------- issue 19: what goes into an FID
@pytest.fixture(scope="module")
def shapes_features_dir(tmp_path_factory):
    return train_shapes_features(tmp_path_factory.mktemp("features") / "f", steps=1, seed=1, batch_size=16,
                                 dataset_size=32)


def _write_pngs(images, paths):
    from PIL import Image
    for img, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _class_sorted_folder(root, classes=3, per_class=10, size=32):
    """`classes` class subfolders of `per_class` noisy images in a class colour; -> images (N, H, W, 3)
    uint8 in file order (class 0 first)."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [200, 200, 40]])[:classes]
    images = np.clip(colours[:, None, None, None, :] + rng.normal(0, 30, (classes, per_class, size, size, 3)),
                     0, 255).astype(np.uint8).reshape(-1, size, size, 3)
    _write_pngs(images, [root / f"class{c}" / f"{i:03d}.png" for c in range(classes) for i in range(per_class)])
    return images


def _eval_fid(argv, tmp_path):
    out_json = tmp_path / "fid.json"
    args = _parser().parse_args(["eval", "fid", *argv, "--json", str(out_json), "--no-progress"])
    assert args.func(args) == 0
    return json.loads(out_json.read_text())


def _nhwc_to_model(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_cli_eval_fid_reference_subset_is_random_not_first_class(tmp_path, shapes_features_dir):
    """3 classes x 10 images in class subfolders, --n 10: the reference used to be files 0..9,
    all of class 0 (here: the very images sampled, so FID ~ 0). Now it is a seeded random subset
    of all classes, recorded in the JSON, and the FID is that subset's."""
    torch.set_num_threads(2)
    images = _class_sorted_folder(tmp_path / "ref")
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=images[:10])  # class 0 only
    result = _eval_fid([str(npz), "--data", str(tmp_path / "ref"), "--n", "10", "--shapes-features",
                        str(shapes_features_dir)], tmp_path)
    extractor = load_shapes_features(shapes_features_dir)
    f_gen = extractor(_nhwc_to_model(images[:10]))
    first_class = fid_from_features(extractor(_nhwc_to_model(images[:10])), f_gen)  # the old reference
    assert abs(first_class) < 1e-6 < result["fid"]
    assert result["reference_subset"] == {"kind": "random", "n": 10, "of": 30, "seed": 0}
    assert result["n_reference"] == 10 and result["generated_subset"]["kind"] == "all"
    from fastdiff.metrics.pipeline import choose_subset
    idx, _ = choose_subset(30, 10, seed=0)
    assert len(set((idx // 10).tolist())) == 3  # every class is in the reference
    assert result["fid"] == pytest.approx(fid_from_features(extractor(_nhwc_to_model(images[idx])), f_gen),
                                          rel=1e-6)
    # the whole set on request; and an .npz ordered by class gives a random subset of its samples too
    result = _eval_fid([str(npz), "--data", str(tmp_path / "ref"), "--n", "10", "--n-reference", "all",
                        "--shapes-features", str(shapes_features_dir)], tmp_path)
    assert result["reference_subset"] == {"kind": "all", "n": 30, "of": 30} and result["n_reference"] == 30
    np.savez(npz, images=images)
    result = _eval_fid([str(npz), "--data", str(tmp_path / "ref"), "--n", "10", "--subset-seed", "3",
                        "--shapes-features", str(shapes_features_dir)], tmp_path)
    assert result["generated_subset"] == {"kind": "random", "n": 10, "of": 30, "seed": 3}
    assert result["reference_subset"]["seed"] == 3


def test_cli_eval_fid_small_n_warns_and_reports_kid_by_default(tmp_path, capsys, shapes_features_dir):
    from fastdiff.data import load_dataset
    npz = tmp_path / "s.npz"
    np.savez(npz, images=load_dataset("shapes", n=8, train=False).images.permute(0, 2, 3, 1).numpy())
    argv = [str(npz), "--data", "shapes", "--n", "8", "--shapes-features", str(shapes_features_dir),
            "--kid-subsets", "3"]
    result = _eval_fid(argv, tmp_path)
    captured = capsys.readouterr()
    assert "warning: n = 8 is below the feature dimension 64" in captured.err
    assert result["warnings"] and "below the feature dimension 64" in result["warnings"][0]
    assert math.isfinite(result["kid"]) and result["kid_subset_size"] == 8 and "KID:" in captured.out
    result = _eval_fid(argv + ["--no-kid"], tmp_path)
    assert "kid" not in result and "KID" not in capsys.readouterr().out
    # at n >= the feature dimension there is no warning
    np.savez(npz, images=load_dataset("shapes", n=64, train=False).images.permute(0, 2, 3, 1).numpy())
    result = _eval_fid([str(npz), "--data", "shapes", "--n", "64", "--shapes-features", str(shapes_features_dir),
                        "--no-kid"], tmp_path)
    assert result["warnings"] == [] and "warning" not in capsys.readouterr().err


def test_quantize_round_and_floor():
    from fastdiff.data import to_uint8
    from fastdiff.metrics.pipeline import quantize
    levels = torch.tensor([-2.0, -1.0, 10.6 / 127.5 - 1, 10.4 / 127.5 - 1, 1.0, 3.0])
    assert quantize(levels, "round").tolist() == [0, 0, 11, 10, 255, 255]
    assert quantize(levels, "floor").tolist() == [0, 0, 10, 10, 255, 255]
    x = torch.rand(2, 3, 8, 8) * 2.2 - 1.1
    assert torch.equal(quantize(x, "round"), to_uint8(x))  # what `fastdiff sample` writes
    # truncation as the DDPM / guided-diffusion samplers do it: a cast of the clamped value
    assert torch.equal(quantize(x, "floor"), ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="quantize mode.*'nearest'"):
        quantize(x, "nearest")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.zeros(2, dtype=torch.uint8))


def test_cli_eval_fid_quantize_float_samples(tmp_path, shapes_features_dir):
    from fastdiff.errors import UserError
    from fastdiff.metrics.pipeline import quantize
    rng = np.random.default_rng(1)
    floats = rng.uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)
    npz = tmp_path / "float.npz"
    np.savez(npz, images=floats)
    extractor = load_shapes_features(shapes_features_dir)
    from fastdiff.data import load_dataset
    f_ref = extractor(load_dataset("shapes", n=6).batch(range(6))[0])
    x = torch.from_numpy(floats).permute(0, 3, 1, 2) * 2 - 1
    fids = {}
    for mode in ("round", "floor"):
        result = _eval_fid([str(npz), "--data", "shapes", "--n", "6", "--quantize", mode, "--no-kid",
                            "--shapes-features", str(shapes_features_dir)], tmp_path)
        assert result["quantize"] == mode
        expected = fid_from_features(f_ref, extractor(quantize(x, mode).float() / 127.5 - 1))
        assert result["fid"] == pytest.approx(expected, rel=1e-6)
        fids[mode] = result["fid"]
    assert fids["round"] != fids["floor"]
    # 8-bit samples were quantised when written: --quantize cannot apply to them (an error, not a no-op)
    np.savez(npz, images=(floats * 255).astype(np.uint8))
    with pytest.raises(UserError, match="--quantize floor: .*float.npz holds 8-bit images"):
        _eval_fid([str(npz), "--data", "shapes", "--n", "6", "--quantize", "floor", "--no-kid",
                   "--shapes-features", str(shapes_features_dir)], tmp_path)
    result = _eval_fid([str(npz), "--data", "shapes", "--n", "6", "--no-kid", "--shapes-features",
                        str(shapes_features_dir)], tmp_path)
    assert result["quantize"] == "stored"


def test_cli_eval_fid_reference_resize(tmp_path, shapes_features_dir):
    """direct: 48x48 reference files reach the network at 48x48 (pytorch-fid's way); to-samples:
    they are first resized to the 32x32 samples' size as the dataset loader does."""
    from fastdiff.data import load_image_folder
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    _write_pngs(ref, [tmp_path / "ref" / f"{i}.png" for i in range(5)])
    samples = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    npz = tmp_path / "s.npz"
    np.savez(npz, images=samples)
    extractor = load_shapes_features(shapes_features_dir)
    f_gen = extractor(_nhwc_to_model(samples))
    expected = {"direct": fid_from_features(extractor(_nhwc_to_model(ref)), f_gen),
                "to-samples": fid_from_features(extractor(load_image_folder(tmp_path / "ref", 32).batch(range(5))[0]),
                                                f_gen)}
    assert expected["direct"] != pytest.approx(expected["to-samples"], rel=1e-4)
    for mode, fid in expected.items():
        argv = [str(npz), "--data", str(tmp_path / "ref"), "--n", "5", "--no-kid",
                "--shapes-features", str(shapes_features_dir)] + (["--reference-resize", mode] if mode != "direct" else [])
        result = _eval_fid(argv, tmp_path)
        assert result["reference_resize"] == mode and result["fid"] == pytest.approx(fid, rel=1e-6)


def _cifar_bin(path, images, labels):
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    records.astype(np.uint8).tofile(path)


def test_cli_eval_fid_protocol(tmp_path, monkeypatch):
    """--protocol cifar10-50k: its fixed options, checks of the reference set, and the numbers of
    those options. The counts are shrunk (50,000 Inception passes would take an hour here)."""
    import dataclasses

    import fastdiff.metrics.pipeline as pipeline
    from fastdiff.errors import UserError
    torch.set_num_threads(2)
    proto = pipeline.PROTOCOLS["cifar10-50k"]
    assert proto.settings == dict(features="inception", n=50_000, n_reference="all", split="train",
                                  quantize="floor", reference_resize="direct")
    assert proto.reference_count == 50_000 and proto.image_size == 32
    small = dataclasses.replace(proto, settings={**proto.settings, "n": 3}, reference_count=4)
    monkeypatch.setitem(pipeline.PROTOCOLS, "cifar10-50k", small)
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    _cifar_bin(tmp_path / "cifar" / "data_batch_1.bin", ref, np.arange(4) % 10)
    _cifar_bin(tmp_path / "cifar" / "test_batch.bin", ref[:1], np.zeros(1))
    floats = rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    npz = tmp_path / "s.npz"
    np.savez(npz, images=floats)
    # Inception at 299x299 costs seconds per image here: a small random CNN stands in for it
    # (the Inception pipeline itself is checked against pytorch-fid in test_fid_peer.py)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    extractor = ShapesFeatures(ShapesCNN(width=8, groups=4), name="inception-v3-fid")
    loaded = []
    monkeypatch.setattr(feat_mod, "InceptionV3Features", lambda path: loaded.append(path) or extractor)
    base = [str(npz), "--data", str(tmp_path / "cifar"), "--protocol", "cifar10-50k"]
    with pytest.raises(UserError, match="--inception-weights"):
        _eval_fid(base, tmp_path)
    with pytest.raises(UserError, match="sets --n 3; got --n 2"):
        _eval_fid(base + ["--n", "2"], tmp_path)
    with pytest.raises(UserError, match="sets --quantize floor; got --quantize round"):
        _eval_fid(base + ["--quantize", "round"], tmp_path)
    with pytest.raises(UserError, match="4 32x32 CIFAR-10 train images; --data .* has 5 images"):
        _cifar_bin(tmp_path / "cifar" / "data_batch_2.bin", ref[:1], np.zeros(1))
        _eval_fid(base + ["--inception-weights", str(weights)], tmp_path)
    (tmp_path / "cifar" / "data_batch_2.bin").unlink()
    result = _eval_fid(base + ["--inception-weights", str(weights), "--kid-subsets", "2"], tmp_path)
    assert set(loaded) == {str(weights)} and result["features"] == "inception-v3-fid"
    assert result["protocol"] == "cifar10-50k"
    assert (result["quantize"], result["reference_resize"], result["split"]) == ("floor", "direct", "train")
    assert result["reference_subset"] == {"kind": "all", "n": 4, "of": 4} and result["n_generated"] == 3
    assert "below the feature dimension 32" in result["warnings"][0]
    x = ((torch.from_numpy(floats) + 1) * 127.5).clamp(0, 255).to(torch.uint8).float() / 127.5 - 1  # truncated
    expected = fid_from_features(extractor(torch.from_numpy(ref).float() / 127.5 - 1), extractor(x))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    # samples stored as 8-bit (a `fastdiff sample` .npz or shard folder: rounded) cannot be truncated
    # any more: the protocol runs on them as they are and says so
    np.savez(npz, images=np.full((3, 32, 32, 3), 7, np.uint8))
    result = _eval_fid(base + ["--inception-weights", str(weights), "--no-kid"], tmp_path)
    assert result["quantize"] == "stored" and "quantised when written" in result["warnings"][0]


def test_sample_shards_concatenate_to_the_whole(monkeypatch):
    """The unit a distributed (torchrun) version hands each rank: shards of the sample indices
    give the same images as one pass, whatever the batch size."""
    from fastdiff.cli.eval import sample_shard
    torch.set_num_threads(2)
    model = _tiny_class_model(w=0.0)
    labels = torch.arange(3) % 3
    args = argparse.Namespace(batch_size=2, steps=2, eta=0.0, seed=4, sampler="ddim", no_progress=True)
    whole = torch.cat(list(sample_shard(model, labels, args, 0.0, 0, 3, "round")))
    args.batch_size = 1
    parts = [torch.cat(list(sample_shard(model, labels, args, 0.0, a, b, "round"))) for a, b in ((0, 1), (1, 3))]
    assert whole.dtype == torch.uint8 and whole.shape == (3, 3, 32, 32)
    assert torch.equal(torch.cat(parts), whole)
