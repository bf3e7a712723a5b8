"""Bad input of every kind gets one clear line and a non-zero exit, or a counted skip; never a hang."""
import json
import shutil
import sys

import pytest
import torch

from conftest import accelerate_launch, read_metrics, run


def train_args(shards, run_dir, *extra):
    return [sys.executable, "launch/train.py", "--config", "configs/demo.yaml", f"data.shards={shards}",
            f"run_dir={run_dir}", "model.resolution=32", "model.ngf=8", "model.ndf=8", "data.batch_size=8",
            "data.shuffle_buffer=16", "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=1000",
            "wandb.mode=disabled", "eval.metrics=", *extra]


def one_error_line(out, code: int) -> str:
    assert out.returncode == code, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return errors[0]


@pytest.fixture
def damaged_celeba(tmp_path, celeba_parent):
    root = tmp_path / "celeba"
    shutil.copytree(celeba_parent / "celeba", root)
    images = root / "img_align_celeba"
    (images / "000001.jpg").write_bytes(b"")                                    # zero bytes
    (images / "000002.jpg").write_bytes((images / "000002.jpg").read_bytes()[:200])   # truncated
    (images / "000003.jpg").write_text("not an image at all")                   # wrong content
    (images / "notes.txt").write_text("stray file")                             # not listed: ignored
    return tmp_path


def shard(inp, out, *extra):
    return run([sys.executable, "launch/shard.py", "--input", inp, "--output", out, "--resolution", "32",
                "--workers", "1", *extra], timeout=120)


def test_sharder_skips_and_counts_unreadable_images(damaged_celeba, tmp_path):
    out = shard(damaged_celeba, tmp_path / "s", "--max-skip-fraction", "0.05")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["skipped"]["count"] == 3 and manifest["count"] == 190
    assert sorted(f.split(":")[0] for f in manifest["skipped"]["files"]) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert out.stderr.count("warning: skipped unreadable image") == 3


def test_sharder_fails_above_the_skip_threshold(damaged_celeba, tmp_path):
    line = one_error_line(shard(damaged_celeba, tmp_path / "s"), 1)   # default 1%: 3 of 193 is too many
    assert "3 of 193 images unreadable" in line and "manifest not written" in line
    assert not (tmp_path / "s/manifest.json").exists()


@pytest.mark.parametrize("name", ["list_eval_partition.txt", "list_attr_celeba.txt"])
def test_missing_celeba_metadata_is_named(tmp_path, celeba_parent, name):
    shutil.copytree(celeba_parent / "celeba", tmp_path / "celeba")
    (tmp_path / "celeba" / name).unlink()
    line = one_error_line(shard(tmp_path, tmp_path / "s"), 1)
    assert name in line and "required CelebA metadata file is missing" in line


def test_sharder_output_not_writable(tmp_path, celeba_parent):
    (tmp_path / "file").write_text("")
    line = one_error_line(shard(celeba_parent, tmp_path / "file" / "out"), 1)
    assert "not writable" in line and str(tmp_path / "file" / "out") in line


@pytest.fixture
def damaged_shards(tmp_path, shards32):
    out = tmp_path / "shards"
    shutil.copytree(shards32, out)
    victim = out / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])      # truncated mid-member
    return out


def test_truncated_shard_is_reported_left_out_counted_and_logged(damaged_shards, tmp_path):
    out = run(train_args(damaged_shards, tmp_path / "run", "train.steps=40", "data.num_workers=0"), timeout=200)
    assert out.returncode == 0, out.stderr[-2000:]
    size = (damaged_shards / "train-000001.tar").stat().st_size
    assert f"train-000001.tar' is {size} bytes, not the {2 * size}" in out.stderr
    assert "training without it (counted in data_errors)" in out.stderr
    assert "skipping unreadable data" not in out.stderr         # it is never read: nothing of it is trained on
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["data_errors"] == 1 and rows[-1]["step"] == 40


