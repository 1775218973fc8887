"""The family table of ``docs/models.md``, read as the tests check it: one dict of columns per family."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("layout", "batching", "attention", "status")
ROW = re.compile(r"^\| (?P<family>[\w.-]+)" + "".join(rf" \| (?P<{c}>[^|]*)" for c in COLUMNS) + r" \|$")


def model_table() -> dict[str, dict[str, str]]:
    """Each family's row (``layout``, ``batching``, ``attention``, ``status``), stripped."""
    rows = {}
    for line in (ROOT / "docs" / "models.md").read_text().splitlines():
        match = ROW.match(line)
        if match and match["family"] != "family":
            rows[match["family"]] = {k: v.strip() for k, v in match.groupdict().items()}
    return rows
