"""`perco evaluate` (perco.scale.evaluate, perco.scale.metrics).

The metric networks here are the RANDOM STAND-INS of `write_stand_ins` (a TorchScript module with the
Inception call signature, a tiny random CLIPModel), and the codec models are tiny random models: every FID,
KID and CLIP value in these tests is MEANINGLESS. The tests check plumbing and exact bookkeeping: the rate
(bitstream bytes * 8 / pixels, exactly), PSNR against an independent numpy computation, the report files,
keys and warnings, resuming, and the errors. LPIPS needs torchvision; where it does not import (this CPU
torch), the report must say so. The Ray-backed runs use a real local Ray cluster (no mocks).
"""

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CLIP_TOKENIZER, random_image
from perco.engine.cli import main

pytest.importorskip("torchmetrics")
pytest.importorskip("ray")

from perco.scale import metrics as m  # noqa: E402
from perco.scale.batch import read_captions  # noqa: E402
from perco.scale.evaluate import REPORT_JSON, REPORT_MD, REPORT_PLOT, match_captions  # noqa: E402

STEPS = "1"
SIDE = 192  # MS-SSIM with 5 scales and an 11x11 kernel needs sides > 160


def _strict_json(path):
    """json.load that refuses NaN / Infinity: the report must be standard JSON."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def metric_stand_ins(tmp_path_factory):
    """Random stand-ins, 64 Inception features (the same call; FID of 2048x2048 takes a minute on this CPU), and
    a random AlexNet for LPIPS where torchvision imports."""
    folder = tmp_path_factory.mktemp("metrics")
    torchvision = "does not import" not in (m.availability(folder)["lpips"] or "")  # then LPIPS runs too
    return m.write_stand_ins(folder / "models", CLIP_TOKENIZER, features=64, lpips_backbone=torchvision)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-images")
    for i in range(3):
        Image.fromarray(random_image(SIDE, SIDE, seed=i)).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, tiny_model, builtin_tokenizer_model, metric_stand_ins, image_folder):
    """One `perco evaluate` over two rates (0.0313, 0.1250) on a real local Ray cluster."""
    out = tmp_path_factory.mktemp("eval") / "report"
    captions = out.parent / "captions.json"
    captions.write_text(json.dumps({"im0.png": "a red barn on a hill", "im1": "a cat"}))
    argv = ["evaluate", "--images", str(image_folder), "--captions", str(captions), "-o", str(out),
            "--model", str(tiny_model), "--model", str(builtin_tokenizer_model),
            "--metrics-models", str(metric_stand_ins), "--steps", STEPS, "--actors", "1", "-q"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return {"code": code, "out": out, "argv": argv, "stderr": err.getvalue()}


def test_report_files_rate_and_psnr(ray_run, image_folder, tiny_model, builtin_tokenizer_model, metric_stand_ins):
    out = ray_run["out"]
    assert ray_run["code"] == 1  # broken.png failed: the report is complete, the exit code says so
    error_lines = [line for line in ray_run["stderr"].splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "broken.png" in error_lines[0], ray_run["stderr"][-2000:]
    report = _strict_json(out / REPORT_JSON)
    assert report["warning"] == m.STAND_IN_WARNING and report["metrics"]["stand_ins"] is True
    assert m.STAND_IN_WARNING in (out / REPORT_MD).read_text()
    with Image.open(out / REPORT_PLOT) as plot:
        assert plot.format == "PNG" and plot.size[0] > 400
    assert [r["model"] for r in report["models"]] == [str(tiny_model), str(builtin_tokenizer_model)]
    assert report["captions"]["without_caption"] == ["broken.png", "im2.png"]
    for result in report["models"]:
        assert [f["image"] for f in result["failed"]] == ["broken.png"]
        assert result["failed"][0]["stage"] == "compress"
        assert result["images_scored"] == 3 and [r["image"] for r in result["images"]] == ["im0.png", "im1.png",
                                                                                           "im2.png"]
        assert set(result["metrics"]) >= {"psnr", "ms_ssim", "fid", "kid", "kid_std", "clip_score"}
        for name in ("psnr", "ms_ssim", "fid", "kid", "clip_score"):
            assert isinstance(result["metrics"][name], float), (name, result["metrics"])
        bitstreams = out / "work" / result["work"]["bitstreams"]
        for row in result["images"]:
            stream = bitstreams / row["image"].replace(".png", ".perco")
            assert row["bytes"] == stream.stat().st_size
            assert row["bpp"] == stream.stat().st_size * 8 / (SIDE * SIDE)  # exactly
            original = np.asarray(Image.open(image_folder / row["image"]).convert("RGB"))
            decoded = np.asarray(Image.open(out / "work" / result["work"]["decoded"] / row["image"]).convert("RGB"))
            assert row["psnr"] == pytest.approx(m.psnr_numpy(original, decoded), abs=1e-5)
            assert 0 <= row["ms_ssim"] <= 1
        assert result["bpp"]["mean"] == pytest.approx(np.mean([r["bpp"] for r in result["images"]]), rel=1e-12)
        assert result["metrics"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["images"]]), rel=1e-12)
    low, high = (r["bpp"]["mean"] for r in report["models"])
    assert low < high  # two rates: two points per metric on the plot
    captions = {r["image"]: r["caption"] for r in report["models"][0]["images"]}
    assert captions == {"im0.png": "a red barn on a hill", "im1.png": "a cat", "im2.png": ""}
    _check_clip_scores(report["models"][0], out, metric_stand_ins)
    if "lpips" in report["metrics"]["unavailable"]:
        assert "torchvision" in report["metrics"]["unavailable"]["lpips"] or \
            "alexnet" in report["metrics"]["unavailable"]["lpips"]
    else:
        assert isinstance(report["models"][0]["metrics"]["lpips"], float)


def _check_clip_scores(result, out, stand_ins):
    """Each image's CLIP score is 100 * max(cos, 0) of ITS decoded image and ITS caption, recomputed with
    transformers directly from the stand-in folder (random network: the values themselves mean nothing)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(stand_ins / m.CLIP_FOLDER).eval()
    processor = CLIPProcessor.from_pretrained(stand_ins / m.CLIP_FOLDER)
    scores = []
    for row in result["images"]:
        decoded = np.asarray(Image.open(out / "work" / result["work"]["decoded"] / row["image"]).convert("RGB"))
        inputs = processor(text=[row["caption"]], images=[decoded], return_tensors="pt", padding=True)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"])
            text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
        expected = max(100 * float(torch.nn.functional.cosine_similarity(image, text)), 0.0)
        assert row["clip_score"] == pytest.approx(expected, abs=1e-3), row
        scores.append(row["clip_score"])
    assert min(scores) > 0 and len(set(scores)) == len(scores)
    assert result["metrics"]["clip_score"] == pytest.approx(np.mean(scores), abs=1e-4)


