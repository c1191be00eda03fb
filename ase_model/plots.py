"""PNG plots of a run: loss curves, the mean shared-expert gate per layer and task over epochs (the paper's
Figure 4 analysis), and the expert-by-task usage heatmap of the last evaluation."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def usage_image(load: np.ndarray, num_shared: int) -> tuple[np.ma.MaskedArray, float]:
    """The expert-by-task usage (tasks, N) as drawn: the shared experts (the last num_shared columns, which serve
    every token: 1.0) masked out so that the colour scale, 0 to its returned top, spans the sparse experts' shares
    (rows sum to k over the sparse experts)."""
    image = np.ma.masked_array(load, mask=np.zeros_like(load, dtype=bool))
    if num_shared:
        image.mask[:, load.shape[1] - num_shared:] = True
    sparse = load[:, :load.shape[1] - num_shared]
    top = float(sparse.max()) if sparse.size else 1.0
    return image, top if top > 0 else 1.0


def save_plots(history: list[dict], output: str, tasks, num_shared: int = 0) -> list[str]:
    """Write the plots of history (the records of metrics.jsonl) to output; returns their paths. num_shared: S,
    the shared experts (the last S of each layer's N), marked in the usage plot."""
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
        n = load.shape[-1]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
        for ax, (title, data) in zip(axes[0], [("mean over layers", load.mean(0)), ("last layer", load[-1])],
                                     strict=True):
            image, top = usage_image(data, num_shared)
            im = ax.imshow(image, aspect="auto", cmap=cmap, vmin=0, vmax=top)
            ax.set_yticks(range(len(tasks)), list(tasks))
            ticks = list(range(0, n - num_shared, max(1, (n - num_shared) // 8))) + list(range(n - num_shared, n))
            ax.set_xticks(ticks, [str(e) if e < n - num_shared else f"S{e - (n - num_shared)}" for e in ticks],
                          fontsize=7)
            for e in range(n - num_shared, n):
                ax.text(e, (len(tasks) - 1) / 2, "shared (1.0)", rotation=90, ha="center", va="center",
                        fontsize=7)
            if num_shared:
                ax.axvline(n - num_shared - 0.5, color="k", lw=1.5)
            ax.set_xlabel("expert (S: shared, grey)" if num_shared else "expert")
            ax.set_title(f"share of each task's tokens per sparse expert ({title})", fontsize=9)
            fig.colorbar(im, ax=ax, label=f"share of tokens (scale 0 to {top:.2f})")
        paths.append(_save(fig, output, "expert_usage.png"))
    return paths


def _save(fig, output: str, name: str) -> str:
    path = os.path.join(output, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
