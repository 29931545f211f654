"""The learned index coder on a tiny PerCo (SD) model with a seeded random entropy model (`random_weights`:
its tables are not trained, so the rates say nothing; tests/test_entropy_train.py trains one). What is
checked: every implementation of the integer network (numpy reference, ONNX Runtime CPU, torch float64)
codes and decodes the same bytes and indices, hybrid mode draws the same tokens everywhere, and every
defect is one clear error."""

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import CLIP_TOKENIZER, init_tiny, random_image
from perco.engine import Codec, bitstream
from perco.engine.cli import main
from perco.engine.entropy.intnet import IntNetConfig, random_weights
from perco.engine.entropy.learned import LearnedIndexCoder, load_entropy_model, sample_tables, save_entropy_model
from perco.engine.entropy.schedules import group_positions, make_schedule
from perco.engine.entropy.tables import PROB_TOTAL, tables_from_steps
from perco.engine.errors import BitstreamError, ModelError
from perco.engine.model import ModelInfo

GOLDEN = Path(__file__).parent / "golden" / "learned.json"
CAPTION = "a red barn on a green hill"


def _entropy_model(folder: Path, seed: int = 3, preset: str = "tiny", schedule: str = "coarse-to-fine") -> Path:
    config = IntNetConfig.preset(preset, ModelInfo(folder).rate.codebook_size, schedule=schedule)
    save_entropy_model(folder / "entropy_model", config, random_weights(config, seed), {"note": "seeded random"})
    return folder


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("learned") / "plain", "--tokenizer", str(CLIP_TOKENIZER))


@pytest.fixture(scope="module")
def learned_model(tmp_path_factory, plain_model):
    folder = tmp_path_factory.mktemp("learned") / "model"
    shutil.copytree(plain_model, folder)
    return _entropy_model(folder)


@pytest.fixture(scope="module")
def codecs(learned_model):
    """numpy reference (an ONNX Runtime backend whose export has no entropy graph), ONNX Runtime, torch."""
    torch_codec = Codec.from_pretrained(learned_model, backend="torch")
    ort_codec = Codec.from_pretrained(learned_model, backend="onnxruntime")
    return {"torch": torch_codec, "onnxruntime": ort_codec}


def _indices(codec, data: bytes, backend="own") -> np.ndarray:
    return bitstream.unpack(data, codec.model.stream_spec, codec.backend if backend == "own" else backend)[2]


def test_the_entropy_model_joins_the_fingerprint(plain_model, learned_model):
    plain, learned = ModelInfo(plain_model), ModelInfo(learned_model)
    assert plain.spec.index_coder == "uniform" and learned.spec.index_coder == "learned"
    assert plain.fingerprint != learned.fingerprint
    assert load_entropy_model(learned_model / "entropy_model").training == {"note": "seeded random"}


def test_every_implementation_codes_the_same_bytes(codecs):
    image = random_image(96, 128, seed=2)
    torch_codec, ort_codec = codecs["torch"], codecs["onnxruntime"]
    assert torch_codec.backend.runs("entropy_model") and ort_codec.backend.runs("entropy_model")
    data = torch_codec.compress(image, caption=CAPTION)
    assert ort_codec.compress(image, caption=CAPTION) == data
    reference = _indices(torch_codec, data, backend=None)  # numpy
    for codec in codecs.values():
        np.testing.assert_array_equal(_indices(codec, data), reference)
    plain = LearnedIndexCoder(load_entropy_model(Path(torch_codec.model.entropy_dir)))
    header, caption, words, _ = bitstream.parse(data)
    np.testing.assert_array_equal(plain.decode(words, reference.shape), reference)
    _, caption_ids, _ = bitstream.unpack(data, torch_codec.model.stream_spec)
    assert bitstream.pack(header, caption_ids, reference, torch_codec.model.stream_spec) == data  # numpy encodes


