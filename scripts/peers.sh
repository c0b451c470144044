#!/usr/bin/env bash
# Install the peers our benchmarks measure against and the tests drive, when missing and
# possible: the `asmk` package (0.1.1, an sdist with a Cython extension; not a dependency of
# gldboxes). A test that needs a peer that could not be installed fails naming it.
set -uo pipefail
PY=.venv/bin/python
"$PY" -c "import asmk" 2>/dev/null && exit 0
echo "installing the asmk peer (0.1.1) into .venv"
.venv/bin/pip install -q cython \
  && .venv/bin/pip install -q --no-deps --no-build-isolation asmk==0.1.1 \
  || echo "WARNING: could not install asmk; the tests that drive it (tests/test_scale_bench.py::test_asmk_peer, tests/test_asmk_peer_bench.py) will fail" >&2
exit 0
