"""ase_model/losses.py against small independent implementations of the reference's formulas
(Multi-Task-Learning-PyTorch losses/loss_functions.py): batch-level averaging over valid pixels, the saliency
weight per batch, normals L1 per valid element; an all-ignore image, a non-square image, and two gloo processes
that give exactly the one-process loss and gradient."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ase_model.data import IGNORE
from ase_model.datasets import get
from ase_model.losses import balanced_bce, cross_entropy, multi_task_loss, normals_l1

PASCAL = get("pascal_context").tasks

# --- the reference's formulas, written out in numpy -------------------------------------------------------------

def ref_cross_entropy(logits, target):
    """NLLLoss(ignore_index=255) of the log-softmax: mean over every valid pixel of the batch."""
    logits, target = logits.double().numpy(), target.numpy()
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    total, count = 0.0, 0
    for b, y, x in zip(*np.nonzero(target != IGNORE), strict=True):
        total -= logp[b, target[b, y, x], y, x]
        count += 1
    return total / count


def ref_balanced_bce(logits, target, pos_weight=None):
    """BalancedCrossEntropyLoss: w = the batch's negative fraction (or pos_weight), w * positive sum +
    (1 - w) * negative sum, over the valid pixels, divided by their number."""
    x, t = logits.double().numpy()[:, 0], target.numpy()
    valid = t != IGNORE
    x, y = x[valid], t[valid]
    w = (y == 0).sum() / y.size if pos_weight is None else pos_weight
    pos = np.sum(np.log1p(np.exp(-x))[y == 1])
    neg = np.sum(np.log1p(np.exp(x))[y == 0])
    return (w * pos + (1 - w) * neg) / y.size


def ref_normals_l1(pred, target):
    """NormalsLoss(normalize=True): L1 over masked_select(label != 255), divided by the number of valid elements."""
    p = pred.double().numpy()
    p = p / (np.sqrt((p**2).sum(1, keepdims=True)) + 1e-12)
    t = target.double().numpy()
    mask = t != IGNORE
    return np.abs(p[mask] - t[mask]).sum() / mask.sum()


# --- hand-made cases ----------------------------------------------------------------------------------------------

def test_cross_entropy_averages_over_the_batch_valid_pixels():
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 1, 0, 0] = math.log(2.0)  # image 0, pixel 0: p(class 1) = 2 / 4
    target = torch.tensor([[[1, IGNORE]], [[0, 2]]])
    # three valid pixels in the batch: -log(1/2), then two of a uniform 3-way softmax, -log(1/3)
    want = (math.log(2.0) + 2 * math.log(3.0)) / 3
    assert math.isclose(cross_entropy(logits, target).item(), want, rel_tol=1e-6)


def test_an_all_ignore_image_changes_nothing():
    """Parts on an image without a person: the reference's mean over valid pixels does not count it."""
    logits, target = torch.randn(1, 7, 5, 3), torch.randint(0, 7, (1, 5, 3))
    alone = cross_entropy(logits, target)
    with_empty = cross_entropy(torch.cat([logits, torch.randn(1, 7, 5, 3)]),
                               torch.cat([target, torch.full((1, 5, 3), IGNORE)]))
    assert math.isclose(alone.item(), with_empty.item(), rel_tol=1e-6)
    assert cross_entropy(logits, torch.full_like(target, IGNORE)).item() == 0.0


def test_balanced_bce_weights_the_rarer_class_over_the_batch():
    logits = torch.zeros(1, 1, 1, 4)  # p = 1/2 everywhere: every pixel costs log 2 before weighting
    target = torch.tensor([[[1.0, 0.0, 0.0, IGNORE]]])
    # automatic weight: 2 of the 3 valid pixels are negative -> w = 2/3 on positives, 1/3 on negatives
    want = (2 / 3 * math.log(2) + 2 * (1 / 3) * math.log(2)) / 3
    assert math.isclose(balanced_bce(logits, target).item(), want, rel_tol=1e-6)
    want = (0.95 * math.log(2) + 2 * 0.05 * math.log(2)) / 3
    assert math.isclose(balanced_bce(logits, target, 0.95).item(), want, rel_tol=1e-6)
    # the weight is the batch's: an image of all negatives next to an image of all positives gives w = 1/2
    two = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    assert math.isclose(balanced_bce(torch.zeros(2, 1, 1, 2), two).item(), 0.5 * math.log(2), rel_tol=1e-6)


def test_empty_saliency_mask_in_the_batch():
    logits = torch.randn(2, 1, 3, 5)
    target = torch.zeros(2, 3, 5)
    target[1, 1:, 2:] = 1  # image 0 has no salient pixel
    assert math.isclose(balanced_bce(logits, target).item(), ref_balanced_bce(logits, target), rel_tol=1e-6)


