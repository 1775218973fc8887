#!/usr/bin/env bash
# Test mlx-blockpool against several mlx-lm releases, one fresh virtualenv each.
#
#   tools/mlx_lm_matrix.sh                    # the oldest release pyproject.toml admits, and the newest on the index
#   tools/mlx_lm_matrix.sh 0.32.0 0.32.2      # the releases named
#
# For each version: a virtualenv under a throwaway ${TMPDIR:-/tmp}/matrix-* directory,
# `pip install ".[test]" "mlx-lm==VERSION"` from the working tree (the extension builds in its
# own build dir there, about a minute each), then a focused pytest subset that drives mlx-lm's
# cache classes, BatchGenerator-style batching and the reference outputs. Prints a pass/fail table
# and exits non-zero when any version fails.
#
# A version that the mlx-lm requirement in pyproject.toml excludes is tested from a copy of the
# tree whose requirement is rewritten to `mlx-lm==VERSION` (marked "overridden" in the table): that
# answers "would widening the range to this version work?" without editing the tree.
#
# mlx itself is never varied: the extension links libmlx, so pyproject.toml pins it exactly.
#
# Environment:
#   MATRIX_PYTHON   interpreter for the virtualenvs (default: python3)
#   MATRIX_TESTS    space-separated pytest paths (default: the subset below)
#   MATRIX_PYTEST   extra pytest arguments, e.g. "-x" or "-k equivalence"
#   MATRIX_KEEP=1   keep the virtualenvs, builds and logs (default: venvs and builds are deleted as
#                   soon as a version is done; logs are kept only when something failed)
#   MATRIX_JOBS     parallel compile jobs for the extension (default: 2)
#   MATRIX_TIMEOUT  seconds allowed per install and per test run (default: 1800)
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${MATRIX_PYTHON:-python3}
jobs=${MATRIX_JOBS:-2}
limit=${MATRIX_TIMEOUT:-1800}
default_tests="tests/integration/test_exp005_equivalence.py
tests/integration/test_engine.py
tests/integration/test_batch_engine.py
tests/integration/test_cache_conversion.py
tests/integration/test_budget.py
tests/integration/test_cli.py
tests/misuse/test_engine_misuse.py
tests/unit/test_spec.py"
read -r -a tests <<<"$(echo ${MATRIX_TESTS:-$default_tests})"

# The mlx-lm requirement line of [project].dependencies, e.g. mlx-lm>=0.32.0,<0.33
requirement=$(sed -n 's/^[[:space:]]*"\(mlx-lm[^";]*\)".*/\1/p' "$root/pyproject.toml" | head -n 1)
if [ -z "$requirement" ]; then
  echo "matrix: no mlx-lm requirement found in $root/pyproject.toml" >&2
  exit 2
fi

newest_on_index() {
  "$python" -m pip index versions mlx-lm 2>/dev/null \
    | sed -n 's/^Available versions: \([^,]*\).*/\1/p'
}

oldest_admitted() {
  # The lowest version the requirement names (>=X or ==X); that is the candidate oldest.
  echo "$requirement" | grep -oE '(>=|==|~=)[0-9][0-9a-z.]*' | sed 's/^..//' | head -n 1
}

if [ "$#" -gt 0 ]; then
  versions=("$@")
else
  oldest=$(oldest_admitted)
  newest=$(newest_on_index)
  if [ -z "$oldest" ] || [ -z "$newest" ]; then
    echo "matrix: could not work out the default versions (oldest='$oldest' newest='$newest'); name them" >&2
    exit 2
  fi
  versions=("$oldest")
  [ "$newest" != "$oldest" ] && versions+=("$newest")
fi

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/matrix-mlxlm-XXXXXX")
failed=0
cleanup() {
  if [ "${MATRIX_KEEP:-0}" = 1 ]; then
    echo "matrix: kept $run_dir"
  elif [ "$failed" != 0 ]; then
    echo "matrix: logs of this run kept in $run_dir/*/log.txt"
  else
    rm -rf "$run_dir"
  fi
}
trap cleanup EXIT

echo "matrix: requirement in pyproject.toml: $requirement"
echo "matrix: versions: ${versions[*]}"
echo "matrix: tests: ${tests[*]}"
echo "matrix: work dir: $run_dir"

