"""PNG plots of a run: loss curves, the mean shared-expert gate per layer and task over epochs (the paper's
Figure 4 analysis), and the expert-by-task usage heatmap of the last evaluation."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_plots(history: list[dict], output: str, tasks) -> list[str]:
    """Write the plots of history (the records of metrics.jsonl) to output; returns their paths."""
    paths = []
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ["train/loss"] + [f"train/{t}" for t in tasks]:
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", label=key.removeprefix("train/"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training losses (total weighted, tasks unweighted)")
    paths.append(_save(fig, output, "losses.png"))

    routed = [(r["epoch"], np.asarray(r["routing"]["shared_gate"])) for r in history if "routing" in r]
    if routed:
        layers, n_tasks = routed[-1][1].shape
        fig, axes = plt.subplots(1, n_tasks, figsize=(3.2 * n_tasks, 3), sharey=True, squeeze=False)
        for t in range(n_tasks):
            ax = axes[0, t]
            for layer in range(layers):
                ax.plot([e for e, _ in routed], [g[layer, t] for _, g in routed], label=f"layer {layer}")
            ax.set_title(list(tasks)[t])
            ax.set_xlabel("epoch")
        axes[0, 0].set_ylabel("mean shared-expert gate")
        axes[0, -1].legend(fontsize=6)
        paths.append(_save(fig, output, "shared_gates.png"))

        load = np.asarray([r for r in history if "routing" in r][-1]["routing"]["load"])  # (layers, tasks, N)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3), squeeze=False)
        for ax, (title, data) in zip(axes[0], [("mean over layers", load.mean(0)), ("last layer", load[-1])],
                                     strict=True):
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks(range(len(tasks)), list(tasks))
            ax.set_xlabel("expert")
            ax.set_title(f"share of tokens per expert ({title})")
            fig.colorbar(im, ax=ax)
        paths.append(_save(fig, output, "expert_usage.png"))
    return paths


def _save(fig, output: str, name: str) -> str:
    path = os.path.join(output, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