def test_normals_l1_is_per_valid_element():
    target = torch.zeros(1, 3, 1, 2)
    target[0, 2] = 1.0
    target[0, :, 0, 1] = IGNORE
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, 2, 0, 0] = 5.0  # same direction, any length: no loss
    pred[0, 0, 0, 1] = 1.0  # wrong, but on an ignored pixel
    assert normals_l1(pred, target).item() == 0.0
    pred[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # orthogonal: (|1 - 0| + |0| + |0 - 1|) / 3 elements
    assert math.isclose(normals_l1(pred, target).item(), 2.0 / 3, rel_tol=1e-6)


@pytest.mark.parametrize("shape", [pytest.param((3, 5, 7), id="non-square"), pytest.param((2, 4, 4), id="square")])
def test_losses_match_the_reference_formulas(shape):
    b, h, w = shape
    seg = torch.randint(0, 21, (b, h, w))
    seg[0, 0] = IGNORE
    parts = torch.randint(0, 7, (b, h, w))
    parts[1] = IGNORE  # an image without a person
    logits = torch.randn(b, 21, h, w) * 2
    assert math.isclose(cross_entropy(logits, seg).item(), ref_cross_entropy(logits, seg), rel_tol=1e-5)
    assert math.isclose(cross_entropy(logits[:, :7], parts).item(), ref_cross_entropy(logits[:, :7], parts),
                        rel_tol=1e-5)
    edge = (torch.rand(b, h, w) < 0.2).float()
    edge[0, :, 0] = IGNORE
    x = torch.randn(b, 1, h, w) * 3
    assert math.isclose(balanced_bce(x, edge, 0.95).item(), ref_balanced_bce(x, edge, 0.95), rel_tol=1e-5)
    assert math.isclose(balanced_bce(x, edge).item(), ref_balanced_bce(x, edge), rel_tol=1e-5)
    normals = torch.nn.functional.normalize(torch.randn(b, 3, h, w), dim=1)
    normals[:, :, 0, :] = IGNORE
    pred = torch.randn(b, 3, h, w)
    assert math.isclose(normals_l1(pred, normals).item(), ref_normals_l1(pred, normals), rel_tol=1e-5)


def test_multi_task_loss_weights():
    preds = {"semseg": torch.zeros(1, 21, 2, 2), "edge": torch.zeros(1, 1, 2, 2)}
    batch = {"semseg": torch.zeros(1, 2, 2, dtype=torch.long), "edge": torch.zeros(1, 2, 2)}
    total, parts = multi_task_loss(preds, batch, PASCAL)
    assert isinstance(total, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in parts.values())
    assert math.isclose(total.item(), 1.0 * parts["semseg"].item() + 50.0 * parts["edge"].item(), rel_tol=1e-6)
    # DESIGN.md: CE 1.0, CE 2.0, balanced BCE 5.0, L1 on normalised normals 10.0, balanced BCE (pos weight 0.95) 50.0
    assert {t: task.weight for t, task in PASCAL.items()} == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0,
                                                              "normals": 10.0, "edge": 50.0}


# --- data parallelism -------------------------------------------------------------------------------------------

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, w = 4, 5, 6
    preds = {"semseg": torch.randn(b, 21, h, w, generator=g), "human_parts": torch.randn(b, 7, h, w, generator=g),
             "sal": torch.randn(b, 1, h, w, generator=g), "normals": torch.randn(b, 3, h, w, generator=g),
             "edge": torch.randn(b, 1, h, w, generator=g)}
    parts = torch.randint(0, 7, (b, h, w), generator=g)
    parts[0] = parts[3] = IGNORE  # rank 0's first and rank 1's second image (ranks take every 2nd image)
    sal = (torch.rand(b, h, w, generator=g) < 0.3).float()
    sal[1] = 0  # an empty saliency mask on rank 1
    normals = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    normals[2, :, :3] = IGNORE
    targets = {"semseg": torch.randint(0, 21, (b, h, w), generator=g), "human_parts": parts, "sal": sal,
               "normals": normals, "edge": (torch.rand(b, h, w, generator=g) < 0.1).float()}
    return preds, targets


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, targets = _batch()
    mine = {t: p[rank::world].clone().requires_grad_() for t, p in preds.items()}
    total, parts = multi_task_loss(mine, {t: v[rank::world] for t, v in targets.items()}, PASCAL)
    total.backward()
    # DDP averages the ranks' parameter gradients: each rank's share of the gradient is its own divided by world
    grads = {t: p.grad / world for t, p in mine.items()}
    losses = torch.stack([total.detach()] + [parts[t].detach() for t in sorted(parts)])
    dist.all_reduce(losses)
    torch.save({"losses": losses / world, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_global_batch_loss_and_gradient(tmp_path):
    preds, targets = _batch()
    whole = {t: p.clone().requires_grad_() for t, p in preds.items()}
    total, parts = multi_task_loss(whole, targets, PASCAL)
    total.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2)
    want = torch.stack([total.detach()] + [parts[t].detach() for t in sorted(parts)])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["losses"], want, rtol=1e-5, atol=1e-6)
        for t, p in whole.items():
            torch.testing.assert_close(got["grads"][t], p.grad[rank::2], rtol=1e-5, atol=1e-8, msg=t)
