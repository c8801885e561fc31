#!/usr/bin/env bash
# Debian's headless-capable Chromium for the browser test of /docs (tests/test_docs_browser.py), and a
# font for its screenshot. Pinned to bookworm-security's version (a newer security release replaces it:
# apt-pinned.sh then installs the current one, with a warning); idempotent (no apt call when installed).
set -euo pipefail

CHROMIUM_VERSION="${CHROMIUM_VERSION:-156.0.8078.114-1~deb12u1}"
FONTS_VERSION="${FONTS_VERSION:-2.1.5-1}"

# shellcheck source=../lib/apt-pinned.sh
source "$(dirname "$0")/../lib/apt-pinned.sh"

install_pinned "chromium=${CHROMIUM_VERSION}" "fonts-liberation2=${FONTS_VERSION}"

chromium --version
