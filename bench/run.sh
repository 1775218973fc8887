#!/usr/bin/env bash
# Run every benchmark, write the report and plots, then apply the ratio gate.
set -euo pipefail
cd "$(dirname "$0")/.."
blockpool bench --bench-dir bench --results bench/results "$@"
python bench/gate.py bench/results/results.json
