"""The README's examples, run as a reader would, taken from README.md itself so that a line
changed there is a line tested here: the HTTP service block (its serve line, then its curl lines)
and the data scientist's block (in a fresh directory holding a small simulated shop as `shop/`
and `recent/`, with MLflow's default store in that directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from insertrec.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_URL = "http://127.0.0.1:8000"


def service_commands() -> list[str]:
    """The shell commands of the README's first bash block under "The HTTP service", one per
    command (continuation lines joined, comments left out)."""
    section = README.read_text().split("## The HTTP service", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under 'The HTTP service'"
    lines = [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [c.strip() for c in re.split(r"(?<!\\)\n", "\n".join(lines).replace("\\\n", " "))]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_serve_and_curl_lines_work_as_written(tmp_path):
    commands = service_commands()
    serve = [c for c in commands if "insertrec serve" in c]
    curls = [c for c in commands if c.startswith("curl ")]
    assert len(serve) == 1 and len(curls) == 2, commands
    # a small shop and a model where the README's first-hour path puts it (models/demo)
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--customers", "200"]) == 0
    assert main(["train", "--data", str(tmp_path / "demo"), "--out", str(tmp_path / "models" / "demo"),
                 "--no-mlflow"]) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("INSERTREC_")}
    url = DEFAULT_URL
    if not port_free(8000):   # a shared machine: the same lines on another port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["INSERTREC_PORT"], url = str(port), f"http://127.0.0.1:{port}"
        curls = [c.replace(DEFAULT_URL, url) for c in curls]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", "-c", serve[0]], cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"serve exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(url + "/readyz", timeout=1).json().get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready in 60 s: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        answers = [json.loads(subprocess.run(["bash", "-c", c], cwd=tmp_path, env=env, capture_output=True,
                                             text=True, timeout=30, check=True).stdout) for c in curls]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    decision, outcome = answers
    assert decision["order_id"] == "A-1001" and decision["decision_id"]
    assert set(decision["slots"]) == {"packaging", "insert", "coupon"}
    assert decision["policy"] in ("model", "explore", "rules")
    assert all(slot["action_id"] and 0 < slot["propensity"] <= 1 for slot in decision["slots"].values())
    assert outcome == {"outcome_id": outcome["outcome_id"], "order_id": "A-1001", "type": "nps", "recorded": True}


SKIPPED = ("mlflow ui", "insertrec serve")   # long-running servers; the service has its own tests


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under ``heading``, comments stripped."""
    text = README.read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def run_block(commands: list[str], cwd: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Each command but the long-running servers, in ``cwd``, as a reader would; each must succeed
    without a traceback."""
    outputs = []
    for command in commands:
        if command.startswith(SKIPPED):
            continue
        began = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        print(f"{time.perf_counter() - began:6.1f}s  {command}")
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
        outputs.append(done)
    return outputs


@pytest.mark.slow
def test_the_data_scientists_block_runs_as_written(tmp_path, monkeypatch):
    commands = readme_block("## For data scientists")
    assert any(c.startswith("mlflow run training") for c in commands)
    assert sum(c.startswith("insertrec promote") for c in commands) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}   # MLflow's defaults
    subprocess.run([sys.executable, "-m", "insertrec.cli", "demo-data", "--out", "shop", "--customers", "400",
                    "--seed", "2"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    shutil.copytree(tmp_path / "shop", tmp_path / "recent")
    (tmp_path / "training").symlink_to(README.parent / "training")
    outputs = run_block(commands, tmp_path, env)

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from insertrec.tracking import client

    c = client()
    runs = c.search_runs([c.get_experiment_by_name("insertrec").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    default = c.get_experiment_by_name("Default")
    assert default is None or not c.search_runs([default.experiment_id])
    assert {str(v.version) for v in c.search_model_versions("name='insertrec'")} == {"1", "2"}
    assert str(c.get_model_version_by_alias("insertrec", "champion").version) in {"1", "2"}
    first, second = outputs[-2].stdout, outputs[-1].stdout
    assert "version 1: now champion (no champion yet)" in first
    assert "judged_from: 2024-06-01T00:00:00+00:00" in second and "orders_left_out_inside_training" in second
    assert "at or after 2024-06-01T00:00:00+00:00, the later of the two training cutoffs; warning:" in second


@pytest.mark.slow
def test_the_pessimism_block_runs_as_written_and_the_run_records_its_z(tmp_path, monkeypatch):
    """The model and its MLflow run say how it was trained, and it decides with that z."""
    commands = readme_block("## Never spend where the evidence is thin")
    assert any(c.startswith("insertrec train") and "--pessimism 1" in c for c in commands), commands
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}   # MLflow's defaults
    simulated = run_block(commands, tmp_path, env)[-1]
    assert "uplift_capture" in simulated.stdout
    model = tmp_path / "models" / "careful"
    assert json.loads((model / "manifest.json").read_text())["params"]["pessimism"] == 1.0
    from insertrec.engine import Engine

    assert Engine.load(model).policy.pessimism == 1.0

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from insertrec.tracking import client

    c = client()
    runs = c.search_runs([c.get_experiment_by_name("insertrec").experiment_id])
    assert [r.data.params["pessimism"] for r in runs] == ["1.0"]


@pytest.mark.slow
def test_the_first_set_up_command_runs_as_written(tmp_path):
    """The README's first command, the whole pipeline on the embedded demo, as a new user runs it
    (its `pip install -e .` is what this suite already stands on, so it is left out)."""
    text = README.read_text()
    command = re.search(r"```bash\n(pip install -e \. && .*?)\n```", text)
    assert command, "README: no first set-up command"
    pipeline = command.group(1).removeprefix("pip install -e . && ")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(["bash", "-c", pipeline], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{pipeline}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert (tmp_path / "demo" / "report" / "segments.csv").is_file()
    for key in ("value_model", "value_oracle", "value_rules", "uplift_capture"):
        assert key in done.stdout, f"simulate printed no {key}:\n{done.stdout[-2000:]}"
