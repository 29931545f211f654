"""PerCo Engine runtime: torch-free codec, bitstream, entropy coding and samplers."""

from perco.engine.bitstream import Hints
from perco.engine.codec import Codec, StageTimings
from perco.engine.errors import BackendError, BitstreamError, ImageError, ModelError, PercoError
from perco.engine.model import ModelInfo

__all__ = [
    "BackendError",
    "BitstreamError",
    "Codec",
    "Hints",
    "ImageError",
    "ModelError",
    "ModelInfo",
    "PercoError",
    "StageTimings",
]
