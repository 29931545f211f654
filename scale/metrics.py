"""The metrics of `perco evaluate`: PSNR, MS-SSIM, LPIPS, FID, KID and CLIP score through torchmetrics.

Every metric network loads from one local folder (`--metrics-models DIR`); nothing is downloaded:

    DIR/inception-2015-12-05.pt                       FID and KID: the TorchScript Inception-v3 of
                                                      StyleGAN2-ADA / StyleGAN3 / clean-fid
    DIR/clip/                                         CLIP score: a transformers CLIPModel + CLIPProcessor folder
    DIR/torch/hub/checkpoints/alexnet-owt-7be5be79.pth  LPIPS: torchvision's AlexNet weights (TORCH_HOME=DIR/torch)
    DIR/RANDOM-STAND-INS.txt                          only in folders made by `write_stand_ins`: the networks are
                                                      random, their FID/KID/CLIP values are meaningless

A metric whose network (or library) is missing is unavailable, with a one-line reason. This module
imports torch, torchmetrics and transformers inside its functions only; `perco.scale.evaluate` imports
it inside its handler.
"""

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from perco.engine.errors import ExtensionError, PercoError

METRICS = ("psnr", "ms_ssim", "lpips", "fid", "kid", "clip_score")
PER_IMAGE = ("psnr", "ms_ssim", "lpips", "clip_score")  # the distribution metrics (fid, kid) have no per-image value
HIGHER_IS_BETTER = {"psnr": True, "ms_ssim": True, "lpips": False, "fid": False, "kid": False, "clip_score": True}

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299  # clean-fid's "clean" resize target
INCEPTION_FEATURES = 2048
CLIP_FOLDER = "clip"
TORCH_HOME = "torch"  # LPIPS: torchvision finds its backbone under TORCH_HOME/hub/checkpoints
LPIPS_BACKBONE = "torch/hub/checkpoints/alexnet-owt-7be5be79.pth"
STAND_IN_MARKER = "RANDOM-STAND-INS.txt"
STAND_IN_WARNING = "metric networks are random stand-ins: FID/KID/CLIP (and LPIPS, where present) values are meaningless"
KID_SUBSET_SIZE = 1000  # torchmetrics' default; fewer images: all of them in each subset
KID_SUBSETS = 100
MS_SSIM_MIN_SIDE = 161  # 5 scales with an 11x11 Gaussian: each side must exceed (11 - 1) * 2^4 = 160

EXTRA_HINT = "pip install 'perco-engine[eval,scale]'"


def require_torchmetrics():
    """Import torch and torchmetrics, or raise the one-line ExtensionError naming the eval extra."""
    try:
        import torch  # noqa: F401
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ExtensionError(f"perco evaluate needs the eval extra: {EXTRA_HINT}") from None


def stand_ins(folder) -> bool:
    """True when `folder` holds the random stand-ins of `write_stand_ins` (its marker file)."""
    return folder is not None and (Path(folder) / STAND_IN_MARKER).is_file()


def availability(folder) -> dict:
    """{metric: None (available) or a one-line reason} for the metrics folder `folder` (None: no folder)."""
    reasons = {"psnr": None, "ms_ssim": None}
    if folder is None:
        missing = "no --metrics-models folder given"
        reasons.update(fid=missing, kid=missing, clip_score=missing, lpips=missing)
        return reasons
    folder = Path(folder)
    if not folder.is_dir():
        missing = f"metrics folder {folder} does not exist"
        reasons.update(fid=missing, kid=missing, clip_score=missing, lpips=missing)
        return reasons
    inception = folder / INCEPTION_FILE
    reasons["fid"] = reasons["kid"] = None if inception.is_file() else f"{inception} is missing"
    clip = folder / CLIP_FOLDER
    reasons["clip_score"] = None if (clip / "config.json").is_file() else (
        f"{clip} is missing (a transformers CLIPModel + CLIPProcessor folder)")
    reasons["lpips"] = _lpips_reason(folder)
    return reasons


