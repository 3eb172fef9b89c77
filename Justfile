# Trident tasks. `pip install -e '.[dev]'` provides `just` (rust-just).

# Lint, types, then the full test suite (unit, pipelines, integration, fault; slow ones
# included), in two worker processes, whole files each (module fixtures built once):
# most tests wait on daemons and sockets, so two share two cores well.
test: lint
    python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# Fast tests only (no real daemons)
test-unit:
    python -m pytest -q tests/unit

# Everything but the slow fault tests (fuzz, overload, chaos)
test-fast:
    python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow"

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