def test_pinned_tables_on_every_implementation(codecs):
    """The sha256 of the tables of a fixed masked grid, pinned once from the numpy reference: any drift in any
    implementation (or in the arithmetic) fails here."""
    from perco.export.entropy_model import onnx_graph

    model = load_entropy_model(Path(codecs["torch"].model.entropy_dir))
    k = model.config.codebook_size
    ids = (np.arange(12 * 16, dtype=np.int64).reshape(12, 16) * 31) % (k + 1)
    positions = np.arange(ids.size)
    results = {"numpy": model.net.tables(ids, positions)}
    for name, codec in codecs.items():
        steps = codec.backend.run("entropy_model", {"ids": ids})["steps"].reshape(k, -1).T
        results[name] = tables_from_steps(steps)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_graph(model.config, model.net.weights).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    results["onnx_graph"] = tables_from_steps(session.run(["steps"], {"ids": ids})[0].reshape(k, -1).T)
    digests = {name: hashlib.sha256(np.ascontiguousarray(t, dtype="<i8").tobytes()).hexdigest()
               for name, t in results.items()}
    assert set(digests.values()) == {json.loads(GOLDEN.read_text())["tables_sha256"]}, digests
    assert all((t.sum(axis=1) == PROB_TOTAL).all() and t.min() >= 1 for t in results.values())


