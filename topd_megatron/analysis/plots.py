"""Plots of the tiny comparison: accuracy curves per arm, and one rollout's per-position divergence with the
candidates, the detectors' decisions and the oracle's labels marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _half(x: dict[str, Any], side: str) -> float:
    """Length of one side of a CI bar (0 where the bound is undefined: fewer than two seeds)."""
    bound = x.get(side)
    if bound is None or math.isnan(bound):
        return 0.0
    return abs(bound - x["mean"])


def plot_final_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Final accuracy per arm (mean over seeds, 95% CI bars), avg@k at T=1 and greedy side by side, with the student
    before distillation, the halfway mark, the teacher and the capacity ceiling as horizontal lines."""
    plt = pyplot()
    rows, refs = results["table"], results["references"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, metric, title in (
        (axes[0], "avg", f"avg@{results['config']['eval_k']}, T=1"),
        (axes[1], "greedy", "greedy"),
    ):
        means = [r[metric]["mean"] for r in rows]
        low = [_half(r[metric], "low") for r in rows]
        high = [_half(r[metric], "high") for r in rows]
        ax.bar(range(len(rows)), means, yerr=[low, high], capsize=3, color="#4c72b0")
        lines = [("student_start", "start", "k"), ("teacher", "teacher", "g")]
        if "ceiling" in refs:
            lines.append(("ceiling", "capacity ceiling", "m"))
        for key, label, color in lines:
            ax.axhline(refs[key][metric], color=color, ls="--", lw=1, label=label)
        ax.axhline(results["halfway_to_teacher"][metric], color="grey", ls=":", lw=1, label="halfway")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["arm"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("held-out accuracy after training")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Distilling the tiny student: mean over {results['config']['seeds']} seeds, 95% CI")
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
    colour = {1: 1.0, 0: 0.0, 2: 0.5}  # fork red, surface blue, agreement neutral; unlabelled and non-candidates blank
    lab = np.array([np.nan if v is None or v not in colour else colour[v] for v in rec["labels"]], dtype=float)
    axes[-1].imshow(lab[None, :], aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
    names = {1: "fork", 0: "surf", 2: "agree", -1: "?"}
    for j, v in enumerate(rec["labels"]):
        if v is not None:
            axes[-1].text(j, 0, names.get(v, "?"), ha="center", va="center", fontsize=6)
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
