#!/usr/bin/env bash
# System packages the test suite needs that pip cannot provide.
#
# Chromium comes from Debian, not from `playwright install`: that downloads a browser
# build from outside the package registries, which this project's machines cannot reach.
# The browser tests launch /usr/bin/chromium through Playwright's `executable_path`.
#
# Non-interactive and idempotent: run as root (CI) or with sudo; does nothing when
# everything is already there.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "install-system-deps: $CHROMIUM present ($("$CHROMIUM" --version 2>/dev/null || echo '?'))"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null; then
        SUDO="sudo"
    else
        echo "install-system-deps: not root and no sudo; install Debian's chromium by hand" >&2
        exit 1
    fi
fi

echo "install-system-deps: $CHROMIUM missing; installing Debian package 'chromium'"
echo "+ apt-get update"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
echo "+ apt-get install -y --no-install-recommends chromium"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
echo "install-system-deps: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
