"""The README's examples run as written (the service and curl lines are covered beside the API tests).

The data scientist's block is taken from README.md itself, so that a line changed there is a
line tested here: it runs in a fresh directory holding a small simulated shop as `shop/` and
`recent/`, with MLflow's default store in that directory, as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = ("mlflow ui", "insertrec serve")   # long-running servers; the service has its own tests


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under ``heading``, comments stripped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


@pytest.mark.slow
def test_the_data_scientists_block_runs_as_written(tmp_path, monkeypatch):
    commands = readme_block("## For data scientists")
    assert any(c.startswith("mlflow run training") for c in commands)
    assert sum(c.startswith("insertrec promote") for c in commands) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}   # MLflow's defaults
    subprocess.run([sys.executable, "-m", "insertrec.cli", "demo-data", "--out", "shop", "--customers", "400",
                    "--seed", "2"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    shutil.copytree(tmp_path / "shop", tmp_path / "recent")
    (tmp_path / "training").symlink_to(ROOT / "training")
    outputs = []
    for command in commands:
        if command.startswith(SKIPPED):
            continue
        began = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        print(f"{time.perf_counter() - began:6.1f}s  {command}")
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
        outputs.append(done)

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
