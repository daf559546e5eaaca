"""The contract a clone carries (docs/SPEC.md) is the project's contract as written (../shared/SPEC.md).

The README points users of a clone at docs/SPEC.md, since ../shared lies outside the repository;
where both are present (CI lays shared/ beside the clone) they must be the same text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "SPEC.md"


def test_the_clone_carries_the_contract_the_readme_links():
    assert (ROOT / "docs" / "SPEC.md").is_file()
    assert "docs/SPEC.md" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(not SHARED.is_file(), reason="no shared/ beside this checkout")
def test_the_carried_contract_is_the_shared_one():
    assert (ROOT / "docs" / "SPEC.md").read_text() == SHARED.read_text()