def test_rerun_resumes_and_missing_metrics_folder(ray_run, tmp_path):
    """A copy of the report folder rerun with a metrics folder that does not exist: nothing is coded again,
    the network metrics are unavailable with a reason, PSNR and MS-SSIM are the same."""
    out = tmp_path / "report"
    shutil.copytree(ray_run["out"], out)
    before = _strict_json(out / REPORT_JSON)
    argv = [a if a != str(ray_run["out"]) else str(out) for a in ray_run["argv"]]
    argv[argv.index("--metrics-models") + 1] = str(tmp_path / "no-such-folder")
    assert main(argv) == 1  # broken.png still fails
    report = _strict_json(out / REPORT_JSON)
    assert report["warning"] is None and m.STAND_IN_WARNING not in (out / REPORT_MD).read_text()
    assert report["metrics"]["computed"] == ["psnr", "ms_ssim"]
    assert set(report["metrics"]["unavailable"]) == {"lpips", "fid", "kid", "clip_score"}
    assert all("no-such-folder" in why or "torchvision" in why for why in report["metrics"]["unavailable"].values())
    for old, new in zip(before["models"], report["models"]):
        assert new["jobs"]["compress"]["done"] == 0 and new["jobs"]["compress"]["skipped"] == 3
        assert new["jobs"]["decompress"]["done"] == 0 and new["jobs"]["decompress"]["skipped"] == 3
        assert new["metrics"]["psnr"] == old["metrics"]["psnr"] and "fid" not in new["metrics"]
        assert [r["bpp"] for r in new["images"]] == [r["bpp"] for r in old["images"]]


