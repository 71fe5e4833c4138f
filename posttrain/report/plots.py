"""Report figures as PNG bytes. matplotlib is imported inside the functions and drawn on an Agg canvas
directly (no pyplot), so building a report never touches the user's interactive backend."""

from __future__ import annotations

import io

DPI = 100
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")

# (label, xs, ys) for one curve
Curve = tuple[str, list, list]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same data, same bytes
    return buf.getvalue()


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def training_curves(title: str, panels: list[tuple[str, list[Curve]]], marks: list[float] = ()) -> bytes:
    """One panel per metric group against the step; `marks` are steps with a warning (dashed red lines)."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _figure(4.0 * cols, 2.8 * rows)
    fig.suptitle(title)
    for i, (name, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (label, xs, ys) in enumerate(curves):
            # eval keys are logged at a few steps only: markers make single points visible
            ax.plot(xs, ys, color=color(j), label=label, marker="o" if len(xs) < 12 else None, markersize=3)
        for step in marks:
            ax.axvline(step, color="#d62728", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    return _png(fig)


def _sqrt_x(ax, xs: list[float]) -> str:
    """Gao et al. 2022 plot against d = √KL, where gold reward is a parabola; the ticks stay in KL units."""
    if xs and min(xs) >= 0:
        import numpy as np

        ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
        return "KL to reference (√ scale)"
    return "KL to reference"


def frontier(trajectories: list[Curve], finals: list[tuple[str, float, float]]) -> bytes:
    """Reward against KL: each online stage's (kl, reward) over its steps, and every stage's final point."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    names = [c[0] for c in trajectories] + [f[0] for f in finals]
    index = {name: i for i, name in enumerate(dict.fromkeys(names))}
    for label, kls, rewards in trajectories:
        ax.plot(kls, rewards, color=color(index[label]), marker=".", alpha=0.7, label=f"{label} (steps)")
        ax.annotate("start", (kls[0], rewards[0]), fontsize=7, color=color(index[label]))
    for label, kl, reward in finals:
        ax.scatter([kl], [reward], marker="*", s=160, color=color(index[label]), edgecolor="black",
                   zorder=3, label=f"{label} (final)")
    ax.set_xlabel("KL to reference")
    ax.set_ylabel("reward")
    ax.set_title("Reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def overoptimization(methods: dict[str, tuple[list, list, list]], peaks: dict[str, tuple[float, float]]) -> bytes:
    """Proxy (dashed) and gold (solid) reward against KL per method, a vertical line where gold peaks."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    all_kl = []
    for i, (method, (kls, proxy, gold)) in enumerate(methods.items()):
        ax.plot(kls, proxy, color=color(i), linestyle="--", marker=".", label=f"{method} proxy")
        ax.plot(kls, gold, color=color(i), linestyle="-", marker="o", markersize=4, label=f"{method} gold")
        if method in peaks:
            kl, value = peaks[method]
            ax.axvline(kl, color=color(i), linestyle=":", linewidth=1)
            ax.annotate(f"gold peak\nKL={kl:.3g}", (kl, value), textcoords="offset points", xytext=(5, 5),
                        fontsize=7, color=color(i))
        all_kl += kls
    ax.set_xlabel(_sqrt_x(ax, all_kl))
    ax.set_ylabel("reward")
    ax.set_title("Reward over-optimization: proxy vs gold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
