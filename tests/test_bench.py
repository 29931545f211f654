"""The benchmark harness's CPU smoke mode (what CI runs), so the harness never rots."""

import json

from perco.engine.cli import main


def test_bench_smoke(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--smoke", "--model", str(tiny_model), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert {r["backend"] for r in result["latency"]} == {"torch", "onnxruntime"}
    assert {(r["width"], r["height"]) for r in result["latency"]} == {(64, 64), (96, 64)}
    row = result["latency"][0]
    assert set(row["stages"]) == {"entropy_decode", "text_encode", "local_features", "denoise", "vae_decode"}
    assert row["decode_e2e"]["min_s"] <= row["decode_e2e"]["median_s"] <= row["decode_e2e"]["max_s"]
    assert row["unet_step_tflops"] > 0 and result["gemm_peak_tflops_fp32"] > 0
    assert result["flops"]["64x64"]["denoiser"] > 0
    assert [r["batch"] for r in result["throughput"] if r["backend"] == "torch"] == [1, 2]
    assert "| backend |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_bad_flags(tiny_model, capsys):
    assert main(["bench", "--model", str(tiny_model), "--sizes", "big"]) == 1
    assert "--sizes takes WxH" in capsys.readouterr().err
