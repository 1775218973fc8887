"""``docs/models.md`` covers every model family of the installed mlx-lm, and its "served" rows are tested.

A new mlx-lm release with new families fails here at once: add them to the
table (``tools/model_coverage.py`` writes it) and, where they run, to
``tests/family_configs.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mlx_lm

from family_configs import FAMILY_CONFIGS
from model_table import model_table


def installed_families() -> set[str]:
    """Module files of mlx_lm/models that are a family: they define (or import) a ``Model`` class."""
    found = set()
    for path in (Path(mlx_lm.__file__).parent / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            defines = isinstance(node, ast.ClassDef) and node.name == "Model"
            imports = isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == "Model" for a in node.names)
            if defines or imports:
                found.add(path.stem)
    return found


def test_every_installed_family_has_a_row():
    families, rows = installed_families(), model_table()
    assert families - set(rows) == set(), f"families missing from docs/models.md: {sorted(families - set(rows))}"
    assert set(rows) - families == set(), f"rows for families mlx-lm no longer has: {sorted(set(rows) - families)}"


def test_served_rows_are_tested_and_the_others_say_why():
    for family, row in model_table().items():
        status = row["status"]
        if status.startswith("served"):
            assert family in FAMILY_CONFIGS, family  # so test_families.py runs it
            # test_families.py checks the column against the engine's own check
            assert re.match(r"paged$|gathered: \S", row["attention"]), (family, row["attention"])
        else:
            assert re.match(r"(refused|not run here): \S", status), (family, status)
            assert family not in FAMILY_CONFIGS or status.startswith("refused"), family
