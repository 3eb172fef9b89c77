# Trident tasks. `pip install -e '.[dev]'` provides `just` (rust-just).

# Lint, types, then the full test suite (unit, pipelines, integration, fault; slow ones included)
test: lint
    python -m pytest -q -p no:cacheprovider

# Fast tests only (no real daemons)
test-unit:
    python -m pytest -q tests/unit

# Everything but the slow fault tests (fuzz, overload, chaos)
test-fast:
    python -m pytest -q -p no:cacheprovider -m "not slow"

lint:
    ruff check trident tests
    ruff format --check trident tests
    mypy trident

demo:
    trident demo

# Control-plane and data-plane benchmark of the runtime
bench-runtime:
    trident bench runtime --json bench/results/runtime.json

# Reliability scenarios: overload, fuzz, chaos, only node lost
bench-chaos:
    trident bench chaos --json bench/results/chaos.json
