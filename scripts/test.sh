#!/usr/bin/env bash
# Install everything the tests need into .venv and run lint, types and the tests.
#
#   bash scripts/test.sh            # the whole suite, as CI runs it
#   bash scripts/test.sh -k dedup   # extra arguments go to pytest
#
# The tests start their own S3 (moto), GCS (fake-gcs-server) and Azure
# (Azurite) servers on 127.0.0.1; this script installs them, and the headless
# Chromium (Debian's package) that the web view's browser tests drive.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,all]'
bash scripts/install_test_servers.sh
bash scripts/install_browser.sh

export AWS_EC2_METADATA_DISABLED=true
.venv/bin/ruff check cas tests scripts examples
.venv/bin/ruff format --check cas tests scripts examples
.venv/bin/lint-imports --no-cache
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
