#!/usr/bin/env bash
# Install everything, then run the linters and the whole test suite (the slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
for setup in scripts/setup/test-*.sh; do
  if [ -e "$setup" ]; then bash "$setup"; fi
done
.venv/bin/ruff check rlmflow tests benchmarks
.venv/bin/mypy rlmflow
.venv/bin/lint-imports  # the layers of pyproject.toml's [tool.importlinter]
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
