"""A model directory that describes itself and refuses to load if altered.

`manifest.json` lists every artifact with its SHA-256, the library versions it
was built with, the catalog hash, the feature list, the training data's
fingerprint and its metrics. `load` checks every hash *before* unpickling
anything: joblib files execute code when loaded, so a tampered or truncated
file must never reach `joblib.load`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import joblib

from insertrec.errors import ModelError

MANIFEST = "manifest.json"
FORMAT = 1
_LIBRARIES = ("insertrec", "numpy", "pandas", "scikit-learn", "joblib")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "unknown"
    return out


def save(path: str | Path, objects: dict[str, Any], files: dict[str, str | bytes],
         info: dict[str, Any]) -> dict:
    """Write ``objects`` (joblib), ``files`` (text/bytes) and the manifest; returns the manifest."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in objects.items():
        joblib.dump(obj, out / f"{name}.joblib", compress=3)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (out / name).write_bytes(data)
    names = [f"{n}.joblib" for n in objects] + list(files)
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "libraries": library_versions(), **info,
                "artifacts": {n: sha256_file(out / n) for n in sorted(names)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of a model directory, validated for shape (nothing unpickled)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"model directory {str(root)!r} does not exist")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelError(f"{root}: no {MANIFEST}; not an insertrec model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{root / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("artifacts"), dict):
        raise ModelError(f"{root / MANIFEST}: unsupported model format (expected format {FORMAT})")
    return manifest


def verify(path: str | Path) -> dict:
    """Check every artifact's SHA-256 against the manifest; returns the manifest."""
    root = Path(path)
    manifest = read_manifest(root)
    for name, expected in manifest["artifacts"].items():
        file = root / name
        if not file.is_file():
            raise ModelError(f"{root}: artifact {name!r} listed in the manifest is missing")
        if sha256_file(file) != expected:
            raise ModelError(f"{root}: artifact {name!r} does not match its SHA-256 in the manifest "
                             "(modified or truncated); refusing to load it")
    return manifest


def has_policy(manifest: dict) -> bool:
    """Whether the directory holds a decision engine; one trained on orders alone does not."""
    return "engine.joblib" in manifest["artifacts"]


def load(path: str | Path, name: str) -> Any:
    """Unpickle one verified artifact (call `verify` first, once per directory)."""
    try:
        return joblib.load(Path(path) / f"{name}.joblib")
    except Exception as exc:  # a verified file that still fails is a version mismatch
        raise ModelError(f"{path}: cannot load artifact {name!r} ({type(exc).__name__}: {exc}); "
                         "was it built with other library versions?") from None
