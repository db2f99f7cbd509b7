#!/usr/bin/env bash
# Installs everything the tests need (Debian packages as root, Python packages
# in .venv), then runs the linters, the type checker and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    bash scripts/install-test-deps.sh
else
    echo "test.sh: not root, so Debian packages are not installed; real-client tests need them" >&2
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
# An editable install leaves popguard's own modules uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (as on some CI machines) every one of the hundreds of
# processes the tests start would compile them again.
.venv/bin/python -m compileall -q src

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -n 2 "$@"
