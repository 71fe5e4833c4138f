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

    fig = Figure(figsize=(width, height), dpi=DPI)  # fixed margins: a layout engine doubles the drawing time
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
    width, height = 4.0 * cols, 0.4 + 2.8 * rows
    fig = _figure(width, height)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.55 / height,
                        wspace=0.3, hspace=0.55)
    fig.suptitle(title)
    # one step range for every panel: eval metrics logged at the last step alone then sit where they belong
    steps = [x for _, curves in panels for _, xs, _ in curves for x in xs]
    pad = max(0.5, 0.02 * (max(steps) - min(steps)))
    for i, (name, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (label, xs, ys) in enumerate(curves):
            # eval keys are logged at a few steps only: markers make single points visible
            ax.plot(xs, ys, color=color(j), label=label, marker="o" if len(xs) < 12 else None, markersize=3)
        for step in marks:
            ax.axvline(step, color="#d62728", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_xlim(min(steps) - pad, max(steps) + pad)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)  # names the key even when a panel holds one curve (eval/accuracy vs accuracy)
    return _png(fig)


def _sqrt_x(ax, xs: list[float]) -> str:
    """Gao et al. 2022 plot against d = √KL, where gold reward is a parabola; the ticks stay in KL units."""
    if not xs or min(xs) < 0:  # the k1 estimator can go negative: no √ axis then
        return "KL to reference"
    import numpy as np
    from matplotlib.ticker import FixedLocator

    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
    # round KL values about evenly spaced in √KL (the default ticks bunch up near 0)
    root, ticks = max(xs) ** 0.5, [0.0]
    for value in sorted(m * 10.0**e for e in range(-3, 7) for m in (1, 2, 5)):
        if value <= max(xs) and value**0.5 - ticks[-1] ** 0.5 >= root / 8:
            ticks.append(value)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter("{x:.3g}")
    return "KL to reference (√ scale)"


def frontier(trajectories: list[Curve], finals: list[tuple[str, float, float]]) -> bytes:
    """Reward against KL: each online stage's (kl, reward) over its steps (hollow circle: the first step), and
    every stage's final point (star)."""
    fig = _figure(7.0, 4.5)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    ax = fig.add_subplot(1, 1, 1)
    names = [c[0] for c in trajectories] + [f[0] for f in finals]
    index = {name: i for i, name in enumerate(dict.fromkeys(names))}
    for label, kls, rewards in trajectories:
        ax.plot(kls, rewards, color=color(index[label]), marker=".", alpha=0.7, label=f"{label} (steps)")
        ax.scatter([kls[0]], [rewards[0]], marker="o", s=40, facecolor="white", edgecolor=color(index[label]), zorder=3)
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
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    ax = fig.add_subplot(1, 1, 1)
    all_kl = []
    for i, (method, (kls, proxy, gold)) in enumerate(methods.items()):
        ax.plot(kls, proxy, color=color(i), linestyle="--", marker=".", label=f"{method} proxy")
        ax.plot(kls, gold, color=color(i), linestyle="-", marker="o", markersize=4, label=f"{method} gold")
        if method in peaks:
            kl, value = peaks[method]
            ax.axvline(kl, color=color(i), linestyle=":", linewidth=1.2, label=f"{method} gold peak: KL={kl:.3g}")
            ax.scatter([kl], [value], marker="*", s=140, color=color(i), edgecolor="black", zorder=3)
        all_kl += kls
    ax.set_xlabel(_sqrt_x(ax, all_kl))
    ax.set_ylabel("reward")
    ax.set_title("Reward over-optimization: proxy vs gold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def at_a_glance(stages: list[tuple[str, float | None, tuple | None, float | None, float | None, float | None]]) -> bytes:
    """Four panels over (name, accuracy, (lo, hi) or None, minutes, kl, memory GB) per stage: held-out accuracy
    with its 95 % interval, accuracy against wall time and against KL, and peak memory. A stage lacking a value
    is left out of that panel."""
    fig = _figure(11.0, 7.0)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.09, top=0.93, wspace=0.25, hspace=0.45)
    names = [s[0] for s in stages]
    acc = [(i, s) for i, s in enumerate(stages) if s[1] is not None]
    ax = fig.add_subplot(2, 2, 1)
    for i, (name, a, ci, *_rest) in acc:
        err = [[100 * (a - ci[0])], [100 * (ci[1] - a)]] if ci else None
        ax.bar([i], [100 * a], color=color(i), yerr=err, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Held-out accuracy, 95 % interval", fontsize=10)
    for slot, (column, label, title) in enumerate(((3, "wall time (min)", "Accuracy vs wall time"),
                                                   (4, "KL to start model (nats)", "Accuracy vs KL")), start=2):
        ax = fig.add_subplot(2, 2, slot)
        for i, s in acc:
            if s[column] is not None:
                ax.scatter([s[column]], [100 * s[1]], color=color(i), s=50, label=s[0], zorder=3)
                if s[2]:
                    ax.errorbar([s[column]], [100 * s[1]], yerr=[[100 * (s[1] - s[2][0])], [100 * (s[2][1] - s[1])]],
                                color=color(i), capsize=3)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 4)
    for i, s in enumerate(stages):
        if s[5] is not None:
            ax.bar([i], [s[5]], color=color(i))
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set_ylabel("peak memory (GB)")
    ax.set_title("Peak memory per stage", fontsize=10)
    return _png(fig)
