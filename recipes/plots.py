"""The recipes' plots (matplotlib, Agg): the cloud model's accuracy per round (``accuracy.png``) and the per-device
accuracy distribution per evaluated round (``local_accuracy.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_device_accuracy", "plot_history"]


def plot_history(records: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy (and validation accuracy, where recorded) of the cloud model against global round and
    simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("test_acc", "test"), ("val_acc", "validation")):
        rec = [r for r in records if key in r]
        if not rec:
            continue
        acc = [100 * r[key] for r in rec]
        axes[0].plot([r["round"] for r in rec], acc, marker=".", label=label)
        axes[1].plot([r.get("sim_time", 0.0) for r in rec], acc, marker=".", label=label)
    axes[0].set_xlabel("global round")
    axes[1].set_xlabel("simulated time [s]")
    for ax in axes:
        ax.set_ylabel("cloud model accuracy [%]")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_device_accuracy(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Box plot of the per-device accuracies of every evaluated round (cloud model, and personalised models when
    recorded), saved to ``path``. Returns False (and writes nothing) when no round has per-device results."""
    rec = [r for r in records if r.get("local_cloud_acc")]
    if not rec:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    personal = any(r.get("local_personal_acc") for r in rec)
    rounds = [r["round"] for r in rec]
    step = min((b - a for a, b in zip(rounds, rounds[1:])), default=1) or 1
    width = 0.35 * step if personal else 0.6 * step
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rec) + 3), 4))
    series = [("local_cloud_acc", "cloud model", "tab:blue", -0.5 if personal else 0.0)]
    if personal:
        series.append(("local_personal_acc", "personalised", "tab:orange", 0.5))
    handles, labels = [], []
    for key, label, color, shift in series:
        data = [[100 * v for v in r[key]] for r in rec if r.get(key)]
        pos = [r["round"] + shift * width for r in rec if r.get(key)]
        bp = ax.boxplot(data, positions=pos, widths=width, patch_artist=True, manage_ticks=False,
                        flierprops={"markersize": 3})
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.5)
        (mean_line,) = ax.plot(pos, [sum(d) / len(d) for d in data], color=color, marker=".", lw=1)
        handles += [bp["boxes"][0], mean_line]
        labels += [label, f"{label}: mean over devices"]
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_xlabel("global round")
    ax.set_ylabel("device accuracy on its held-out data [%]")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