@pytest.mark.parametrize("argv, code, match", [
    (["--metrics", "psnr,sharpness"], 2, "unknown metric 'sharpness'"),
    (["--metrics", "fid"], 1, "metric fid was asked for but is unavailable"),
    (["--steps", "0"], 2, "expected a positive integer"),
    (["--images", "/no/such/folder"], 1, "does not exist"),
    (["--captions", "CAPTIONS_BAD"], 1, "line 1: expected 'name<TAB>caption'"),
    (["-o", "OUTPUT_FILE"], 1, "is a file"),
    (["--model", "/no/such/model"], 1, "/no/such/model"),
])
def test_bad_flags_one_error_line(argv, code, match, image_folder, tiny_model, tmp_path, capsys):
    bad = tmp_path / "captions.tsv"
    bad.write_text("im0.png a caption without a tab\n")
    (tmp_path / "file").write_text("x")
    base = {"--images": str(image_folder), "-o": str(tmp_path / "report"),
            "--metrics-models": str(tmp_path / "absent"), "--model": str(tiny_model)}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = {"CAPTIONS_BAD": str(bad), "OUTPUT_FILE": str(tmp_path / "file")}.get(value, value)
    args = ["evaluate"] + [x for kv in base.items() for x in kv]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
    assert not (tmp_path / "report" / REPORT_JSON).exists()


def test_missing_option_is_one_line(capsys):
    assert main(["evaluate", "-o", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--images" in err[0]


def test_captions_json_tsv_and_matching(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"a.png": "one", "b": "two", "zzz.png": "nobody"}))
    (tmp_path / "c.tsv").write_text("a.png\tone\n\nb\ttwo\twith a tab\n")
    images = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    assert match_captions(images, read_captions(tmp_path / "c.json")) == (
        {"a.png": "one", "b.jpg": "two", "c.png": ""}, ["c.png"], ["zzz.png"])
    assert read_captions(tmp_path / "c.tsv") == {"a.png": "one", "b": "two\twith a tab"}
    (tmp_path / "bad.json").write_text('{"a.png": 3}')
    with pytest.raises(m.PercoError, match="JSON object of"):
        read_captions(tmp_path / "bad.json")
    with pytest.raises(m.PercoError, match="does not exist"):
        read_captions(tmp_path / "none.json")


def test_psnr_identical_and_small_images(metric_stand_ins):
    image = random_image(SIDE, SIDE, seed=5)
    assert m.psnr_numpy(image, image) == math.inf
    suite = m.MetricSuite(["psnr", "ms_ssim"], metric_stand_ins)
    same = suite.add_pair(image, image)
    assert same["psnr"] is None and same["identical"] is True and same["ms_ssim"] == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-9, 10, image.shape), 0, 255).astype(np.uint8)
    value = suite.add_pair(image, noisy)["psnr"]
    assert value == pytest.approx(m.psnr_numpy(image, noisy), abs=1e-5) and 25 < value < 40
    small = suite.add_pair(image[:100, :120], noisy[:100, :120])
    assert small["ms_ssim"] is None and small["psnr"] > 0
    summary = suite.summary()
    assert summary["psnr"] == pytest.approx((value + small["psnr"]) / 2)  # the identical pair is left out
    assert "161" in summary["notes"]["ms_ssim"]
    with pytest.raises(m.PercoError, match="decoded image is 120x100"):
        suite.add_pair(image, noisy[:100, :120])


