"""Plots of the tiny comparison: accuracy curves per arm, and one rollout's per-position divergence with the
candidates, the detectors' decisions and the oracle's labels marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(runs: dict[str, list[dict[str, Any]]], k: int, path: Path) -> Path:
    """avg@k against training step, one line per arm (seed mean), error bars = standard error over problems."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, rs in runs.items():
        steps = [p[0] for p in rs[0]["curve"]]
        mean = [sum(r["curve"][i][1] for r in rs) / len(rs) for i in range(len(steps))]
        err = [sum(r["curve"][i][2] for r in rs) / len(rs) for i in range(len(steps))]
        ax.errorbar(steps, mean, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"avg@{k} (held-out)")
    ax.set_title("Distilling the tiny student: OPD vs TOPD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(rec: dict[str, Any], path: Path) -> Path:
    """d_t per response position of one rollout (top strip), candidate/detector/oracle marks below."""
    import numpy as np

    plt = pyplot()
    d = np.array(rec["divergence"])
    n = len(d)
    rows = ["d_t (reverse KL)", "candidate", *[f"divergent: {k}" for k in rec["divergent"]], "oracle"]
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(max(8, 0.45 * n), 1.0 + 0.6 * len(rows)),
        sharex=True,
        gridspec_kw={"height_ratios": [2] + [1] * (len(rows) - 1)},
    )
    axes[0].imshow(d[None, :], aspect="auto", cmap="magma")
    for j, v in enumerate(d):
        axes[0].text(j, 0, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < d.max() / 2 else "k")
    marks = [rec["candidate"], *rec["divergent"].values()]
    for ax, m in zip(axes[1:-1], marks, strict=True):
        ax.imshow(np.array(m, dtype=float)[None, :], aspect="auto", cmap="Greys", vmin=0, vmax=1)
    lab = np.array([np.nan if v is None else v for v in rec["labels"]], dtype=float)
    axes[-1].imshow(lab[None, :], aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
    for j, v in enumerate(rec["labels"]):
        if v is not None:
            axes[-1].text(j, 0, "fork" if v == 1 else "surf" if v == 0 else "?", ha="center", va="center", fontsize=6)
    for ax, name in zip(axes, rows, strict=True):
        ax.set_yticks([0])
        ax.set_yticklabels([name], fontsize=8)
    axes[-1].set_xticks(range(n))
    axes[-1].set_xticklabels(rec["tokens"], rotation=60, fontsize=8)
    axes[0].set_title("one student rollout: per-position divergence, detected points and oracle labels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
