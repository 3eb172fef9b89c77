"""The layering rule, checked on the source (every import, function-local ones too):
policy (trident/sched) touches no sockets, clocks or models; mechanism
(trident/runtime) never imports the client or the benchmarks; models
(trident/pipelines) know nothing of the scheduler; benchmark drivers are imported only
by the CLI. See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2] / "trident"

# package (or module) -> module prefixes it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sched": (
        "trident.runtime",
        "trident.pipelines",
        "trident.sim",
        "trident.bench",
        "trident.client",
        "trident.gateway",
        "torch",
        "diffusers",
        "zmq",
        "asyncio",
        "socket",
        "threading",
        "time",  # no wall clock: budgets are deterministic (trident/sched/solver.py)
        "datetime",
        "uvloop",
    ),
    "runtime": ("trident.client", "trident.bench", "trident.sim", "trident.gateway"),
    "pipelines": (
        "trident.runtime",
        "trident.sched",
        "trident.sim",
        "trident.bench",
        "trident.client",
        "trident.gateway",
    ),
    "sim": (
        "trident.runtime",
        "trident.pipelines",
        "trident.bench",
        "trident.client",
        "trident.gateway",
        "torch",
        "zmq",
    ),
    "families.py": ("trident.", "torch", "diffusers"),
}
ALLOWED_IN_FAMILIES = ("trident.errors",)
# Only these may import the benchmark drivers and the local-cluster launcher.
BENCH_USERS = ("bench", "cli.py", "demo.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _files(part: str) -> list[Path]:
    target = ROOT / part
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def _hits(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p.rstrip(".") or module.startswith(p.rstrip(".") + ".") for p in prefixes)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(part: str) -> None:
    files = _files(part)
    assert files, f"no sources under trident/{part}"
    bad = [
        f"{f.relative_to(ROOT.parent)}:{line}: {mod}"
        for f in files
        for line, mod in _imports(f)
        if _hits(mod, FORBIDDEN[part])
        and not (part == "families.py" and _hits(mod, ALLOWED_IN_FAMILIES))
    ]
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_benchmark_drivers() -> None:
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in BENCH_USERS:
            continue
        bad += [
            f"{rel}:{line}: {mod}" for line, mod in _imports(f) if _hits(mod, ("trident.bench",))
        ]
    assert not bad, "trident.bench imported by library code:\n" + "\n".join(bad)


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import time\n    from trident.client import Client\n")
    mods = [m for _, m in _imports(src)]
    assert "time" in mods and "trident.client" in mods
