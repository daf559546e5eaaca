"""The README's HTTP service example, run as a reader would: its serve line, then its curl lines."""

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
