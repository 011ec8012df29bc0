#!/usr/bin/env bash
# Tortie's test command (the README's second quick-start command runs it; so does .ci/run):
# installs what is missing, checks lint and types, then runs the unit and lab tests.
# Lab tests need root; they start their own etcd and namespaces and tear them down.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[ "${TORTIE_SKIP_INSTALL:-0}" = 1 ] || scripts/install-deps.sh
py=.venv/bin
echo "== ruff";  $py/ruff check .
echo "== mypy";  $py/mypy
echo "== pytest"
exec $py/pytest -q -p no:cacheprovider "$@"