rows=()
for version in "${versions[@]}"; do
  work="$run_dir/$version"
  mkdir -p "$work"
  log="$work/log.txt"
  venv="$work/venv"
  echo
  echo "=== mlx-lm $version ==="
  start=$SECONDS

  "$python" -m venv "$venv" >>"$log" 2>&1 && "$venv/bin/pip" install -q packaging >>"$log" 2>&1
  admitted=$("$venv/bin/python" - "$requirement" "$version" <<'EOF'
import sys
from packaging.requirements import Requirement
print("yes" if Requirement(sys.argv[1]).specifier.contains(sys.argv[2], prereleases=True) else "no")
EOF
  )
  tree="$root"
  how="declared"
  if [ "$admitted" != yes ]; then
    # Copy the tree (sources only) and rewrite the requirement there; the working tree is untouched.
    tree="$work/tree"
    mkdir -p "$tree"
    (cd "$root" && tar --exclude=./build --exclude=./.venv --exclude=./.git --exclude='*.so' \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis --exclude=.benchmarks \
        -cf - .) | tar -xf - -C "$tree"
    sed -i "s/^\([[:space:]]*\)\"mlx-lm[^\"]*\"/\1\"mlx-lm==$version\"/" "$tree/pyproject.toml"
    if ! grep -q "\"mlx-lm==$version\"" "$tree/pyproject.toml"; then
      echo "matrix: could not rewrite the mlx-lm requirement in the copy of pyproject.toml" >&2
      exit 2
    fi
    how="overridden"
  fi

  echo "install: pip install \"$tree[test]\" \"mlx-lm==$version\"  ($how; log: $log)"
  if ! CMAKE_BUILD_PARALLEL_LEVEL=$jobs timeout "$limit" nice -n 10 "$venv/bin/pip" install \
      --config-settings=build-dir="$work/build" "$tree[test]" "mlx-lm==$version" >>"$log" 2>&1; then
    tail -n 15 "$log"
    rows+=("$version|$how|-|install failed|-|$((SECONDS - start))s")
    failed=1
    continue
  fi
  installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mlx-lm"), m.version("mlx"))' 2>>"$log")

  # pytest reads the tests from the tree; blockpool itself must come from the venv (checked below).
  echo "tests: mlx-lm/mlx installed: $installed"
  (cd "$tree" && timeout "$limit" nice -n 10 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      --junitxml="$work/junit.xml" ${MATRIX_PYTEST:-} "${tests[@]}") >>"$log" 2>&1
  rc=$?
  counts=$("$venv/bin/python" - "$work/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("no results"); raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
f = sum(int(s.get("failures", 0)) for s in suites)
e = sum(int(s.get("errors", 0)) for s in suites)
k = sum(int(s.get("skipped", 0)) for s in suites)
print(f"{t - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
EOF
  )
  where=$(cd "$tree" && "$venv/bin/python" -c 'import blockpool, os; print(os.path.dirname(blockpool.__file__))' 2>"$work/import.txt")
  case "$where" in
    "$venv"/*) ;;
    "") counts="import blockpool: $(grep -E '^[A-Za-z]*(Error|Exception)' "$work/import.txt" | tail -n 1)"; rc=1 ;;
    *) counts="$counts (blockpool imported from $where, not the venv)"; rc=1 ;;
  esac
  if [ "$rc" = 0 ]; then verdict=PASS; else verdict="FAIL (pytest rc $rc)"; failed=1; tail -n 30 "$log"; fi
  rows+=("$version|$how|$installed|$verdict|$counts|$((SECONDS - start))s")
  [ "${MATRIX_KEEP:-0}" = 1 ] || rm -rf "$venv" "$work/build" "$work/tree"
done

echo
echo "mlx-lm matrix ($(uname -sm), $("$python" --version 2>&1)); requirement: $requirement"
printf '%-10s | %-10s | %-18s | %-18s | %-45s | %s\n' "mlx-lm" "range" "installed lm/mlx" "result" "tests" "time"
printf '%s\n' "-----------+------------+--------------------+--------------------+-----------------------------------------------+------"
for row in "${rows[@]}"; do
  IFS='|' read -r v h i r c t <<<"$row"
  printf '%-10s | %-10s | %-18s | %-18s | %-45s | %s\n' "$v" "$h" "$i" "$r" "$c" "$t"
done
exit "$failed"
