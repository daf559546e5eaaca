"""A model directory that describes itself and refuses to load if altered or not signed.

`manifest.json` lists every artifact with its SHA-256, the library versions it
was built with, the catalog hash, the feature list, the training data's
fingerprint and its metrics. `manifest.sig` is an HMAC-SHA256 of the
manifest's exact bytes under the model key. The hashes alone stop corruption,
not tampering: whoever can write the directory can rewrite a hash too. The
signature needs the key, so `verify` checks it first, then every hash, and
`load` unpickles only bytes whose hash it has just checked: joblib files
execute code when loaded, so nothing unsigned ever reaches `joblib.load`.

The key is ``INSERTREC_MODEL_KEY`` (the secret itself) or
``INSERTREC_MODEL_KEY_FILE`` (a file holding it). With neither, it is a
per-user file (``$XDG_CONFIG_HOME/insertrec/model.key``, by default under
``~/.config``) that the first `save` creates at random, mode 0600: training
and serving as the same user on one machine then needs no setup, and a
directory someone else wrote is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import joblib

from insertrec.errors import ModelError

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "MANIFEST", "SIGNATURE", "ModelKey", "default_key_file", "load",
           "model_key", "read_manifest", "save", "sign", "verify"]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1
KEY_ENV, KEY_FILE_ENV = "INSERTREC_MODEL_KEY", "INSERTREC_MODEL_KEY_FILE"
MIN_KEY_LENGTH = 16
_ALGORITHM = "HMAC-SHA256"
_LIBRARIES = ("insertrec", "numpy", "pandas", "scikit-learn", "joblib")


@dataclass(frozen=True)
class ModelKey:
    """The secret that signs model directories, and where it came from (for messages)."""

    secret: bytes
    source: str

    @property
    def id(self) -> str:
        """A short public name of the key, so that "signed with another key" can say which."""
        return hashlib.sha256(b"insertrec model key id\0" + self.secret).hexdigest()[:12]

    def sign(self, manifest: bytes) -> str:
        return hmac.new(self.secret, manifest, hashlib.sha256).hexdigest()


def default_key_file() -> Path:
    """The per-user key used when neither INSERTREC_MODEL_KEY nor INSERTREC_MODEL_KEY_FILE is set."""
    try:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    except RuntimeError:   # no HOME and no passwd entry: nowhere per-user to keep a key
        raise ModelError(f"no home directory for the per-user model key; set {KEY_ENV} or {KEY_FILE_ENV}") from None
    return config / "insertrec" / "model.key"


def model_key(*, create: bool = False) -> ModelKey:
    """The configured model key; ``create`` makes the per-user key file when no key is configured."""
    if KEY_ENV in os.environ and KEY_FILE_ENV in os.environ:
        raise ModelError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set one of them")
    if KEY_ENV in os.environ:
        return _checked(os.environ[KEY_ENV].encode(), KEY_ENV)
    if KEY_FILE_ENV in os.environ:
        return _read_key(Path(os.environ[KEY_FILE_ENV]), f"{KEY_FILE_ENV} {os.environ[KEY_FILE_ENV]!r}")
    path = default_key_file()
    if create and not path.exists():
        _create_key(path)
    return _read_key(path, f"the per-user model key {str(path)!r}")


def _checked(secret: bytes, source: str) -> ModelKey:
    secret = secret.strip()
    if len(secret) < MIN_KEY_LENGTH:
        raise ModelError(f"{source}: model key too short (at least {MIN_KEY_LENGTH} characters)")
    return ModelKey(secret, source)


def _read_key(path: Path, source: str) -> ModelKey:
    try:
        return _checked(path.read_bytes(), source)
    except FileNotFoundError:
        raise ModelError(f"{source}: no such file; set {KEY_ENV} or {KEY_FILE_ENV} to the key the model "
                         "was signed with (or train on this machine, which creates the per-user key)") from None
    except OSError as exc:
        raise ModelError(f"{source}: cannot read the model key ({exc.strerror})") from None


def _create_key(path: Path) -> None:
    """A random key, owner-only, published atomically: two trainings at once end up with one key."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(scratch, path)
        except FileExistsError:
            pass
        finally:
            scratch.unlink(missing_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the per-user model key {str(path)!r} ({exc.strerror}); "
                         f"set {KEY_ENV} or {KEY_FILE_ENV}") from None


