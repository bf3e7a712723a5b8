"""The benchmarks must keep running (their numbers are for docs/PERFORMANCE.md, never asserted here)."""
import json
import os
import sys

import pytest

from conftest import run
from dcgan_dist.nets import metrics


def last_json(out):
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_throughput_runs_both_pipelines(shards32, celeba_parent):
    out = run([sys.executable, "benchmarks/data_throughput.py", "--shards", shards32, "--batch-size", "16",
               "--batches", "3", "--jpeg-root", celeba_parent / "celeba/img_align_celeba", "--http"], timeout=120)
    result = last_json(out)
    assert result["images_per_s"] > 0 and result["seeds_images_per_s"] > 0 and result["resolution"] == 32
    assert result["http_images_per_s"] > 0 and "the same, from http://127.0.0.1:" in out.stdout


def test_eval_cost_times_each_part_and_both_fid_paths_agree():
    out = run([sys.executable, "benchmarks/eval_cost.py", "--images", "8,40", "--repeats", "1"], timeout=120)
    result = last_json(out)
    assert [r["images"] for r in result["rows"]] == [8, 40]
    assert all(r["fid_relative_difference"] < 1e-6 and r["fid_s"] > 0 and r["swd_s"] > 0 for r in result["rows"])


@pytest.mark.slow          # gpu_check's CPU pass below runs the same script's legacy and eager rows
def test_train_throughput_reports_flops_and_peak_fraction():
    out = run([sys.executable, "benchmarks/train_throughput.py", "--steps", "1", "--batch-size", "2"], timeout=300)
    result = last_json(out)
    assert 2.0 < result["gflop_per_image"] < 2.6          # the paper's 64 px nets: about 2.27 GFLOP
    assert [(r["precision"], r["channels_last"]) for r in result["results"]] == [
        ("no", False), ("no", True), ("bf16", False), ("bf16", True)]
    assert all(r["images_per_s"] > 0 and r["fraction_of_matmul_peak"] > 0 for r in result["results"])


@pytest.mark.slow          # a benchmark of the demo job, not of the product's behaviour
def test_demo_memory_measures_every_process(shards32):
    out = run([sys.executable, "benchmarks/demo_memory.py", "--steps", "3", "--shards", shards32,
               "model.resolution=32", "train.num_samples=4", "eval.num_images=32"], timeout=300)
    result = last_json(out)
    assert result["processes"] >= 3                        # the launcher and both ranks, at least
    assert result["peak_rss_mb"] >= result["peak_pss_mb"] > 100


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """The GPU check is prepared on the CPU, so that GPU time only measures: every part must pass here."""
    out = run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu"], timeout=400,
              env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["part"] for p in report["parts"]] == ["data", "tests", "step", "loader", "train", "scaling",
                                                    "evaluate", "cpu"]
    assert all(p["ok"] for p in report["parts"]), report["parts"]
    assert {r["variant"] for r in report["step"]["results"]} == {"legacy", "eager"}
    assert report["train"][-1]["step"] == 6 and report["loader"]["images_per_s"] > 0
    assert report["scaling"]["gradient_mb"]["D"] > 0
    evaluate = report["evaluate"]                          # launch/evaluate.py on the trained run, end to end
    if metrics.inception_path(None) is not None:
        assert evaluate["fakes"] == 32 and evaluate["images_per_s_per_rank"] > 0
        assert evaluate["results"]["fid32_32"]["fid"] > 0
    assert report["cpu"]["ours"]["threads"] == len(report["cpu"]["cores"]) and report["cpu"]["ours"]["images_per_s"] > 0
    assert report["cpu"]["ours_onednn_weight_grads"]["images_per_s"] > 0     # the default's switch, measured off
    dnn = report["cpu"]["onednn"]                          # which kernels the convolutions really ran on
    assert dnn["isa"] and dnn["conv_kernels"] and min(dnn["matmul_tflops"].values()) > 0, dnn
    assert set(dnn["passes"]) == {"forward", "backward data", "backward weights"}, dnn["passes"]
    # All 13 (de)convolutions on oneDNN: D runs forward 3 times (real, fake, G's step); its weights get 2 grads.
    d2 = {r["pass"]: r["calls"] for r in dnn["layers"] if r["shape"].startswith("mb128_ic64oc128_ih32oh16")
          and r["primitive"] == "convolution"}
    assert d2 == {"forward": 3, "backward data": 3, "backward weights": 2}, dnn["layers"]
    small = [r for r in dnn["layers"] if r["pass"] == "backward weights" and "ih8oh4" in r["shape"]]
    assert small and all(r["as_conv_ms"] > 0 for r in small), small        # the forward form, timed beside
    assert all(r["ms"] > 0 and r["gflop"] > 0 for r in dnn["layers"]) and dnn["conv_ms"] > 0
    assert report["cpu"]["amx"] or not dnn["conv_uses_amx"]
    kinds = report["cpu"]["profile"]["kinds"]             # a DCGAN step is convolutions, on any CPU
    assert abs(sum(kinds.values()) - 1) < 0.01 and kinds["conv forward"] + kinds["conv backward"] > 0.5, kinds
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "logs.tar.gz", "train_metrics.jsonl"]
    assert "card:" in out.stdout and "scaling" in out.stdout
