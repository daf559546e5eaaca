"""pyproject.toml's dependency ranges are what the suite runs against: each has an upper bound
(the next, untested, major version) and the versions installed here fall inside every range."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(text) for text in PROJECT["dependencies"]] + [
    Requirement(text) for extra in PROJECT["optional-dependencies"].values() for text in extra]


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_each_dependency_has_a_tested_range(requirement: Requirement) -> None:
    operators = {spec.operator for spec in requirement.specifier}
    assert ">=" in operators and "<" in operators, f"{requirement}: needs a lower and an upper bound"
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed here")
    assert requirement.specifier.contains(installed, prereleases=True), \
        f"{requirement.name} {installed} is installed and tested, but outside {requirement.specifier}"
