"""The bitstream fuzz campaign (perco.benchmarks.fuzz, docs/fuzzing.md) as tests.

CI runs CI_PARSE_INPUTS inputs of the seeded generator on the parse target (parse + entropy
decode), CI_DECODE_INPUTS full tiny decodes, three hypothesis properties, and every crash found so
far (tests/data/fuzz-regressions/) with its exact error type. The 10^6-input campaign is marked
`fuzz` and runs only when selected:

    PERCO_CACHE=/tmp/pc-fuzz python -m pytest -q -p no:cacheprovider -m fuzz tests/test_fuzz.py

(or the CLI: python -m perco.benchmarks.fuzz --target parse --inputs 1000000 --out report.json).
PERCO_FUZZ_SEED changes the generator's seed (default 0, so a CI failure is reproducible).
"""

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from perco.benchmarks import fuzz
from perco.engine import bitstream, errors
from perco.engine.errors import BitstreamError
from perco.engine.model import ModelInfo

REGRESSIONS = Path(__file__).parent / "data" / "fuzz-regressions"
CI_PARSE_INPUTS = 30_000  # about 5 s on a 2-core x86-64
CI_DECODE_INPUTS = 5_000  # about 8 s: ~10 % are full decodes (steps=1, at most 256 x 256)
SEED = int(os.environ.get("PERCO_FUZZ_SEED", "0"))
PARSE = fuzz.ParseTarget()
SEEDS = fuzz.seed_corpus(fuzz.TINY_SPEC)
set_hypothesis_home_dir(Path(os.environ["PERCO_CACHE"]) / "hypothesis")  # the session's private folder, not the clone


@pytest.fixture(scope="module")
def decode_target(codec):
    """The decode target on the session's tiny codec (one torch thread, as the CLI runs it); the codec's
    own size limit and torch's thread count are put back after."""
    import torch

    limit, threads = codec.limit, torch.get_num_threads()
    yield fuzz.DecodeTarget(codec, threads=1)
    codec.limit = limit
    torch.set_num_threads(threads)


def _clean(report: dict) -> None:
    assert not report["failures"], fuzz.summary(report)
    slowest = report["slowest"]
    assert min(slowest["seconds"], slowest.get("retimed_seconds", slowest["seconds"])) < fuzz.TIME_LIMIT


# --- campaigns ----------------------------------------------------------------------------------


def test_parse_campaign(tmp_path):
    report = fuzz.run_campaign(PARSE, CI_PARSE_INPUTS, seed=SEED, crash_dir=tmp_path, progress=False)
    _clean(report)
    assert set(report["outcomes_by_type"]) == {"accepted", "BitstreamError", "ModelMismatchError"}
    assert report["outcomes_by_type"]["accepted"] > CI_PARSE_INPUTS // 20  # mutations also reach valid decodes
    assert 0.7 < report["crc_fixed_fraction"] < 0.8
    assert report["slowest_retimed"][0]["retimed_seconds"] < 0.2  # a 16384 x 16384 claim: about 25 ms
    assert set(report["by_mutation"]) == set(fuzz.MUTATIONS)
    assert len(report["outcomes"]) >= 40  # the error classes reached: every check of docs/bitstream.md
    for deep in ("corrupt caption stream: data left over", "corrupt index stream: data left over",
                 "start token inside the caption", "decoder hints, at most", "hinted guidance", "hinted step count",
                 "made for model", "exceeds N bits", "non-canonical varint", "varint too long", "ends inside the hint",
                 "unknown model family id", "this is a percov2 bitstream"):
        assert any(deep in outcome for outcome in report["outcomes"]), deep


def test_decode_campaign(decode_target, tmp_path):
    report = fuzz.run_campaign(decode_target, CI_DECODE_INPUTS, seed=SEED, crash_dir=tmp_path, progress=False)
    _clean(report)
    types = report["outcomes_by_type"]
    assert set(types) <= {"accepted", "BitstreamError", "ModelMismatchError", "DecodeLimitError", "PercoError"}
    assert types["accepted"] > CI_DECODE_INPUTS // 50 and types["DecodeLimitError"] > 0


