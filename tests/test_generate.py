"""The trained generator, used: snapshots, launch/generate.py (grid, folder, interpolation, arithmetic),
the attribute classifier, and every bad input. A real (1-rank) training run makes the generator."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run, saved_net
from dcgan_dist.data.celeba import open_source
from dcgan_dist.data.shards import Sharding, write_shards

DRAWN = ("Smiling", "Male", "Eyeglasses", "Black_Hair", "Blond_Hair", "Wearing_Lipstick", "Mouth_Slightly_Open")


@pytest.fixture(scope="module")
def trained(trained32) -> Path:
    return trained32


def generate(*args, timeout=300):
    return run([sys.executable, "launch/generate.py", *map(str, args)], timeout=timeout)


def test_snapshot_beside_every_checkpoint_and_the_best(trained):
    from dcgan_dist.run.snapshot import load_snapshot

    for step in (150, 300):
        _, meta = load_snapshot(trained / f"checkpoints/step-{step:08d}/generator.safetensors")
        assert meta["step"] == step and meta["resolution"] == 32 and meta["nz"] == 100 and meta["ngf"] == 32
        assert meta["kimg"] == pytest.approx(step * 64 / 1000) and "swd" in meta["metrics"]
    best = trained / "checkpoints/best/generator.safetensors"
    assert load_snapshot(best)[1]["step"] == json.loads((trained / "checkpoints/best/trainer_state.json").read_text())["step"]
    assert (trained / "generator.safetensors").read_bytes() == best.read_bytes()


def test_plain_torch_load_gives_the_trainers_samples(trained):
    """Only torch, safetensors and the model class: no accelerate, no config file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dcgan_dist.nets.models import Generator, sample

    path = trained / "checkpoints/step-00000300/generator.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    G = Generator(nz=int(meta["nz"]), ngf=int(meta["ngf"]), resolution=int(meta["resolution"]))
    G.load_state_dict(load_file(str(path)))
    ema = Generator(nz=100, ngf=32, resolution=32)              # what the trainer samples from: its EMA
    ema.load_state_dict(saved_net(trained / "checkpoints/step-00000300", "ema"))
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(G, z), sample(ema, z))
    code = ("import sys; from dcgan_dist.run.snapshot import load_snapshot; G, meta = load_snapshot(sys.argv[1]); "
            "assert 'accelerate' not in sys.modules and meta['step'] == 300")
    out = run([sys.executable, "-c", code, path], timeout=60)
    assert out.returncode == 0, out.stderr                         # the loader itself never needs accelerate


def test_grid_and_folder_outputs_and_determinism(trained, tmp_path):
    out = generate("--checkpoint", trained, "--num", 16, "--output", tmp_path / "a.png", "--seed", 3)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "a.png").size == (4 * 34 + 2, 4 * 34 + 2)     # 4x4 of 32 px, 2 px gutters
    assert generate("--checkpoint", trained, "--num", 16, "--output", tmp_path / "b.png", "--seed", 3).returncode == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert generate("--checkpoint", trained, "--num", 16, "--output", tmp_path / "c.png", "--seed", 4).returncode == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    out = generate("--checkpoint", trained / "checkpoints/best", "--num", 70, "--output", tmp_path / "pngs")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == [f"{i:06d}.png" for i in range(70)]
    assert Image.open(tmp_path / "pngs/000069.png").size == (32, 32)


def test_interpolation_strips_and_gif(trained, tmp_path):
    out = generate("--checkpoint", trained / "generator.safetensors", "--interpolate", 3, "--steps", 6,
                   "--output", tmp_path / "walk.png")
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "walk.png").size == (6 * 34 + 2, 3 * 34 + 2)
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 2 * 6 - 2 and gif.size == (3 * 34 + 2, 34 + 2)


def test_classifier_beats_chance_on_held_out_images(faces32):
    out = run([sys.executable, "launch/attributes.py", "--shards", faces32], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out images: 120" in out.stdout and "Smiling" in out.stdout       # accuracy per attribute
    assert "training the attribute classifier" in out.stderr                      # with a progress bar
    from dcgan_dist.eval.attributes import load_classifier

    _, info = load_classifier(faces32 / "attributes.safetensors")                  # cached by the shards
    report = info["report"]["attributes"]
    for name in DRAWN:
        assert report[name]["balanced_accuracy"] > 0.75, (name, report[name])      # chance is 0.5
    assert report["Young"]["balanced_accuracy"] < 0.65        # drawn at random: nothing to learn, and it shows


def test_arithmetic_end_to_end(trained, faces32, tmp_path):
    out = generate("--checkpoint", trained, "--output", tmp_path / "arith.png",
                   "--arithmetic", "Blond_Hair,~Male - Black_Hair,~Male + Black_Hair,Male", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Image.open(tmp_path / "arith.png").size[0] > 400
    assert (faces32 / "attributes.safetensors").is_file()     # trained on first use (or above), cached by the shards
    probs = dict(part.split("=") for part in out.stderr.split("(result: ")[1].rstrip(")\n").split())
    assert float(probs["P(Blond_Hair)"]) > float(probs["P(Black_Hair)"]), out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "/nonexistent"], "--checkpoint '/nonexistent': no such file or directory"),
    (["--checkpoint", "{empty}"], "no generator.safetensors in it"),
    (["--checkpoint", "{junk}"], "not a readable safetensors file"),
    (["--checkpoint", "{run}", "--arithmetic", "Smiling - Hat"], "unknown attribute 'Hat'"),
    (["--checkpoint", "{run}", "--arithmetic", "Smiling -"], "malformed expression"),
    (["--checkpoint", "{run}", "--num", "0"], "--num: expected a positive count"),
    (["--checkpoint", "{run}", "--arithmetic", "Smiling", "--attributes", "/nope"], "--attributes '/nope': no such file"),
])
def test_bad_generate_input_is_one_line(trained, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    subs = {"{empty}": tmp_path / "empty", "{junk}": tmp_path / "junk.safetensors", "{run}": trained}
    out = generate(*[subs.get(a, a) for a in args], "--output", tmp_path / "x.png")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr


def test_arithmetic_needs_shards_with_attributes(tmp_path):
    """A plain image folder has no attribute labels: the classifier says so."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (40, 40), (i * 5, 0, 0)).save(folder / f"{i}.png")
    write_shards(open_source(folder, "all"), tmp_path / "plain", Sharding(resolution=32, split="all", progress=False))
    out = run([sys.executable, "launch/attributes.py", "--shards", tmp_path / "plain"], timeout=120)
    assert out.returncode == 1 and "have no attribute labels" in out.stderr and len(out.stderr.strip().splitlines()) == 1
