#!/usr/bin/env bash
# Install the Debian packages the tests drive (headless Chromium) when missing and possible.
# Tests that need a package that could not be installed fail with a message naming it.
set -uo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    || echo "WARNING: could not install ${need[*]}; the tests that need them will fail" >&2
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    || echo "WARNING: could not install ${need[*]}; the tests that need them will fail" >&2
else
  echo "WARNING: missing Debian packages ${need[*]} (no root); the tests that need them will fail" >&2
fi
exit 0