def test_reference_set_is_shared_across_models(metric_stand_ins):
    """FID/KID of the second model (after next_model) equal those of a fresh suite given the same images.
    The values are meaningless (random stand-in network); their bookkeeping is what is checked."""
    originals = [random_image(SIDE, SIDE, seed=s) for s in range(4)]
    first = [np.roll(o, 7, axis=1) for o in originals]
    second = [255 - o for o in originals]
    shared = m.MetricSuite(["fid", "kid"], metric_stand_ins)
    for o, d in zip(originals, first):
        shared.add_real(o)
        shared.add_pair(o, d)
    shared.summary()
    shared.next_model()
    for o, d in zip(originals, second):
        shared.add_pair(o, d)
    fresh = m.MetricSuite(["fid", "kid"], metric_stand_ins)
    for o, d in zip(originals, second):
        fresh.add_real(o)
        fresh.add_pair(o, d)
    a, b = shared.summary(), fresh.summary()
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-6) and a["kid"] == pytest.approx(b["kid"], rel=1e-6)
    assert a["fid"] > 0
    one = m.MetricSuite(["fid"], metric_stand_ins)
    one.add_real(originals[0])
    one.add_pair(originals[0], first[0])
    assert one.summary() == {"fid": None, "notes": {"fid": "FID needs at least 2 original and 2 decoded images"}}


def test_stand_in_inception_has_the_real_call_signature(metric_stand_ins):
    import torch

    net = torch.jit.load(str(metric_stand_ins / m.INCEPTION_FILE))
    x = torch.rand(2, 3, 64, 80) * 255
    assert net(x, return_features=True).shape == (2, 64) and net(x).shape == (2, 1008)
    full = torch.jit.script(m._stand_in_inception(m.INCEPTION_FEATURES))
    assert full(x, return_features=True).shape == (2, 2048)
    features = m.inception_module(metric_stand_ins / m.INCEPTION_FILE, "cpu")
    assert features.num_features == 64
    assert m.stand_ins(metric_stand_ins) and (metric_stand_ins / m.STAND_IN_MARKER).read_text().startswith(
        m.STAND_IN_WARNING)


def test_availability_reasons(tmp_path, metric_stand_ins):
    none = m.availability(None)
    assert none["psnr"] is None and none["ms_ssim"] is None and "no --metrics-models" in none["fid"]
    there = m.availability(metric_stand_ins)
    assert there["fid"] is None and there["kid"] is None and there["clip_score"] is None
    (tmp_path / "empty").mkdir()
    empty = m.availability(tmp_path / "empty")
    assert m.INCEPTION_FILE in empty["fid"] and "clip" in empty["clip_score"]
    assert ("torchvision" in empty["lpips"]) or ("alexnet" in empty["lpips"])


def test_without_torchmetrics_is_an_extension_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(m.ExtensionError, match=r"pip install 'perco-engine\[eval,scale\]'"):
        m.require_torchmetrics()


