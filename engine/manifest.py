"""The artifacts manifest (written by `perco export`), read by runtime backends without torch."""

import hashlib
from pathlib import Path

from perco.engine.errors import ModelError
from perco.engine import families
from perco.engine.model import read_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder, verify: bool = False) -> dict:
    """Read and check a manifest; with `verify`, also hash every file it names."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = read_json(path, missing=f"{folder} holds no exported graphs ({MANIFEST} missing): run 'perco export'")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{path} is not a format-{MANIFEST_FORMAT} PerCo Engine manifest: re-run 'perco export'")
    graphs = manifest.get("graphs", {})
    contract = families.runtime_graphs(manifest)
    missing = sorted(set(contract) - set(graphs))
    if missing:
        raise ModelError(f"{path} lacks graphs: {', '.join(missing)}")
    for name in contract:
        for file, digest in graphs[name].get("sha256", {}).items():
            target = folder / file
            if not target.is_file():
                raise ModelError(f"artifact {target} named by {path} is missing")
            if verify and file_sha256(target) != digest:
                raise ModelError(f"artifact {target} does not match its hash in {path}: re-run 'perco export'")
    return manifest


def spec_from_artifacts(folder) -> tuple:
    """(ModelSpec, manifest) of an artifacts folder: all a decoder needs, without the checkpoint."""
    from perco.engine.model import ModelSpec

    manifest = read_manifest(folder)
    tokenizer = Path(folder) / manifest["tokenizer"] if manifest.get("tokenizer") else None
    entropy = Path(folder) / manifest["entropy_model"] if manifest.get("entropy_model") else None
    return ModelSpec.from_dict(manifest["model"], tokenizer_dir=tokenizer, entropy_dir=entropy), manifest