@pytest.mark.fuzz
def test_parse_campaign_1e6(request, tmp_path):
    """The recorded campaign (docs/fuzzing.md): 10^6 inputs, about 4 minutes on 2 cores."""
    if "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the 10^6-input campaign runs only when selected: pytest -m fuzz tests/test_fuzz.py")
    report = fuzz.run_campaign(PARSE, 1_000_000, seed=SEED, crash_dir=tmp_path, progress=True)
    if os.environ.get("PERCO_FUZZ_REPORT"):
        Path(os.environ["PERCO_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    _clean(report)
    assert set(report["outcomes_by_type"]) == {"accepted", "BitstreamError", "ModelMismatchError"}


# --- regression cases: every crash found so far -------------------------------------------------


def _cases():
    return sorted(REGRESSIONS.glob("*.json"))


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.stem)
def test_regression(path, request):
    case = json.loads(path.read_text())
    assert case["target"] in fuzz.TARGETS and case["history"]
    target = PARSE if case["target"] == "parse" else request.getfixturevalue("decode_target")
    _, data = fuzz.load_case(path, target.spec)
    steps, target_steps = case.get("steps", 1), getattr(target, "steps", None)
    start = time.perf_counter()
    try:
        if case["target"] == "decode":
            target.steps = steps
        if case["expect"] == "accepted":
            target(data)
        else:
            with pytest.raises(getattr(errors, case["expect"]), match=case["match"]) as caught:
                target(data)
            assert type(caught.value).__name__ == case["expect"]  # the exact type, not a subclass
    finally:
        if case["target"] == "decode":
            target.steps = target_steps
    assert time.perf_counter() - start < fuzz.TIME_LIMIT


def test_regressions_cover_the_fixed_crashes():
    names = {p.stem for p in _cases()}
    assert {"hint-count-2e64", "hint-guidance-2e64", "hint-steps-1000", "size-16384x16384-empty-index"} <= names


def test_an_unbounded_hint_count_stops_at_once():
    """A huge count followed by 1 MB of hint entries: refused at the count, not after reading them."""
    body = b"\xb1" + fuzz.TINY_SPEC.fingerprint[:4] + b"\x04" + fuzz.varint(1 << 63) + b"\x03\x00" * 500_000
    data = fuzz.with_crc(body + fuzz.varint(0))
    start = time.perf_counter()
    with pytest.raises(BitstreamError, match="decoder hints, at most 16"):
        PARSE(data)
    assert time.perf_counter() - start < 0.1


def test_a_saved_failure_is_a_regression_case(tmp_path):
    data = fuzz.with_crc(b"\xb1" + fuzz.TINY_SPEC.fingerprint[:4] + b"\x01" + fuzz.varint(16385) + b"\x01\x00")
    path = fuzz.save_failure(tmp_path, "parse", 0, 7, "size", data, "ValueError: x", "Traceback ...")
    case, loaded = fuzz.load_case(path, fuzz.TINY_SPEC)
    assert loaded == data and case["target"] == "parse" and set(case) >= {"hex", "expect", "traceback"}


# --- the harness --------------------------------------------------------------------------------


def test_fuzz_one_is_atheris_style(monkeypatch):
    good = SEEDS[0]
    fuzz.fuzz_one(good)
    fuzz.fuzz_one(b"")  # BitstreamError: expected, so fuzz_one returns
    fuzz.fuzz_one(good[:-1] + bytes([good[-1] ^ 1]))

    def broken(data, spec):
        raise IndexError("a bug")

    monkeypatch.setattr(bitstream, "unpack", broken)
    with pytest.raises(IndexError):
        fuzz.fuzz_one(good)


def test_tiny_spec_is_the_tiny_model_geometry(tiny_model):
    spec = ModelInfo(tiny_model).stream_spec
    assert (spec.tokens, spec.codebook_size, spec.token_stride, spec.pad_multiple) == (
        fuzz.TINY_SPEC.tokens, fuzz.TINY_SPEC.codebook_size, fuzz.TINY_SPEC.token_stride, fuzz.TINY_SPEC.pad_multiple)


def test_seeds_are_valid_and_split_joins_back():
    assert len(SEEDS) >= 10
    for data in SEEDS:
        PARSE(data)
        assert fuzz.with_crc(fuzz.join(fuzz.split(data))) == data


def test_generator_is_deterministic_and_fixes_three_quarters_of_the_crcs():
    a, b = fuzz.Mutator(SEEDS, 3), fuzz.Mutator(SEEDS, 3)
    assert [a.input(i) for i in range(200)] == [b.input(i) for i in reversed(range(200))][::-1]
    assert [a.input(i) for i in range(50)] != [fuzz.Mutator(SEEDS, 4).input(i) for i in range(50)]
    fixed = sum(a.input(i)[1] for i in range(4000)) / 4000
    assert 0.7 < fixed < 0.8


def test_campaign_records_crashes_slow_inputs_and_hangs(tmp_path):
    def target(data):
        if data[:1] == b"\xb1" and len(data) % 7 == 0:
            raise IndexError("a bug")
        if len(data) % 31 == 1:
            time.sleep(0.03)  # over the time limit below, twice
        if len(data) % 29 == 2 and data[:1] == b"\xb1":
            time.sleep(5)  # interrupted at the hang limit
        PARSE(data)

    target.expected = (BitstreamError,)
    report = fuzz.run_campaign(target, 300, seed=1, crash_dir=tmp_path, progress=False, time_limit=0.02, hang_limit=0.1)
    kinds = {f["error"].split(":")[0].split(" ")[0] for f in report["failures"]}
    assert kinds == {"IndexError", "took", "interrupted"}, kinds
    assert report["outcomes_by_type"]["CRASH IndexError"] > 0 and report["outcomes_by_type"]["HANG"] > 0
    assert report["slowest"]["seconds"] >= 0.1 and report["over_time_limit"]
    saved = sorted(tmp_path.glob("target-seed1-*.json"))
    assert len(saved) == len(report["failures"])
    crash = next(f for f in report["failures"] if f["error"].startswith("IndexError"))
    assert bytes.fromhex(json.loads(Path(crash["file"]).read_text())["hex"]) == fuzz.Mutator(
        SEEDS, 1).input(crash["index"])[2]


def test_cli_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert fuzz.main(["--target", "parse", "--inputs", "500", "--seed", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["inputs"] == 500 and report["peak_memory"]["ru_maxrss_bytes"] > 0 and report["machine"]["cpus"]
    assert "outcomes by type" in capsys.readouterr().out


# --- hypothesis: shrinking properties over raw and structured inputs -----------------------------

PROPERTY = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: bytes) -> None:
    try:
        PARSE(data)
    except BitstreamError:
        pass


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from(["raw", "magic", "magic+crc"]))
def test_property_raw_bytes(tail, framing):
    prefix = b"" if framing == "raw" else b"\xb1" + fuzz.TINY_SPEC.fingerprint[:4]
    data = prefix + tail
    _check(fuzz.with_crc(data) if framing == "magic+crc" else data)


_value = st.one_of(st.sampled_from(fuzz.INTERESTING), st.integers(0, (1 << 70)))


@st.composite
def structured(draw):
    """A body built field by field (every field optional or out of range), CRC fixed up."""
    flags = draw(st.one_of(st.sampled_from(range(16)), st.integers(0, 255)))
    fields = [b"\xb1", fuzz.TINY_SPEC.fingerprint[:4], bytes([flags])]
    if flags & bitstream.FLAG_FAMILY:
        fields.append(bytes([draw(st.one_of(st.sampled_from([0, 1, 2, 255]), st.integers(0, 255)))]))

    def varint(value):  # canonical, or with trailing zero groups (non-canonical), or unterminated
        raw, form = fuzz.varint(value), draw(st.sampled_from(["canonical"] * 6 + ["padded", "unterminated"]))
        if form == "padded":
            return raw[:-1] + bytes([raw[-1] | 0x80]) + b"\x80" * draw(st.integers(0, 9)) + b"\x00"
        return raw if form == "canonical" else bytes(b | 0x80 for b in raw)

    if flags & bitstream.FLAG_SIZE:
        fields += [varint(draw(st.one_of(st.sampled_from(fuzz.SIDES), st.integers(1, 600)))) for _ in range(2)]
    if flags & bitstream.FLAG_SEED:
        fields.append(varint(draw(_value)))
    if flags & bitstream.FLAG_HINTS:
        hints = draw(st.lists(st.tuples(st.sampled_from(fuzz.HINT_KEYS), _value), max_size=20))
        fields.append(varint(draw(st.one_of(st.just(len(hints)), _value))))
        fields += [bytes([k]) + varint(v) for k, v in hints]
    caption = draw(st.binary(max_size=40))
    fields += [varint(draw(st.one_of(st.just(len(caption)), st.integers(0, 64)))), caption]
    fields.append(draw(st.binary(max_size=300)))
    return fuzz.with_crc(b"".join(fields))


@PROPERTY
@given(structured())
def test_property_structured(data):
    _check(data)


@PROPERTY
@given(st.sampled_from(sorted(fuzz.MUTATIONS)), st.integers(0, 2**32 - 1), st.integers(0, 50))
def test_property_each_mutation(name, rng_seed, seed_index):
    import random

    fields = [list(f) for f in fuzz.split(SEEDS[seed_index % len(SEEDS)])]
    _check(fuzz.with_crc(fuzz.MUTATIONS[name][0](fields, random.Random(rng_seed), SEEDS)))
