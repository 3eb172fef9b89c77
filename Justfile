# Trident tasks. `pip install -e '.[dev]'` provides `just` (rust-just).

# Full test suite (unit, pipelines, integration with real daemons)
test:
    python -m pytest -q -p no:cacheprovider

# Fast tests only (no real daemons)
test-unit:
    python -m pytest -q tests/unit

lint:
    ruff check trident tests
    mypy trident

demo:
    trident demo

# Control-plane and data-plane benchmark of the runtime
bench-runtime:
    trident bench runtime --json bench/results/runtime.json