def test_a_changed_shard_of_the_right_size_is_left_out_too(tmp_path, shards32):
    d = tmp_path / "shards"
    shutil.copytree(shards32, d)
    victim = d / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[-2000] ^= 0xFF                                         # one flipped byte, inside an image block
    victim.write_bytes(bytes(data))
    out = run(train_args(d, tmp_path / "run", "train.steps=3", "data.num_workers=0"), timeout=200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train-000002.tar' does not match the sha256 in its manifest" in out.stderr
    assert read_metrics(tmp_path / "run")[-1]["data_errors"] == 1


def test_all_shards_unreadable_stops_cleanly(tmp_path, shards32):
    out_dir = tmp_path / "shards"
    shutil.copytree(shards32, out_dir)
    for tar in out_dir.glob("*.tar"):
        tar.write_bytes(b"\0" * 10 + b"garbage" * 100)
    line = one_error_line(run(train_args(out_dir, tmp_path / "run", "train.steps=5", "data.num_workers=1"),
                              timeout=120), 3)
    assert f"no shard of '{out_dir}' matches its manifest" in line


@pytest.mark.parametrize("setup, needle", [
    ("empty", "no manifest.json"),
    ("missing_shard", "lists shard 'train-000002.tar' which is missing"),
    ("bad_json", "not valid JSON"),
    ("old_format", "older format dcgan-dist-shards/1 (one JPEG per sample); re-shard with launch/shard.py"),
])
def test_broken_shard_dirs(tmp_path, shards32, setup, needle):
    d = tmp_path / "shards"
    if setup == "empty":
        d.mkdir()
    else:
        shutil.copytree(shards32, d)
        if setup == "missing_shard":
            (d / "train-000002.tar").unlink()
        elif setup == "old_format":
            manifest = json.loads((d / "manifest.json").read_text())
            (d / "manifest.json").write_text(json.dumps({**manifest, "format": "dcgan-dist-shards/1"}))
        else:
            (d / "manifest.json").write_text("{ not json")
    assert needle in one_error_line(run(train_args(d, tmp_path / "run", "train.steps=2"), timeout=60), 1)


def test_run_dir_not_writable(tmp_path, shards32):
    (tmp_path / "file").write_text("")
    line = one_error_line(run(train_args(shards32, tmp_path / "file" / "run", "train.steps=2"), timeout=60), 1)
    assert "'run_dir'" in line and "not writable" in line


def test_divergence_stops_both_ranks_naming_the_step_and_keeps_the_checkpoint(tmp_path, shards32):
    base = train_args(shards32, tmp_path / "run", "train.ckpt_every=3")[1:]
    first = accelerate_launch(["--mixed_precision", "no", *base, "train.steps=6"], timeout=200)
    assert first.returncode == 0, first.stderr[-2000:]
    # Same run, resumed with a learning rate that blows up: the first new step goes non-finite.
    out = accelerate_launch(["--mixed_precision", "no", *base, "train.steps=20", "optim.lr=1e20"], timeout=200)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss at step 7" in errors[0], out.stderr[-2000:]
    last_good = tmp_path / "run/checkpoints/step-00000006"
    assert f"Last good checkpoint: {last_good}" in errors[0]
    assert (last_good / "COMPLETE").is_file()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_skip_mode_counts_then_gives_up(tmp_path, shards32):
    out = run(train_args(shards32, tmp_path / "run", "train.steps=50", "optim.lr=1e20", "train.nonfinite=skip",
                         "train.max_consecutive_skips=3"), timeout=120)
    line = one_error_line(out, 3)
    assert "3 updates in a row skipped" in line


def test_cuda_graph_demanded_without_cuda_is_one_line(tmp_path, shards32):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error_line(run(train_args(shards32, tmp_path / "run", "train.steps=2", "train.cuda_graph=true"),
                              timeout=120), 2)
    assert "'train.cuda_graph' is true but this run has no CUDA device" in line
