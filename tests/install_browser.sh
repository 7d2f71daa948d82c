#!/usr/bin/env bash
# Debian's headless Chromium and its driver, for the Prefect UI test (tests/test_ui.py): installed
# as tests/apt_install.sh says, where they are missing.
set -uo pipefail
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
source "$(dirname "$0")/apt_install.sh"
apt_install "chromium and chromium-driver" "the UI test (tests/test_ui.py)" chromium chromium-driver
