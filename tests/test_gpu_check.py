"""benchmarks/gpu_check.py in its CPU dry run (tiny models), so the one prepared GPU script cannot rot. The GPU
steps themselves (kernels, CUDA graphs, FP16, compute-sanitizer) only run on a GPU machine."""

import json

import pytest

from perco.benchmarks import gpu_check


def test_dry_run_writes_every_result(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png", "results.json", "results.md"]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["dry_run"] and result["device"]["device"] == "cpu" and "kernels_skipped" in result
    (pipeline,) = result["pipelines"]
    variants = pipeline["variants"]
    assert set(variants) == {label for label, _, _ in gpu_check.DRY_VARIANTS}
    for v in variants.values():
        assert v["stages"]["total"]["median_ms"] > 0 and v["denoiser_step"]["median_ms"] > 0
        assert v["images_per_s_batched"] > 0 and v["psnr_vs_fp32_reference"] > 30
    assert "## perco-sd 0.0313" in (tmp_path / "results.md").read_text()


def test_no_gpu_without_dry_run_is_one_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run is benchmarks/gpu_check.py itself")
    assert gpu_check.main(["--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA GPU here")