def _sha256_file(path: Path) -> str:
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
         info: dict[str, Any]) -> dict[str, Any]:
    """Write ``objects`` (joblib), ``files`` (text/bytes), the manifest and its signature; returns the manifest."""
    key = model_key(create=True)    # before writing anything: no key, no model
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
                "artifacts": {n: _sha256_file(out / n) for n in sorted(names)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    sign(out, key)
    return manifest


def sign(path: str | Path, key: ModelKey | None = None) -> None:
    """Write ``manifest.sig`` for the directory's manifest as it is now (``key``: the configured one)."""
    root = Path(path)
    key = key or model_key(create=True)
    signature = {"algorithm": _ALGORITHM, "key_id": key.id, "signature": key.sign((root / MANIFEST).read_bytes())}
    (root / SIGNATURE).write_text(json.dumps(signature, indent=2) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model directory, validated for shape (not its signature; nothing unpickled)."""
    root = Path(path)
    return _parse(root, _manifest_bytes(root))


def _manifest_bytes(root: Path) -> bytes:
    if not root.is_dir():
        raise ModelError(f"model directory {str(root)!r} does not exist")
    try:
        return (root / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{root}: no {MANIFEST}; not an insertrec model directory") from None


def _parse(root: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{root / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("artifacts"), dict):
        raise ModelError(f"{root / MANIFEST}: unsupported model format (expected format {FORMAT})")
    return manifest


def _check_signature(root: Path, raw: bytes, key: ModelKey) -> None:
    """Refuse a manifest not signed with ``key``, naming the file and why."""
    file = root / SIGNATURE
    try:
        signature = json.loads(file.read_bytes())
        found, key_id = str(signature["signature"]), str(signature.get("key_id", "?"))
        if signature.get("algorithm") != _ALGORITHM:
            raise ValueError
    except FileNotFoundError:
        raise ModelError(f"{file}: missing; the model is not signed, refusing to load it (models are signed "
                         f"by `insertrec train` with the model key, {KEY_ENV} or {KEY_FILE_ENV})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{file}: not an {_ALGORITHM} signature; refusing to load the model") from None
    if not hmac.compare_digest(found.encode(), key.sign(raw).encode()):
        why = "the manifest was altered after signing" if key_id == key.id else \
            f"it was signed with another key (key id {key_id}) than {key.source} (key id {key.id})"
        raise ModelError(f"{file}: signature does not match {MANIFEST} ({why}); refusing to load the model")


def verify(path: str | Path, key: ModelKey | None = None) -> dict[str, Any]:
    """Check the manifest's signature, then every artifact's SHA-256; returns the manifest.

    ``key`` defaults to the configured model key (see `model_key`).
    """
    root = Path(path)
    raw = _manifest_bytes(root)
    if key is None:
        try:
            key = model_key()
        except ModelError as err:
            raise ModelError(f"{root}: cannot check the model's signature: {err}") from None
    _check_signature(root, raw, key)
    manifest = _parse(root, raw)
    for name, expected in manifest["artifacts"].items():
        file = root / name
        if not file.is_file():
            raise ModelError(f"{root}: artifact {name!r} listed in the manifest is missing")
        if _sha256_file(file) != expected:
            raise ModelError(f"{root}: artifact {name!r} does not match its SHA-256 in the manifest "
                             "(modified or truncated); refusing to load it")
    return manifest


def has_policy(manifest: dict[str, Any]) -> bool:
    """Whether the directory holds a decision engine; one trained on orders alone does not."""
    return "engine.joblib" in manifest["artifacts"]


def load(path: str | Path, name: str, manifest: dict[str, Any]) -> Any:
    """Unpickle one artifact of a verified ``manifest`` (what `verify` returned).

    The file is read once and its bytes are checked against the manifest
    before they are unpickled, so a file swapped after `verify` is refused too.
    """
    file = f"{name}.joblib"
    try:
        data = (Path(path) / file).read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read artifact {file!r} ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != manifest["artifacts"].get(file):
        raise ModelError(f"{path}: artifact {file!r} does not match its SHA-256 in the manifest "
                         "(modified or truncated); refusing to load it")
    try:
        return joblib.load(io.BytesIO(data))
    except Exception as exc:  # a verified file that still fails is a version mismatch
        raise ModelError(f"{path}: cannot load artifact {name!r} ({type(exc).__name__}: {exc}); "
                         "was it built with other library versions or an older insertrec (whose classes "
                         "have moved since)? Retrain the model with this version") from None
