import os
import sys

import pytest
import torch
import yaml

from conftest import ROOT, run
from dcgan_dist.config import ConfigError, load_config, save_config
from dcgan_dist.dist.setup import cpu_threads, fast_precision, loader_workers, resolve_mixed_precision
from dcgan_dist.train.trainer import check_choices


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_configs_load():
    for name in ("celeba64", "demo"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.resolution == 64
    paper = load_config(ROOT / "configs/celeba64.yaml")
    assert (paper.optim.lr, paper.optim.beta1, paper.model.nz, paper.model.ngf, paper.model.ndf) == \
        (2e-4, 0.5, 100, 64, 64)


def test_overrides_typed_like_yaml():
    cfg = load_config(None, ["train.steps=10", "optim.lr=2e-4", "wandb.entity=null", "data.shards=/x/y",
                             "train.channels_last=false"])
    assert cfg.train.steps == 10 and cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.wandb.entity is None and cfg.data.shards == "/x/y" and cfg.train.channels_last is False


@pytest.mark.parametrize("overrides, key", [
    (["train.stepz=3"], "train.stepz"),
    (["nope=1"], "nope"),
    (["data.batch_size=big"], "data.batch_size"),
    (["train.steps=1.5"], "train.steps"),
    (["train.steps=true"], "train.steps"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=-4"], "data.batch_size"),
    (["model.resolution=48"], "model.resolution"),
    (["wandb.mode=sometimes"], "wandb.mode"),
    (["optim.beta1=1.5"], "optim.beta1"),
    (["train=3"], "train"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert f"'{key}'" in str(exc.value)


def test_unknown_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.ngff'"):
        load_config(write(tmp_path, {"model": {"ngff": 3}}))


def test_saved_config_reloads_with_config_as_it_is(tmp_path):
    cfg = load_config(None, ["seed=7", "model.ngf=8", "gan.diffaugment=color", "optim.ttur_lr_d=1e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg             # no run facts mixed in


def test_unknown_eval_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.metrics.*'is'.*fid, swd, kid, pr"):
        check_choices(load_config(None, ["eval.metrics=fid,is"]))
    assert load_config(None, ["eval.metrics="]).eval.metrics == ""


def test_mixed_precision_follows_launcher():
    assert resolve_mixed_precision(None, "bf16") == "bf16"
    assert resolve_mixed_precision("bf16", "bf16") == "bf16"
    assert resolve_mixed_precision("fp16", None) == "fp16"
    assert resolve_mixed_precision(None, None) == fast_precision()      # nobody said: the fast one
    assert resolve_mixed_precision("no", None) == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        resolve_mixed_precision("fp16", "bf16")


@pytest.mark.parametrize("args, needle", [
    (["train.steps=-1"], "'train.steps'"),
    (["data.workers=2"], "'data.workers'"),
])
def test_cli_error_is_one_line_and_exit_2(args, needle):
    out = run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml", *args], timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_the_reference_in_docs_is_the_one_the_schema_generates():
    from dcgan_dist.config import reference

    text = (ROOT / "docs/CONFIG.md").read_text()
    assert text[text.index("| key |"):] == reference(), \
        "docs/CONFIG.md is stale: regenerate its table with `python -m dcgan_dist.config`"


def test_loader_workers_default_to_none_on_cpu_and_some_per_gpu():
    assert loader_workers(None, torch.device("cpu"), 2) == 0        # the step needs both cores
    assert loader_workers(3, torch.device("cpu"), 2) == 3           # an explicit value always wins
    assert 1 <= loader_workers(None, torch.device("cuda"), 1) <= 4   # decides from the device type alone
    assert loader_workers(None, torch.device("cuda"), 10_000) == 1  # never 0 on a GPU, even when cores are few


def test_cpu_threads_share_the_cores_among_the_ranks(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_threads(None) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert cpu_threads(None) == 1                                   # never 0
    assert cpu_threads(3) == 3                                      # an explicit value always wins