def test_golden_learned_bitstreams(codecs):
    """Pinned bytes of the seeded tiny model + seeded entropy model. Regenerate only on purpose:
    PERCO_REGENERATE_GOLDEN=1."""
    codec = codecs["onnxruntime"]
    image = random_image(96, 128, seed=5)
    cases = {"learned_128x96": codec.compress(image, caption=CAPTION),
             "hybrid_half_seed9": codec.compress(image, caption=CAPTION, seed=9, send=0.5)}
    golden = json.loads(GOLDEN.read_text())
    if os.environ.get("PERCO_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({**golden, **{k: v.hex() for k, v in cases.items()}}, indent=1) + "\n")
        golden = json.loads(GOLDEN.read_text())
    for name, data in cases.items():
        assert data.hex() == golden[name], name
        np.testing.assert_array_equal(_indices(codec, data), _indices(codecs["torch"], data))


def test_hybrid_mode_round_trips_deterministically(codecs):
    torch_codec, ort_codec = codecs["torch"], codecs["onnxruntime"]
    image = random_image(128, 128, seed=1)
    full = _indices(torch_codec, torch_codec.compress(image, caption=CAPTION))
    shape = full.shape
    total = len(group_positions(make_schedule("coarse-to-fine", *shape)))
    for send in (0.25, 0.5, 2):
        data = torch_codec.compress(image, caption=CAPTION, seed=4, send=send)
        assert ort_codec.compress(image, caption=CAPTION, seed=4, send=send) == data
        header = bitstream.parse(data)[0]
        assert header.groups == (send if isinstance(send, int) else int(np.ceil(send * total)))
        decoded = [_indices(torch_codec, data), _indices(ort_codec, data), _indices(torch_codec, data, None)]
        for other in decoded[1:]:
            np.testing.assert_array_equal(decoded[0], other)  # two backends (and numpy) draw the same tokens
        sent = np.concatenate(group_positions(make_schedule("coarse-to-fine", *shape))[: header.groups])
        np.testing.assert_array_equal(decoded[0].reshape(-1)[sent], full.reshape(-1)[sent])
        assert len(data) < len(torch_codec.compress(image, caption=CAPTION))
    other_seed = torch_codec.compress(image, caption=CAPTION, seed=5, send=0.5)
    assert not np.array_equal(_indices(torch_codec, other_seed), decoded[0])  # the header's seed drives the draw
    assert ort_codec.decompress(data, steps=1).shape == (128, 128, 3)


def test_sampling_is_the_documented_integer_draw():
    tables = np.tile(tables_from_steps(np.array([[0, 4096, 8192, 20000]])), (5000, 1))
    drawn = sample_tables(tables, seed=123, group=2)
    assert drawn.min() >= 0 and drawn.max() <= 3
    frequencies = np.bincount(drawn, minlength=4) / drawn.size
    np.testing.assert_allclose(frequencies, tables[0] / PROB_TOTAL, atol=0.02)
    np.testing.assert_array_equal(drawn, sample_tables(tables, seed=123, group=2))
    assert not np.array_equal(drawn, sample_tables(tables, seed=123, group=3))
    # first draws pinned: splitmix64 as documented in sample_tables
    assert drawn[:8].tolist() == json.loads(GOLDEN.read_text())["sample_first8"]


def _recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def test_corrupt_index_sections_are_errors_not_garbage(codecs):
    codec = codecs["onnxruntime"]
    data = codec.compress(random_image(96, 128, seed=3), caption=CAPTION)
    sections = bitstream.parse(data)[3]
    start = sections.header + sections.caption
    rng = np.random.default_rng(0)
    errors = 0
    for _ in range(40):
        body = bytearray(data)
        pos = start + int(rng.integers(0, sections.indices))
        body[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            _indices(codec, _recrc(bytes(body)))
        except BitstreamError:
            errors += 1
    # rANS has no redundancy: a flipped bit can decode to other valid tokens (then the image differs, which
    # the CRC guards against in the file). Most flips leave the stream unconsumed or overrun.
    assert errors >= 20, errors
    with pytest.raises(BitstreamError):
        _indices(codec, _recrc(data[: start + sections.indices // 2] + data[-4:]))


def test_impossible_hybrid_headers_are_refused(codecs, codec):
    learned = codecs["onnxruntime"]
    image = random_image(64, 64, seed=1)
    data = learned.compress(image, send=1)
    header, caption, words, _ = bitstream.parse(data)
    assert data[5] & bitstream.FLAG_HYBRID and header.groups == 1
    shape = learned.model.stream_spec.token_grid(64, 64)
    total = len(group_positions(make_schedule("coarse-to-fine", *shape)))
    for groups in (total, total + 1, 10**12):
        forged = bitstream.serialize(dataclasses.replace(header, groups=groups), caption, words)
        with pytest.raises(BitstreamError, match="hybrid mode sent"):
            _indices(learned, forged)
    with pytest.raises(BitstreamError, match="0 groups"):
        bitstream.parse(_recrc(data[:8] + b"\x00" + data[9:]))  # magic, fingerprint, flags, 64, 64, then G
    plain = codec.compress(image)  # a uniform model given a hybrid header: refused, never misread
    header, caption, words, _ = bitstream.parse(plain)
    forged = bitstream.serialize(dataclasses.replace(header, groups=1), caption, words)
    with pytest.raises(BitstreamError, match="hybrid mode needs a learned entropy model"):
        bitstream.unpack(forged, codec.model.stream_spec)
    with pytest.raises(Exception, match="hybrid mode needs a learned entropy model"):
        codec.compress(image, send=0.5)


def test_wrong_or_missing_entropy_model_is_one_error(learned_model, plain_model, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(random_image(64, 64, seed=2)).save(image)
    assert main(["compress", "-q", str(image), "-o", str(tmp_path / "x.perco"), "--model", str(learned_model),
                 "--send", "0.5"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "x.perco"), "--model", str(learned_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index_coder"]["name"] == "learned" and 1 <= info["hybrid_groups_sent"] < info["index_coder"]["groups"]
    for model in (plain_model, _entropy_model(_copy(learned_model, tmp_path / "other"), seed=4)):
        assert main(["decompress", "-q", str(tmp_path / "x.perco"), "-o", str(tmp_path / "y.png"), "--model",
                     str(model), "--backend", "torch"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: bitstream was made for model") and err.count("\n") == 1, err
        assert not (tmp_path / "y.png").exists()
    broken = _copy(learned_model, tmp_path / "broken")
    weights = broken / "entropy_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(ModelError, match="entropy_model"):
        ModelInfo(broken)
    (broken / "entropy_model" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="entropy model is incomplete"):
        ModelInfo(broken)
    assert main(["compress", "-q", str(image), "-o", str(tmp_path / "z.perco"), "--model", str(plain_model),
                 "--send", "0.5"]) == 1
    assert "hybrid mode needs a learned entropy model" in capsys.readouterr().err
    assert main(["compress", "-q", str(image), "-o", "-", "--send", "1.5"]) == 2
    assert "fraction in (0, 1]" in capsys.readouterr().err


def test_a_mismatched_implementation_is_refused(codecs, learned_model, tmp_path):
    """An export whose entropy graph came from other weights must not code: the backend's graph is checked
    against the numpy reference before its first use."""
    from perco.export.entropy_model import export_entropy_graph

    art = tmp_path / "art"
    from perco.export.onnx import export_model

    export_model(learned_model, art, log=lambda text: None)
    manifest = json.loads((art / "manifest.json").read_text())
    other = _entropy_model(_copy(learned_model, tmp_path / "other"), seed=11)
    graph = art / manifest["graphs"]["entropy_model"]["file"]
    export_entropy_graph(load_entropy_model(other / "entropy_model"), graph)
    manifest["graphs"]["entropy_model"]["sha256"] = {graph.name: hashlib.sha256(graph.read_bytes()).hexdigest()}
    (art / "manifest.json").write_text(json.dumps(manifest))
    swapped = Codec.from_pretrained(backend="onnxruntime", artifacts=art)
    with pytest.raises(ModelError, match="entropy_model graph disagrees"):
        swapped.compress(random_image(64, 64, seed=1))


def test_engines_and_exports_carry_the_entropy_model(codecs, learned_model, tmp_path):
    manifest = json.loads((Path(codecs["onnxruntime"].model.entropy_dir).parent / "manifest.json").read_text())
    assert manifest["model"]["index_coder"] == "learned" and "entropy_model" in manifest["graphs"]
    assert (Path(codecs["onnxruntime"].model.entropy_dir) / "model.safetensors").is_file()
    from perco.export.onnx import parity

    report = parity(learned_model, Path(codecs["onnxruntime"].model.entropy_dir).parent)
    assert report["entropy_model"] == {"mismatch_fraction": 0.0}


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def test_percov2_codes_with_the_learned_model_too(tmp_path_factory):
    folder = init_tiny(tmp_path_factory.mktemp("learned-v2") / "v2", "--family", "percov2", "--rate", "0.0078",
                       "--tokenizer", str(CLIP_TOKENIZER))
    _entropy_model(folder, seed=8, schedule="checkerboard")
    torch_codec = Codec.from_pretrained(folder, backend="torch")
    ort_codec = Codec.from_pretrained(folder, backend="onnxruntime")
    assert torch_codec.model.index_coder == ort_codec.model.index_coder == "learned"
    image = random_image(96, 128, seed=6)
    data = torch_codec.compress(image, caption=CAPTION, send=1)  # checkerboard: 2 groups, 1 sent
    assert ort_codec.compress(image, caption=CAPTION, send=1) == data and bitstream.parse(data)[0].groups == 1
    np.testing.assert_array_equal(_indices(torch_codec, data), _indices(ort_codec, data))
    assert ort_codec.decompress(data, steps=1).shape == (96, 128, 3)


def test_device_steps_path_gives_the_same_indices(codecs, learned_model, monkeypatch):
    """The decode loop's device branch (`entropy_steps_on_device`: the torch-fast backend hands the group's steps
    to the decoder where they were made; on a GPU they never reach the host), taken here with CPU tensors and a
    decoder told it takes device steps: the same indices as the host path, full and hybrid. The CUDA run of this
    branch is tests/test_batch_coder.py::test_learned_decode_with_cuda_steps (a GPU with the kernels library)."""
    from perco.engine.entropy import learned

    fast = Codec.from_pretrained(learned_model, backend="torch-fast")
    torch_codec = codecs["torch"]
    image = random_image(96, 128, seed=3)

    class DeviceStepsDecoder(learned.StepsStreamDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.takes_device_steps = True

    calls = []
    original = type(fast.backend).entropy_steps_on_device
    monkeypatch.setattr(type(fast.backend), "entropy_steps_on_device",
                        lambda self, ids, positions: calls.append(len(positions)) or original(self, ids, positions))
    host_decoder = learned.StepsStreamDecoder
    for send in (None, 0.5):
        data = torch_codec.compress(image, caption=CAPTION, seed=2, send=send)
        host = _indices(fast, data)
        assert not calls  # no kernels library here: the host path
        monkeypatch.setattr(learned, "StepsStreamDecoder", DeviceStepsDecoder)
        np.testing.assert_array_equal(_indices(fast, data), host)
        monkeypatch.setattr(learned, "StepsStreamDecoder", host_decoder)
        assert len(calls) == fast.model.stream_spec.coder().num_groups(host.shape)  # every group, on the device
        calls.clear()
