#!/usr/bin/env bash
# Debian's headless Chromium and its driver, for the Prefect UI test (tests/test_ui.py); `make test`
# runs this before any test. It installs them with apt-get as root (or with passwordless sudo);
# where it cannot, it says so in one line and the UI test is skipped, except under CI=true, where
# a browser that cannot be installed is an error.
set -uo pipefail
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    as_root=(none)
fi
if [ "${as_root[0]:-}" != none ] && command -v apt-get >/dev/null; then
    echo "make test: installing Debian's chromium and chromium-driver for the UI test (tests/test_ui.py)"
    if "${as_root[@]}" apt-get update -qq >/dev/null \
        && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; then
        exit 0
    fi
    why="apt-get could not install chromium and chromium-driver"
elif command -v apt-get >/dev/null; then
    why="no chromium or chromedriver, and no root or passwordless sudo to apt-get them"
else
    why="no chromium or chromedriver, and no apt-get to install them"
fi
if [ "${CI:-}" = true ]; then
    echo "error: $why: CI runs the UI test (tests/test_ui.py)" >&2
    exit 1
fi
echo "make test: $why: tests/test_ui.py will be skipped (install Chromium and its driver to run it)"