def _lpips_reason(folder: Path) -> Optional[str]:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a torchvision built for another torch
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        return f"LPIPS needs torchvision, which does not import here ({type(exc).__name__}: {detail})"
    backbone = folder / LPIPS_BACKBONE
    if not backbone.is_file():
        return f"{backbone} is missing (torchvision's AlexNet weights; nothing is downloaded)"
    return None


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, size, size] on the 0..255 scale: each channel resized on its own with
    PIL's bicubic filter in 32-bit float mode (clean-fid's "clean" mode: no uint8 rounding, antialiased)."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels).clip(0, 255).astype(np.float32)  # [3, size, size]


def psnr_numpy(original: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of two uint8 images over every pixel and channel (inf when identical): the reference for tests."""
    mse = np.mean((original.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _tensor(image: np.ndarray, device):
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] on the 0..255 scale."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device, torch.float32)[None]


@contextmanager
def _torch_home(folder: Path):
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def _load_clip(folder: Path):
    """(model, processor) for torchmetrics' CLIPScore from a local folder (its own loader takes hub names only)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    class ClipFeatures(torch.nn.Module):
        """CLIPModel whose get_*_features return the projected embeddings [N, D]: transformers 5 returns a
        BaseModelOutputWithPooling (the embeddings in pooler_output), torchmetrics 1.9 expects the tensor."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        @staticmethod
        def _embeddings(output):
            return output if isinstance(output, torch.Tensor) else output.pooler_output

        def get_image_features(self, *args, **kwargs):
            return self._embeddings(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return self._embeddings(self.model.get_text_features(*args, **kwargs))

    from perco.export.hf import quiet_transformers

    with quiet_transformers():
        return ClipFeatures(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)


def inception_module(path, device):
    """The TorchScript Inception as a torchmetrics feature extractor: float [N, 3, 299, 299] 0..255 -> [N, 2048].

    The StyleGAN2-ADA network is called as `net(images, return_features=True)` (pool3 features, before the
    logits); it would resize other sizes itself (bilinear), but `MetricSuite` hands it clean-resized 299x299.
    """
    import torch

    class InceptionFeatures(torch.nn.Module):
        num_features = INCEPTION_FEATURES  # set from a probe below; with it torchmetrics skips its own dummy forward

        def __init__(self):
            super().__init__()
            self.net = torch.jit.load(str(path), map_location=device).eval()

        def forward(self, images):
            features = self.net(images, return_features=True)  # [N, F]: 2048 for the real network
            assert features.ndim == 2 and features.shape == (images.shape[0], self.num_features), tuple(features.shape)
            return features

    module = InceptionFeatures()
    with torch.no_grad():  # the network's feature count (2048; a cheaper test stand-in may have fewer)
        module.num_features = int(module.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device),
                                             return_features=True).shape[-1])
    return module


class MetricSuite:
    """The chosen metrics with their networks loaded once; one model's images at a time.

    `add_real(original)` once per original image (the FID/KID reference set, shared by every model);
    `add_pair(original, decoded, caption)` per decoded image -> per-image values; `summary()` -> the
    model's values; `next_model()` clears the decoded side. Images are uint8 [H, W, 3].
    """

    def __init__(self, names, folder=None, device: str = "cpu", seed: int = 0):
        require_torchmetrics()
        import torch
        from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio

        self.names = tuple(names)
        self.device = torch.device(device)
        self.seed = seed
        folder = Path(folder) if folder is not None else None
        self._psnr = PeakSignalNoiseRatio(data_range=255.0).to(self.device).set_dtype(torch.float64)
        self._ms_ssim = MultiScaleStructuralSimilarityIndexMeasure(data_range=255.0).to(self.device)
        self._fid = self._kid = self._lpips = self._clip = None
        if "fid" in self.names or "kid" in self.names:
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.kid import KernelInceptionDistance

            features = inception_module(folder / INCEPTION_FILE, self.device)
            if "fid" in self.names:
                self._fid = FrechetInceptionDistance(feature=features, reset_real_features=False).to(self.device)
            if "kid" in self.names:
                with warnings.catch_warnings():  # "will save all extracted features": 2048 floats per image
                    warnings.simplefilter("ignore", UserWarning)
                    self._kid = KernelInceptionDistance(feature=features, reset_real_features=False,
                                                        subsets=KID_SUBSETS).to(self.device)
        if "lpips" in self.names:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            with _torch_home(folder / TORCH_HOME):
                self._lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(self.device)
        if "clip_score" in self.names:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self._clip = CLIPScore(model_name_or_path=lambda: _load_clip(folder / CLIP_FOLDER)).to(self.device)
        self.real_count = 0
        self._values = {name: [] for name in PER_IMAGE}
        self._notes = {}

    def add_real(self, original: np.ndarray) -> None:
        import torch

        if self._fid is None and self._kid is None:
            return
        with torch.no_grad():
            x = torch.from_numpy(clean_resize(original))[None].to(self.device)  # [1, 3, 299, 299]
            for metric in (self._fid, self._kid):
                if metric is not None:
                    metric.update(x, real=True)
        self.real_count += 1

    def add_pair(self, original: np.ndarray, decoded: np.ndarray, caption: str = "") -> dict:
        """Per-image values of (original, decoded); PSNR None with identical=True for identical images."""
        import torch

        if original.shape != decoded.shape:
            raise PercoError(f"decoded image is {decoded.shape[1]}x{decoded.shape[0]}, "
                             f"the original {original.shape[1]}x{original.shape[0]}")
        out = {}
        with torch.no_grad():
            a, b = _tensor(original, self.device), _tensor(decoded, self.device)  # [1, 3, H, W] 0..255
            if "psnr" in self.names:
                value = float(self._psnr(b.double(), a.double()))  # float64: exact for 8-bit images
                self._psnr.reset()
                out["psnr"] = value if math.isfinite(value) else None
                if not math.isfinite(value):
                    out["identical"] = True
            if "ms_ssim" in self.names:
                if min(original.shape[:2]) >= MS_SSIM_MIN_SIDE:
                    out["ms_ssim"] = float(self._ms_ssim(b, a))
                    self._ms_ssim.reset()
                else:
                    out["ms_ssim"] = None
                    self._notes["ms_ssim"] = (f"MS-SSIM (5 scales, 11x11 Gaussian) needs both sides >= "
                                              f"{MS_SSIM_MIN_SIDE} px: smaller images have none")
            if self._lpips is not None:
                out["lpips"] = float(self._lpips(b / 255.0, a / 255.0))
                self._lpips.reset()
            if self._clip is not None:
                out["clip_score"] = float(self._clip(decoded_uint8(decoded, self.device), caption))
            if self._fid is not None or self._kid is not None:
                x = torch.from_numpy(clean_resize(decoded))[None].to(self.device)
                for metric in (self._fid, self._kid):
                    if metric is not None:
                        metric.update(x, real=False)
        for name in PER_IMAGE:
            value = out.get(name)
            if value is not None and not math.isfinite(value):  # a NaN (or an inf other than PSNR's)
                out[name] = None
                self._notes[name] = f"{name} was not a finite number for some images: they are left out of the mean"
            elif value is not None:
                self._values[name].append(value)
        return out

    def summary(self) -> dict:
        """{metric: value or None}, plus "notes": {metric: why it has no value} where one is missing."""
        import torch

        result, notes = {}, dict(self._notes)
        for name in PER_IMAGE:
            if name in self.names:
                values = self._values[name]
                result[name] = float(np.mean(values)) if values else None
        if self._clip is not None:
            self._clip.reset()
        fake = len(self._values["psnr"]) if "psnr" in self.names else None
        for name, metric in (("fid", self._fid), ("kid", self._kid)):
            if metric is None:
                continue
            n_fake = int(metric.fake_features_num_samples) if name == "fid" else sum(
                int(f.shape[0]) for f in metric.fake_features)
            if self.real_count < 2 or n_fake < 2:
                result[name] = None
                notes[name] = f"{name.upper()} needs at least 2 original and 2 decoded images"
                continue
            if name == "fid":
                result["fid"] = float(metric.compute())
                if not math.isfinite(result["fid"]):
                    result["fid"] = None
                    notes["fid"] = "FID was not a finite number (a degenerate covariance)"
            else:
                metric.subset_size = min(KID_SUBSET_SIZE, self.real_count, n_fake)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    mean, std = metric.compute()
                result["kid"] = float(mean)
                result["kid_std"] = float(std)
        if "psnr" in self.names and fake and not self._values["psnr"]:
            notes["psnr"] = "every decoded image is identical to its original (PSNR infinite)"
        if notes:
            result["notes"] = notes
        return result

    def next_model(self) -> None:
        """Forget the decoded images (the FID/KID reference features stay)."""
        for metric in (self._fid, self._kid):
            if metric is not None:
                metric.reset()
        self._values = {name: [] for name in PER_IMAGE}
        self._notes = {}


def decoded_uint8(image: np.ndarray, device):
    """uint8 [H, W, 3] -> uint8 [1, 3, H, W] (what CLIP's image processor takes)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)


# ----------------------------------------------------------------------------------------- stand-ins

def write_stand_ins(folder, tokenizer_dir, seed: int = 0, features: int = INCEPTION_FEATURES,
                    lpips_backbone: bool = False) -> Path:
    """Write TINY RANDOM stand-ins of the metric networks into `folder`, in the libraries' own formats, with
    the STAND_IN_MARKER file: FID/KID/CLIP values computed with them are meaningless (they prove the plumbing).

    - inception-2015-12-05.pt: a TorchScript module with the StyleGAN2-ADA Inception's call signature
      (`net(images_0_255_NCHW, return_features=True) -> [N, 2048]`, logits [N, 1008] otherwise): a random
      linear map of an 8x8 average-pooled image, not Inception. `features` < 2048 makes a cheaper stand-in for
      tests (FID's eigen-decomposition of 2048x2048 matrices takes a minute on a small CPU); the call is the same.
    - clip/: a random transformers CLIPModel (2-layer, 32-wide towers, 32x32 images) saved with
      save_pretrained, the CLIP tokenizer from `tokenizer_dir` and a CLIPImageProcessor (CLIPProcessor).
      Its image projection's sign is chosen so that scores come out above torchmetrics' clamp at 0
      (so tests can compare them), not because they mean anything.
    - with `lpips_backbone` (torchvision must import): torch/hub/checkpoints/alexnet-owt-7be5be79.pth, a
      RANDOM torchvision AlexNet state dict (233 MB even so, hence off by default); LPIPS's linear heads are
      torchmetrics' own, shipped in its wheel, so only the backbone is random and LPIPS values are meaningless.
    """
    require_torchmetrics()
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.jit.script(_stand_in_inception(features)).save(str(folder / INCEPTION_FILE))
    _write_clip_stand_in(folder / CLIP_FOLDER, Path(tokenizer_dir), seed)
    if lpips_backbone:
        import torchvision

        backbone = folder / LPIPS_BACKBONE
        backbone.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    from perco.engine.files import atomic_write

    atomic_write(folder / STAND_IN_MARKER, (STAND_IN_WARNING + "\nWritten by perco.scale.metrics.write_stand_ins "
                                            "for tests. Real networks: docs/evaluate.md.\n").encode())
    return folder


def _stand_in_inception(features: int):
    import torch
    import torch.nn.functional as F

    class StandInInception(torch.nn.Module):
        """Random stand-in with the call signature of inception-2015-12-05.pt; its features are meaningless."""

        def __init__(self):
            super().__init__()
            self.features = torch.nn.Linear(3 * 8 * 8, features)
            self.logits = torch.nn.Linear(features, 1008)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = img.to(torch.float32)  # [N, 3, H, W] 0..255
            if x.shape[2] != 299 or x.shape[3] != 299:
                x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
            x = (x - 128.0) / 128.0
            features = self.features(F.adaptive_avg_pool2d(x, 8).flatten(1))  # [N, F]
            return features if return_features else self.logits(features)  # [N, 1008]

    return StandInInception().eval()


def _write_clip_stand_in(folder: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random towers share one dominant direction: give it the sign that makes scores > 0
        image = model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
        text = model.get_text_features(**tokenizer(["a photo"], return_tensors="pt"))
        image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
        if float(torch.nn.functional.cosine_similarity(image, text)) < 0:
            model.visual_projection.weight.neg_()
    from perco.export.hf import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(folder)
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
