#!/usr/bin/env bash
# Tortie's guided demo (the README's first quick-start command): installs what is missing, then
# runs the demo. Needs root (it starts etcd and, later, network namespaces).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/install-deps.sh
exec .venv/bin/python -m netlab.demo "$@"
