"""Bounded inputs: step counts inside the schedule, finite guidance, bounded hints, model config fields."""

import json
import math
import shutil

import numpy as np
import pytest

from perco.engine import bitstream
from perco.engine.bitstream import Header, Hints
from perco.engine.errors import BitstreamError, ModelError, PercoError
from perco.engine.model import ModelInfo
from perco.engine.sampling import DDIM, DPMSolverPP2M, NoiseSchedule, max_steps

SD21 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000}


def test_steps_stay_inside_the_schedule():
    schedule = NoiseSchedule.from_config(SD21)
    assert max_steps(schedule) == 999 and DDIM(schedule, 999).timesteps.max() == 999
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.999"):
        DDIM(schedule, 1000)
    assert DPMSolverPP2M(schedule, 1000).timesteps.max() == 999  # linspace spacing stays inside


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -2.0, 51.0])
def test_guidance_must_be_finite_and_sane(codec, guidance):
    data = codec.compress(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(PercoError, match="guidance must be a finite number in 0..50"):
        codec.decompress(data, steps=1, guidance=guidance)
    with pytest.raises(PercoError, match="guidance must be a finite number"):
        codec.compress(np.zeros((16, 16, 3), np.uint8), hints=Hints(guidance=guidance))


def test_steps_1000_is_one_error(codec):
    data = codec.compress(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(PercoError, match=r"steps must be in 1\.\.999"):
        codec.decompress(data, steps=1000)


def _with_hints(items) -> bytes:
    """A serialized header whose hint section holds `items` (key, value) verbatim."""
    class Raw(Hints):
        def items(self):
            return items
    return bitstream.serialize(Header(b"\0" * 4, 512, 512, 0, Raw()), np.zeros(0, np.uint32), np.zeros(0, np.uint32))


def test_hints_are_bounded():
    assert bitstream.parse(_with_hints([(bitstream.HINT_GUIDANCE_CENTI, 5000)]))[0].hints.guidance == 50.0
    with pytest.raises(BitstreamError, match="hinted guidance"):
        bitstream.parse(_with_hints([(bitstream.HINT_GUIDANCE_CENTI, (1 << 64) - 1)]))
    with pytest.raises(BitstreamError, match="hinted step count 1001"):
        bitstream.parse(_with_hints([(bitstream.HINT_STEPS, 1001)]))
    with pytest.raises(BitstreamError, match="at most 16"):
        bitstream.parse(_with_hints([(99, 0)] * 17))


@pytest.mark.parametrize("component,field,value,match", [
    ("unet", "block_out_channels", None, "must be a list of 1 to 8 integers"),
    ("vae", "scaling_factor", "x", "must be a finite number"),
    ("hyper_enc", "M", 10**7, "outside 1..8192"),
    ("hyper_enc", "codebook_dim", 10**9, "outside 1..8192"),
    ("hyper_enc", "cfg_ss", 32.7, "must be an integer"),
    ("text_encoder", "hidden_size", True, "must be an integer"),
])
def test_bad_config_fields_name_the_field(tiny_model, tmp_path, component, field, value, match):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"field '{field}'.*{match}"):
        ModelInfo(folder)
