"""Model directories: only a holder of the model key can make the server run a pickle."""

from __future__ import annotations

import hashlib
import json
import stat
import time
from pathlib import Path

import joblib
import pytest
from fastapi.testclient import TestClient
from serving_helpers import ADMIN, DECIDE, EXAMPLE_CATALOG, KEYS, auth, order

from insertrec import modeldir
from insertrec.catalog import Catalog
from insertrec.engine import Engine
from insertrec.errors import ModelError
from insertrec.policy import Policy
from insertrec.serving.app import create_app
from insertrec.serving.settings import Settings


class Payload:
    """A pickle that, when loaded, creates ``marker``: what an attacker's code would do first."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_model(out: Path, version: str = "signed-v1") -> Path:
    rules = Engine.rules_only(Catalog.load(EXAMPLE_CATALOG))
    parts = {"policy": Policy(rules.catalog, epsilon=0.1, version=version), "params": rules.params,
             "snapshot": None, "segments": {}}
    modeldir.save(out, {"engine": parts}, {"catalog.yaml": rules.catalog.text}, {"version": version})
    return out


def plant(model: Path, marker: Path) -> None:
    """Replace the engine by a malicious pickle and rewrite its hash in the manifest, as an attacker
    with write access to the directory (but not the key) can."""
    joblib.dump(Payload(marker), model / "engine.joblib", compress=3)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["artifacts"]["engine.joblib"] = hashlib.sha256((model / "engine.joblib").read_bytes()).hexdigest()
    (model / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def test_a_signed_model_loads(tmp_path):
    assert Engine.load(write_model(tmp_path / "m")).version == "signed-v1"


def test_a_pickle_with_its_hash_rewritten_is_refused_and_never_runs(tmp_path):
    model, marker = write_model(tmp_path / "m"), tmp_path / "pwned"
    plant(model, marker)
    with pytest.raises(ModelError, match=r"manifest\.sig: signature does not match manifest\.json "
                                         r"\(the manifest was altered after signing\)"):
        Engine.load(model)
    assert not marker.exists()


def test_an_unsigned_model_is_refused(tmp_path):
    model = write_model(tmp_path / "m")
    (model / "manifest.sig").unlink()
    with pytest.raises(ModelError, match=r"manifest\.sig: missing; the model is not signed"):
        Engine.load(model)


def test_a_model_signed_with_another_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("INSERTREC_MODEL_KEY", "the-training-team-key-0001")
    model = write_model(tmp_path / "m")
    assert Engine.load(model).version == "signed-v1"
    key_file = tmp_path / "serving.key"
    key_file.write_text("another-key-entirely-0002\n")
    monkeypatch.delenv("INSERTREC_MODEL_KEY")
    monkeypatch.setenv("INSERTREC_MODEL_KEY_FILE", str(key_file))
    with pytest.raises(ModelError, match=r"signed with another key \(key id \w{12}\) than "
                                         r"INSERTREC_MODEL_KEY_FILE .*serving\.key"):
        Engine.load(model)


def test_without_a_configured_key_train_creates_a_private_per_user_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key_file = tmp_path / "config" / "insertrec" / "model.key"
    with pytest.raises(ModelError, match="model.key.*no such file"):     # nothing signed here yet
        modeldir.model_key()
    model = write_model(tmp_path / "m")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) == 64
    assert Engine.load(model).version == "signed-v1"          # the same user verifies with it
    first = key_file.read_bytes()
    write_model(tmp_path / "m2")
    assert key_file.read_bytes() == first                     # created once, then reused


def test_a_short_or_ambiguous_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("INSERTREC_MODEL_KEY", "short")
    with pytest.raises(ModelError, match="INSERTREC_MODEL_KEY: model key too short"):
        write_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    monkeypatch.setenv("INSERTREC_MODEL_KEY_FILE", str(tmp_path / "k"))
    with pytest.raises(ModelError, match="both INSERTREC_MODEL_KEY and INSERTREC_MODEL_KEY_FILE"):
        modeldir.model_key()


def _settings(tmp_path: Path, model: Path) -> Settings:
    return Settings.load(environ={}, model=str(model), db_url=f"sqlite:///{tmp_path / 'log.db'}", api_keys=KEYS)


def test_the_server_refuses_a_tampered_model_on_reload_and_keeps_answering(tmp_path):
    model, marker = write_model(tmp_path / "m"), tmp_path / "pwned"
    with TestClient(create_app(_settings(tmp_path, model))) as c:
        assert c.get("/readyz").json()["model_version"] == "signed-v1"
        plant(model, marker)
        assert c.post("/v1/admin/reload", headers=auth(ADMIN)).status_code == 202
        deadline = time.monotonic() + 30
        while c.app.state.service.holder.current.generation != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = c.get("/readyz", headers=auth(ADMIN)).json()   # an admin sees the reason
        assert ready["status"] == "degraded" and "signature does not match" in ready["reason"]
        assert ready["model_version"] == "signed-v1"             # still the model it had
        r = c.post("/v1/recommendations", json=order(1), headers=auth(DECIDE))
        assert r.status_code == 200
    assert not marker.exists()


def test_the_server_starts_on_the_rules_when_its_model_is_tampered(tmp_path):
    model, marker = write_model(tmp_path / "m"), tmp_path / "pwned"
    plant(model, marker)
    with TestClient(create_app(_settings(tmp_path, model))) as c:
        ready = c.get("/readyz", headers=auth(ADMIN)).json()
        assert ready["status"] == "degraded" and "manifest.sig" in ready["reason"]
        r = c.post("/v1/recommendations", json=order(1), headers=auth(DECIDE))
        assert r.status_code == 200 and r.json()["policy"] == "fallback"
    assert not marker.exists()


def test_a_model_cannot_be_loaded_where_no_key_exists(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "another-user"))
    with pytest.raises(ModelError, match=r"/m: cannot check the model's signature: the per-user model key "
                                         r".*another-user/insertrec/model\.key.*: no such file; set "
                                         r"INSERTREC_MODEL_KEY or INSERTREC_MODEL_KEY_FILE"):
        Engine.load(model)


def test_the_cli_refuses_an_unsigned_model_in_one_line(tmp_path, capsys):
    from insertrec.cli import main

    model = write_model(tmp_path / "m")
    (model / "manifest.sig").unlink()
    assert main(["segments", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.sig: missing; the model is not signed" in err
    assert "Traceback" not in err
