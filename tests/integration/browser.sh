#!/usr/bin/env bash
# Installs what tests/integration/test_dashboard.py needs: Debian's chromium and the Playwright driver
# (pip). Playwright's own browser download is not used: the test launches /usr/bin/chromium directly.
# Run as root (or with sudo) on Debian/Ubuntu:   bash tests/integration/browser.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${CACHELM_VENV:-.venv}/bin/python
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q playwright
echo "chromium: $(command -v chromium)  playwright: $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
