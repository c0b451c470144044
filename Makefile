# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Each sets up .venv on a fresh machine first.
TEST_EXTRAS := dev,detection,annotation,view,ray
DEMO_EXTRAS := detection,view
PYTEST_ARGS ?=

.PHONY: demo test setup-demo setup-test clean

setup-demo:
	scripts/setup.sh $(DEMO_EXTRAS)

setup-test:
	scripts/setup.sh $(TEST_EXTRAS)
	scripts/system_packages.sh
	scripts/peers.sh

demo: setup-demo
	.venv/bin/gldboxes pipeline --out runs/demo

test: setup-test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
