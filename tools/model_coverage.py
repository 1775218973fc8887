"""Write the table of ``docs/models.md``: every family of the installed mlx-lm, how blockpool stores it, and the test.

Run: ``python tools/model_coverage.py > /tmp/table.md`` (a few minutes on two CPU
cores: every family's tiny model is built, its cache layout read, its
batching checked, and whether its attention runs paged). ``tests/docs/test_model_coverage.py`` fails when a family
of the installed mlx-lm is missing from the table.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "python")]

from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec, UnsupportedModelError  # noqa: E402
from blockpool.demo_model import build_model  # noqa: E402
from family_configs import FAMILY_CONFIGS  # noqa: E402


def main() -> None:
    survey = json.loads((ROOT / "tests" / "family_survey.json").read_text())
    families = survey["families"]
    families = families if isinstance(families, list) else list(families.values())
    from family_models import shared_tokenizer

    tokenizer = shared_tokenizer()
    print("| family | how its layers are stored | batching | attention | status |")
    print("|---|---|---|---|---|")
    for entry in sorted(families, key=lambda e: e["model_type"]):
        family = entry["model_type"]
        if family not in FAMILY_CONFIGS:
            print(f"| {family} | - | - | - | not run here: {entry.get('reason', '').split(':')[0]} |")
            continue
        model = build_model(copy.deepcopy(FAMILY_CONFIGS[family]))
        try:
            spec = ModelCacheSpec.from_model(model)
        except UnsupportedModelError as error:
            print(f"| {family} | - | - | - | refused: {error} |")
            continue
        kinds = []
        for group, is_list in ((g, i in spec.cache_lists) for i, g in enumerate(spec.groups)):
            names = "+".join(spec.layers[e].attention for e in group)
            kinds.append(f"list({names})" if is_list else names)
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        layout = ", ".join(f"{n} {k}" for k, n in counts.items())
        engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, memory_bytes=8 << 20))
        batching = engine.batching
        if batching.decode and batching.padded_prefill:
            how = "batched"
        elif batching.decode:
            how = "decode batched, prefill one at a time"
        else:
            how = "one at a time"
        paged = engine.paged
        attention = "paged" if paged.paged else f"gathered: {paged.detail}"
        print(f"| {family} | {layout} | {how} | {attention} | served: test_families.py |")


if __name__ == "__main__":
    main()
