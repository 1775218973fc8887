#!/usr/bin/env bash
# Run the block-copy benchmarks, print the tables and apply the ratio gate.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
python -m pytest bench -q -p no:randomly --benchmark-only \
  --benchmark-json=bench/results/latest.json --benchmark-columns=median,iqr,rounds "$@"
python bench/report.py bench/results/latest.json bench/results/latest.md
python bench/gate.py bench/results/latest.json
