"""Evaluation over the validation split: metrics per task, delta_m against the single-task reference, routing
statistics, and their tables."""

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .metrics import delta_m, load_reference, make_meters
from .options import REFERENCE


@torch.no_grad()
def evaluate(model, val_set, *, device: torch.device, batch_size: int, workers: int, amp: bool,
             reference: str = REFERENCE, show: bool = True) -> dict:
    """Metrics over `val_set`, reduced over the ranks of the default process group (if any); routing statistics
    of the ASE forwards. `batch_size` is this rank's."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    was_training = model.training
    model.eval()
    meters = make_meters(model.tasks, device)
    sampler = DistributedSampler(val_set, world, rank, shuffle=False, drop_last=False)
    loader = DataLoader(val_set, batch_size=max(1, batch_size), sampler=sampler, num_workers=workers)
    seen = torch.zeros(len(val_set), dtype=torch.bool)
    gates, loads, batches = None, None, 0
    for batch in tqdm(loader, disable=not show, desc="eval", leave=False):
        index = batch["index"]
        fresh = ~seen[index]  # DistributedSampler pads with repeats: count every image once
        seen[index] = True
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(batch["image"].to(device))
        keep = fresh.to(device)
        for t in model.tasks:
            meters[t].update(preds[t].float()[keep], batch[t].to(device)[keep])
        stats = model.routing_stats()
        if stats is not None:
            gates = stats["shared_gate"] if gates is None else gates + stats["shared_gate"]
            loads = stats["load"] if loads is None else loads + stats["load"]
        batches += 1
    results = {}
    for t, meter in meters.items():
        meter.reduce()
        results[t] = meter.compute()
    value, used = delta_m(results, load_reference(reference))
    results["delta_m"] = {"value": value, "tasks": used}
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
            if isinstance(v, (int, float)):
                out[f"val/{task}/{name}"] = v
    return out


def metrics_table(results: dict, reference: str = REFERENCE) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        if task in ("routing",):
            continue
        for name, v in metrics.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {task} | {name} | {v:.3f} |")
    used = results.get("delta_m", {}).get("tasks")
    if used is not None:
        lines.append(f"\ndelta_m over {', '.join(used) or 'no task'} (reference: {reference})")
    return "\n".join(lines)
