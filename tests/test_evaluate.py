"""launch/evaluate.py, run as users run it: one rank and two (real `accelerate launch`, gloo), on a
generator trained here, an untrained one and one collapsed to a single image; the reals' feature cache
reused and invalidated; the numbers in run_dir/evaluations and in the run's offline W&B files."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import launch_cmd, run
from dcgan_dist.nets import metrics
from dcgan_dist.report import wandb_sync
from dcgan_dist.data.shards import ShardSet
from dcgan_dist.data.stream import image_batches
from dcgan_dist.nets.models import Generator, init_weights
from dcgan_dist.run.snapshot import snapshot_bytes
from dcgan_dist.report.wandb_file import read_records

pytestmark = pytest.mark.skipif(metrics.inception_path(None) is None, reason="no FID Inception weights installed")

# Inception at 299 px costs about 0.15 s an image on a thread here: 32 a side keeps each run short.
ARGS = ["--num", 32, "--reals", 32, "--batch", 16, "--metrics", "fid,kid,pr,swd"]


def evaluate(*args, ranks: int = 0, timeout: float = 400):
    """(the process, its last stdout line as JSON or None): one plain process, or `ranks` under accelerate."""
    script = ["launch/evaluate.py", *map(str, args)]
    done = run(launch_cmd(script, ranks) if ranks else [sys.executable, *script], timeout=timeout)
    lines = done.stdout.strip().splitlines()
    return done, (json.loads(lines[-1]) if done.returncode == 0 and lines else None)


def flat(line: dict) -> dict[str, float]:
    return {k: v for values in line["results"].values() for k, v in values.items()}


@pytest.fixture(scope="module")
def trained(trained32) -> Path:
    return trained32


def cache_files(shards: Path) -> list[Path]:
    return sorted((shards / "eval-cache").glob("real-inception-32-*.safetensors"))


@pytest.fixture(scope="module")
def scores(trained, faces32):
    """The trained snapshot scored by one rank (which caches the reals), by two ranks with the cache
    removed (so they split the reals too), then by one rank again (which reads the cache)."""
    for old in cache_files(faces32):
        old.unlink()
    one, line1 = evaluate("--checkpoint", trained, *ARGS)
    assert one.returncode == 0, one.stderr[-3000:]
    (cache,) = cache_files(faces32)
    cache.unlink()
    two, line2 = evaluate("--checkpoint", trained, *ARGS, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    (cache,) = cache_files(faces32)
    written = cache.stat().st_mtime_ns
    again, line3 = evaluate("--checkpoint", trained, *ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert cache.stat().st_mtime_ns == written
    return {"one": (one, line1), "two": (two, line2), "again": (again, line3), "cache": cache}


def test_two_ranks_give_the_numbers_one_rank_gives(scores):
    (_, one), (_, two) = scores["one"], scores["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert set(one["results"]) == {"fid32_32", "kid32_32", "pr32_k3_32", "swd32_32"}
    assert flat(two) == pytest.approx(flat(one), rel=1e-9, abs=1e-12)
    assert flat(one)["fid"] > 0 and flat(one)["swd"] > 0


def test_a_second_evaluation_reads_the_cached_reals(scores):
    (_, one), (again, third) = scores["one"], scores["again"]
    assert "reals: the cached features of 32 images" in again.stderr
    assert "cached features" not in scores["one"][0].stderr
    assert flat(third) == pytest.approx(flat(one), rel=1e-12)


def test_the_output_is_a_table_then_one_json_line_and_a_file_per_metric(scores, trained):
    done, line = scores["one"]
    table = done.stdout.strip().splitlines()[:-1]
    assert table[0].split() == ["metric", "value", "protocol"]
    assert any(row.split()[0] == "fid" and row.split()[2] == "fid32_32" for row in table[1:])
    assert line["protocol"]["preprocessing"] == metrics.PREPROCESSING and line["protocol"]["batch"] == 16
    step = line["step"]
    for name, values in line["results"].items():
        record = json.loads((trained / "evaluations" / f"step-{step:08d}-{name}.json").read_text())
        assert record["metric"] == name and record["results"] == pytest.approx(values)
        assert record["protocol"]["num_reals"] == 32 and not record["protocol"]["full"]
    assert "evaluating" in done.stderr and "img/s" in done.stderr      # rank 0's progress bar


def test_the_numbers_land_in_the_runs_wandb_summary(scores, trained):
    run_id = (trained / "wandb-run-id").read_text().strip()
    summaries = {}
    for run_file in trained.glob("wandb/offline-run-*/run-*.wandb"):
        for rec in read_records(run_file):
            if rec.WhichOneof("record_type") == "run":
                assert rec.run.run_id == run_id                     # every segment is the run_dir's run
            if rec.WhichOneof("record_type") == "summary":
                summaries.update({item.key: json.loads(item.value_json) for item in rec.summary.update})
    assert summaries["eval32/fid"] == pytest.approx(flat(scores["again"][1])["fid"])
    assert {"eval32/kid", "eval32/precision", "eval32/recall", "eval32/swd"} <= set(summaries)
    # launch/wandb_sync.py uploads them with the training: the training segment first, whole, then each
    # evaluation's, which logs no rows and so cuts nothing.
    synced_id, segments, notes = wandb_sync.plan(trained)
    assert synced_id == run_id and not notes and len(segments) >= 4
    assert segments[0].steps and segments[0].kept == segments[0].steps
    assert all(not seg.steps for seg in segments[1:])


def test_the_reals_against_themselves_score_zero_and_full_coverage(scores, faces32):
    """The reals' cached Inception features and images on both sides: FID and SWD 0, precision and
    recall 1, and KID what the unbiased estimator gives for one set against itself: with the kernel
    matrix K of n images, 2 (sum K - n trace K) / (n^2 (n - 1)), slightly below 0."""
    from safetensors.torch import load_file

    feats = load_file(str(scores["cache"]))["features"]
    images = torch.cat([x for _, x in image_batches(ShardSet.open(faces32), 32, 16)])
    got = metrics.compute(["fid", "kid", "pr", "swd"], metrics.Inputs(images, images, feats, feats))
    assert got["fid"] == pytest.approx(0, abs=1e-6) and got["swd"] == pytest.approx(0, abs=1e-6)
    assert got["precision"] == got["recall"] == 1.0
    f = feats.double()
    k, n = (f @ f.T / f.shape[1] + 1) ** 3, len(f)
    assert got["kid"] == pytest.approx(float(2 * (k.sum() - n * k.trace()) / (n * n * (n - 1))), rel=1e-9)


def write_generator(path: Path, collapse: bool) -> Path:
    """An untrained generator (DCGAN's N(0, 0.02) weights), or one collapsed to a single image: its last
    layer zeroed, so every latent gives the same mid-grey picture."""
    torch.manual_seed(0)
    G = Generator(nz=100, ngf=32, resolution=32)
    G.apply(init_weights)
    if collapse:
        torch.nn.init.zeros_(G.main[-2].weight)
    path.write_bytes(snapshot_bytes(G, step=0, kimg=0.0, metrics={}))
    return path


def test_an_untrained_generator_scores_worse_and_a_collapsed_one_has_no_recall(scores, faces32, tmp_path):
    trained = flat(scores["one"][1])
    got = {}
    (tmp_path / "artifact").mkdir()            # as `wandb artifact get` or generate.py's download lays it out
    places = {"untrained": tmp_path / "untrained.safetensors", "collapsed": tmp_path / "artifact/generator.safetensors"}
    for kind, place in places.items():
        snapshot = write_generator(place, collapse=kind == "collapsed")
        snapshot = snapshot if kind == "untrained" else snapshot.parent
        done, line = evaluate("--checkpoint", snapshot, "--shards", faces32, *ARGS)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "reals: the cached features" in done.stderr
        got[kind] = flat(line)
    for key in ("fid", "kid", "swd"):
        assert got["untrained"][key] > trained[key], key
        assert got["collapsed"][key] > trained[key], key
    # Precision and recall sit at 0 for every generator at these sizes (32 images a side; docs/EVALUATION.md
    # says why), so "worse" can only be "no better" there.
    for key in ("precision", "recall"):
        assert got["untrained"][key] <= trained[key], key
    assert got["collapsed"]["recall"] <= 0.05
    for folder in (tmp_path, tmp_path / "artifact"):                     # beside a snapshot of no run
        assert (folder / "evaluations" / "step-00000000-fid32_32.json").is_file()


def test_the_cache_follows_the_manifest(trained, shards32, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shards32, shards, ignore=shutil.ignore_patterns("eval-cache"))
    args = ["--checkpoint", trained, "--shards", shards, "--num", 16, "--reals", 16, "--metrics", "fid"]
    first, _ = evaluate(*args)
    assert first.returncode == 0 and "cached" not in first.stderr, first.stderr[-3000:]
    manifest = json.loads((shards / "manifest.json").read_text())
    dropped = manifest["shards"].pop()                           # the set changes: one shard fewer
    manifest["count"] -= dropped["count"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    second, _ = evaluate(*args)
    assert second.returncode == 0 and "cached" not in second.stderr, second.stderr[-3000:]
    assert len(list((shards / "eval-cache").glob("real-inception-16-*"))) == 2
    third, _ = evaluate(*args)
    assert "reals: the cached features of 16 images" in third.stderr


def test_bad_input_is_one_line_and_a_nonzero_exit(trained, shards32, tmp_path):
    big = tmp_path / "g64.safetensors"
    G = Generator(nz=100, ngf=8, resolution=64)
    big.write_bytes(snapshot_bytes(G, step=0, kimg=0.0, metrics={}))
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((shards32 / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "count": 0}))
    cases = [
        (["--checkpoint", big, "--shards", shards32], "makes 64 px images but the shards"),
        (["--checkpoint", trained, "--num", 10**10], "--num 10000000000 with"),
        (["--checkpoint", trained, "--shards", empty], "the shard set is empty (count 0)"),
        (["--checkpoint", trained, "--metrics", "fid,isc"], "--metrics: unknown metric 'isc'"),
        (["--checkpoint", trained, "--num", 0], "--num: expected a positive count, got 0"),
    ]
    for args, says in cases:
        done, _ = evaluate(*args, timeout=120)
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert done.returncode != 0 and len(errors) == 1 and says in errors[0], done.stderr[-2000:]
