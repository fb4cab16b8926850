#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the UI test (tests/test_ui.py), as root. Idempotent.
# Exit 0: ready; 3: this machine cannot have it (not root, not Debian); anything else: failed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "chromium.sh: not root, cannot install Chromium" >&2; exit 3; fi
command -v apt-get >/dev/null || { echo "chromium.sh: no apt-get (not Debian)" >&2; exit 3; }
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version
