"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_policies", "plot_sweep"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _val(x: Any) -> float:
    return math.nan if x is None else float(x)


def plot_policies(
    policies: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = ""
) -> None:
    """Bars per policy: SLO attainment, mean and P95 latency."""
    plt = _plt()
    names = list(policies)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    metrics = (
        ("slo_attainment", "SLO attainment", (0.0, 1.05)),
        ("mean_latency_s", "mean latency (s)", None),
        ("p95_latency_s", "P95 latency (s)", None),
    )
    for ax, (key, label, ylim) in zip(axes, metrics, strict=True):
        vals = [_val(policies[n].get(key)) for n in names]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        for b, v in zip(bars, vals, strict=True):
            if math.isfinite(v):
                ax.annotate(
                    f"{v:.2f}" if v < 10 else f"{v:.0f}",
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_title(label)
        if ylim:
            ax.set_ylim(*ylim)
        ax.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(
    param: str,
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "",
) -> None:
    """Lines per policy against the swept parameter: SLO attainment, mean, P95 latency.

    ``points``: ``[{"value": x, "policies": {name: summary-dict}}, ...]``; a point's
    ``"bound"`` (``{"slo_attainment": b}``, the LP upper bound) is drawn dashed on the
    SLO panel.
    """
    plt = _plt()
    xs = [float(p["value"]) for p in points]
    names: list[str] = []
    for p in points:
        for n in p["policies"]:
            if n not in names:
                names.append(n)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = (
        ("slo_attainment", "SLO attainment"),
        ("mean_latency_s", "mean latency (s)"),
        ("p95_latency_s", "P95 latency (s)"),
    )
    label = {"rate": "arrival rate (req/s)", "slo_scale": "SLO scale"}.get(param, param)
    for ax, (key, ylabel) in zip(axes, metrics, strict=True):
        for i, n in enumerate(names):
            ys = [_val(p["policies"].get(n, {}).get(key)) for p in points]
            ax.plot(xs, ys, marker="o", label=n, color=f"C{i}")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "slo_attainment":
            bound = [_val(p.get("bound", {}).get("slo_attainment")) for p in points]
            if any(math.isfinite(b) for b in bound):
                ax.plot(xs, bound, linestyle="--", color="black", label="upper bound (LP)")
            ax.set_ylim(-0.02, 1.02)
        elif any(
            math.isfinite(_val(p["policies"].get(n, {}).get(key))) for p in points for n in names
        ):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
