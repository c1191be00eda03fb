"""Evaluation over the validation split: metrics per task at each image's original resolution, delta_m against
the single-task reference, routing statistics, and their tables.

As the reference (Multi-Task-Learning-PyTorch evaluation/evaluate_utils.py save_model_predictions, lines 212-222,
with the interpolation flags INFER_FLAGVALS of utils/config.py and utils/utils.py get_output): the network sees the
image resized to img_size; each prediction is decoded and resized back to the image's original size, as its
dataset's task says (ase_model/datasets): nearest for label maps (the arg-max), bilinear for probabilities (the
sigmoid: saliency, edges), unit vectors (normals) and values (depth); the dataset's meters score it against the
full-resolution labels (see metrics.py for each metric's rule).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .data import collate
from .errors import UserError
from .metrics import delta_m, load_reference

DECODINGS = ("labels", "probability", "unit", "value")


def decode(kind: str, logits: torch.Tensor, size) -> torch.Tensor:
    """One image's network output (C, h, w) -> its prediction at the original size (H, W), by the task's decoding
    (datasets.Task.decode): "labels" (H, W) int64, the arg-max resized nearest; "probability" (H, W), the sigmoid
    of channel 0 resized bilinearly; "unit" (C, H, W), unit vectors resized bilinearly; "value" (H, W), channel 0
    as is, resized bilinearly."""
    size = tuple(int(v) for v in size)
    logits = logits.float()
    if kind == "labels":
        labels = logits.argmax(0)[None, None].float()
        return F.interpolate(labels, size=size, mode="nearest")[0, 0].long()
    if kind == "probability":
        prob = torch.sigmoid(logits[:1])[None]
        return F.interpolate(prob, size=size, mode="bilinear", align_corners=False)[0, 0]
    if kind == "unit":
        unit = F.normalize(logits, dim=0)[None]
        return F.interpolate(unit, size=size, mode="bilinear", align_corners=False)[0]
    if kind == "value":
        return F.interpolate(logits[None, :1], size=size, mode="bilinear", align_corners=False)[0, 0]
    raise ValueError(f"unknown decoding {kind!r}; expected one of {DECODINGS}")


@torch.no_grad()
def evaluate(model, val_set, dataset, *, device: torch.device, batch_size: int, workers: int, amp: bool,
             reference: str | None = None, show: bool = True, edge_ods: bool = True, eval_workers: int = 0,
             edge_thresholds: int = 99, edge_matcher: str = "fast", edge_ids: str | None = None) -> dict:
    """Metrics over `val_set`, a split of `dataset` (a datasets.Dataset: its tasks' decodings and meters),
    reduced over the ranks of the default process group (if any); routing statistics of the ASE forwards.
    `batch_size` is this rank's. reference: the single-task numbers of delta_m (None: no delta_m). edge_ods:
    compute the edge odsF (the edge BCE otherwise, and also with the pyedgeeval matcher where pyEdgeEval is not
    installed); eval_workers: processes for its boundary matching; edge_thresholds: its number of thresholds (99 as
    SEISM); edge_matcher: "fast" or "pyedgeeval" (metrics.EdgeMeter); edge_ids: a file of image ids, one a line,
    whose images alone score the boundary task (SEISM's test_new list, as MTL-PyTorch's seism evaluation,
    evaluation/seism/pr_curves_base.m); None: all of the split (as ASTMT). With a list, that task's results say
    how many images were scored ("images")."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    was_training = model.training
    model.eval()
    meters = dataset.make_meters(model.tasks, device, edge_ods=edge_ods, edge_thresholds=edge_thresholds,
                                 eval_workers=eval_workers, edge_matcher=edge_matcher)
    sampler = DistributedSampler(val_set, world, rank, shuffle=False, drop_last=False)
    loader = DataLoader(val_set, batch_size=max(1, batch_size), sampler=sampler, num_workers=workers,
                        collate_fn=collate)
    # the boundary-matched task (the edges) and, per image of val_set, whether it scores it (None: all do)
    boundary = next((t for t in model.tasks if dataset.tasks[t].boundary), None)
    edge_scored = None
    if edge_ids is not None and boundary is not None:
        with open(edge_ids) as f:
            listed = {line.strip() for line in f if line.strip()}
        edge_scored = [i in listed for i in val_set.ids]
        if not any(edge_scored):
            raise UserError(f"--edge-ids {edge_ids}: none of its ids is an image of the {val_set.split} split")
    done = 0  # samples of this rank so far
    gates, loads, batches = None, None, 0
    for batch in tqdm(loader, disable=not show, desc="eval", leave=False):
        # DistributedSampler (no shuffle) gives rank r the positions r, r + world, ... of the index list padded
        # with repeats of its first images up to a multiple of world; positions past the dataset are repeats,
        # possibly of images another rank scores: count every image once over all ranks
        count = len(batch["index"])
        position = rank + world * (done + torch.arange(count))
        fresh = position < len(val_set)
        done += count
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(batch["image"].to(device))
        for i in torch.nonzero(fresh).flatten().tolist():
            size = batch["size"][i].tolist()
            for t in model.tasks:
                if t == boundary and edge_scored is not None and not edge_scored[int(batch["index"][i])]:
                    continue
                target = batch[t][i].to(device)
                meters[t].update(decode(dataset.tasks[t].decode, preds[t][i], size)[None], target[None])
        stats = model.routing_stats()
        if stats is not None:
            gates = stats["shared_gate"] if gates is None else gates + stats["shared_gate"]
            loads = stats["load"] if loads is None else loads + stats["load"]
        batches += 1
    results = {}
    for t, meter in meters.items():
        meter.reduce()
        results[t] = meter.compute()
    if edge_scored is not None:
        results[boundary]["images"] = sum(edge_scored)
    value, used = delta_m(results, load_reference(reference)) if reference else (float("nan"), None)
    results["delta_m"] = {"value": value, "tasks": used, "synthetic": dataset.is_synthetic(val_set.root)}
    if gates is not None:
        results["routing"] = {"shared_gate": (gates / batches).tolist(), "load": (loads / batches).tolist()}
    model.train(was_training)
    return results


def flatten(results: dict) -> dict:
    """{task: {metric: v}} -> {"val/task/metric": v} for the numeric entries (routing stats are kept nested)."""
    out = {}
    for task, metrics in results.items():
        if task == "routing":
            out["routing"] = metrics
            continue
        for name, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"val/{task}/{name}"] = v
    return out


def metrics_table(results: dict, reference: str | None) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        if task == "routing" or (task == "delta_m" and metrics.get("tasks") is None):  # no reference: said below
            continue
        for name, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                label = f"{name} (synthetic data)" if task == "delta_m" and metrics.get("synthetic") else name
                lines.append(f"| {task} | {label} | {v:.3f} |")
    dm = results.get("delta_m", {})
    used = dm.get("tasks")
    if used is None:
        lines.append("\nno delta_m: this dataset ships no single-task reference numbers; pass --reference FILE "
                     "(single-task runs' metrics, in the layout of ase_model/reference_metrics.yaml)")
    else:
        lines.append(f"\ndelta_m over {', '.join(used) or 'no task'} (reference: {reference})")
        if dm.get("synthetic"):
            lines.append("delta_m here is measured on SYNTHETIC data against reference numbers measured on the real "
                         "data, so this value says nothing about the method.")
    return "\n".join(lines)