def test_module_imports_stay_light():
    code = ("import sys, perco.scale.evaluate, perco.scale.cli; "
            "heavy = [n for n in ('torch', 'torchmetrics', 'ray', 'transformers') if n in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_writer_inf_nan_and_no_matplotlib(ray_run, tmp_path, monkeypatch):
    """write_report on the Ray run's report, edited: an identical image shows as inf in the markdown, a NaN
    becomes null in standard JSON, and without matplotlib the report says there is no plot."""
    from perco.scale.evaluate import write_report

    report = _strict_json(ray_run["out"] / REPORT_JSON)
    row = report["models"][0]["images"][0]
    row.update(psnr=None, identical=True)
    report["models"][1]["metrics"]["fid"] = float("nan")
    write_report(tmp_path, report)
    assert f"| {row['image']} | {SIDE}x{SIDE} | {row['bytes']} | {row['bpp']:.4f} | inf |" in \
        (tmp_path / REPORT_MD).read_text()
    written = _strict_json(tmp_path / REPORT_JSON)
    assert written["models"][1]["metrics"]["fid"] is None and written["plot"]["file"] == REPORT_PLOT
    (tmp_path / REPORT_PLOT).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    write_report(tmp_path, report)
    assert not (tmp_path / REPORT_PLOT).exists()
    assert "matplotlib is not installed" in _strict_json(tmp_path / REPORT_JSON)["plot"]["note"]
    assert "matplotlib is not installed" in (tmp_path / REPORT_MD).read_text()


def test_broken_network_and_missing_gpu_fail_before_any_work(metric_stand_ins, image_folder, tiny_model, tmp_path,
                                                             capsys):
    import torch

    broken = tmp_path / "metrics"
    shutil.copytree(metric_stand_ins, broken)
    (broken / m.INCEPTION_FILE).write_bytes(b"not a TorchScript archive")
    args = ["evaluate", "--images", str(image_folder), "-o", str(tmp_path / "report"), "--model", str(tiny_model),
            "--metrics-models", str(broken), "--metrics", "psnr,fid"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot load the metric networks of") and "fid" in err[0], err
    assert not (tmp_path / "report").exists()
    if not torch.cuda.is_available():
        assert main(args[:-4] + ["--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "torch sees no CUDA GPU" in err[0], err


def test_fid_and_kid_match_numpy_on_the_stand_in_features(metric_stand_ins):
    """FID and KID through torchmetrics and the Inception wrapper equal a numpy computation on the same
    network's features of the clean-resized images (the stand-in network: the values are meaningless)."""
    import torch

    originals = [random_image(96, 128, seed=s) for s in range(6)]
    decoded = [np.clip(o.astype(int) * 3 // 4 + 40, 0, 255).astype(np.uint8) for o in originals]
    suite = m.MetricSuite(["fid", "kid"], metric_stand_ins)
    for o, d in zip(originals, decoded):
        suite.add_real(o)
        suite.add_pair(o, d)
    got = suite.summary()
    net = torch.jit.load(str(metric_stand_ins / m.INCEPTION_FILE))

    def features(images):
        x = torch.from_numpy(np.stack([m.clean_resize(i) for i in images]))
        with torch.no_grad():
            return net(x, return_features=True).double().numpy()  # [N, 64]

    real, fake = features(originals), features(decoded)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    fid = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert got["fid"] == pytest.approx(fid, rel=1e-3, abs=1e-6)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    n = len(originals)  # every subset holds all images: KID is exact, its std 0
    off = (1 - np.eye(n)).astype(bool)
    kid = kernel(real, real)[off].mean() + kernel(fake, fake)[off].mean() - 2 * kernel(real, fake).mean()
    assert got["kid"] == pytest.approx(kid, rel=1e-3, abs=1e-7) and got["kid_std"] == pytest.approx(0, abs=1e-6)


def test_lpips_with_a_random_alexnet_backbone(tmp_path):
    """LPIPS through torchmetrics with a RANDOM torchvision AlexNet written by write_stand_ins (its values are
    meaningless): identical images give 0, different ones more, and MetricSuite's value equals torchmetrics'
    own metric called on the 0..1 images. Runs where torchvision imports; this project's CI torch (2.13 CPU)
    has no torchvision that imports beside it, so there it skips."""
    reason = m.availability(tmp_path)["lpips"]  # tmp_path has no backbone yet: only a torchvision failure skips
    if reason is not None and "does not import" in reason:
        pytest.skip(reason)
    import torch
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    folder = m.write_stand_ins(tmp_path / "models", CLIP_TOKENIZER, features=64, lpips_backbone=True)
    assert m.availability(folder)["lpips"] is None
    suite = m.MetricSuite(["lpips"], folder)
    a, b = random_image(64, 64, seed=1), random_image(64, 64, seed=2)
    assert suite.add_pair(a, a)["lpips"] == pytest.approx(0.0, abs=1e-6)
    value = suite.add_pair(a, b)["lpips"]
    assert value > 1e-4
    with m._torch_home(folder / m.TORCH_HOME):
        reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    as_unit = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0  # noqa: E731
    assert value == pytest.approx(float(reference(as_unit(b), as_unit(a))), rel=1e-5)
