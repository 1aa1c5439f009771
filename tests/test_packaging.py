"""The project's and the examples' packaging metadata as setuptools reads it.

setuptools itself is the judge: it applies each ``pyproject.toml`` exactly as a
build does, and a deprecated form (``project.license`` as a table, license
classifiers) is a ``SetuptoolsDeprecationWarning`` that ``pip install`` and
``make demo`` would print on every build.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
setuptools_dist = pytest.importorskip("setuptools.dist")
setuptools_warnings = pytest.importorskip("setuptools.warnings")

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = [ROOT, *sorted(p.parent for p in (ROOT / "examples").glob("*/pyproject.toml"))]


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_pyproject_builds_without_deprecation_warnings(project: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = setuptools_config.apply_configuration(
            setuptools_dist.Distribution(), project / "pyproject.toml"
        )
    deprecated = [
        str(w.message).splitlines()[0]
        for w in caught
        if issubclass(w.category, setuptools_warnings.SetuptoolsDeprecationWarning)
    ]
    assert deprecated == [], f"{project / 'pyproject.toml'}: {deprecated}"
    assert dist.get_version() != "0.0.0"
    assert dist.metadata.license_expression == "MIT"
