"""Edge odsF matching time per image, the fast matcher beside pyEdgeEval's, on the same images in one run.

    python -m bench.edge_speed [--size 375 500] [--thresholds 99] [--no-pyedgeeval] [--images 5105 --workers 16]

Two predictions of one synthetic label map at PASCAL's size: "smooth" (the ground-truth edges shifted by a pixel,
a quarter of them left out, blurred, with faint noise: what a trained network gives) and "busy" (the same with
strong noise: an untrained network's maze of edges after thinning). Each is matched at every threshold by
``edge_match.match_counts`` and by pyEdgeEval's ``evaluate_boundaries_threshold``, with the wall and CPU time
(CPU time is what one core would take on an idle machine), the counts' largest difference and the image's F
(best over thresholds) both ways. The last line estimates a whole val set spread over worker processes from the
slower prediction's CPU time (an estimate, not a measurement).
"""

import argparse
import time

import numpy as np
import scipy.ndimage

from ase_model.data import edges_from_context
from ase_model.edge_match import match_counts
from ase_model.metrics import edge_thresholds
from ase_model.synthetic import _draw


def predictions(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gt = edges_from_context(_draw(rng, h, w)[2]).astype(bool)
    shifted = np.roll(gt, 1, axis=0).astype(float)
    shifted[:, : w // 4] = 0  # a quarter of the edges missed, so recall is not 1
    shifted = scipy.ndimage.gaussian_filter(shifted, 1.5)
    out = {}
    for name, gain, noise in (("smooth", 3.0, 0.05), ("busy", 4.0, 0.4)):
        prob = np.clip(shifted * gain + rng.random((h, w)) * noise, 0, 1)
        out[name] = np.floor(prob * 255) / 255  # the 8-bit read-back of the meter
    return gt, out


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def f_best(counts: np.ndarray) -> float:
    recall, precision = counts[0] / np.maximum(counts[1], 1), counts[2] / np.maximum(counts[3], 1)
    return 100 * float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    p.add_argument("--thresholds", type=int, default=99)
    p.add_argument("--max-dist", type=float, default=0.0075)
    p.add_argument("--no-pyedgeeval", action="store_true", help="time the fast matcher only")
    p.add_argument("--images", type=int, default=5105, help="val images of the estimate (PASCAL-Context: 5,105)")
    p.add_argument("--workers", type=int, default=16, help="worker processes of the estimate (--eval-workers)")
    args = p.parse_args(argv)
    thresholds = edge_thresholds(args.thresholds)
    gt, preds = predictions(*args.size)
    print(f"{args.size[0]}x{args.size[1]}, {len(thresholds)} thresholds, {gt.sum()} ground-truth pixels, "
          f"max_dist {args.max_dist}")
    print("| prediction | matcher | wall s | CPU s | F % | largest count difference |")
    print("|---|---|---|---|---|---|")
    slowest = 0.0
    for name, prob in preds.items():
        fast, wall, cpu = timed(match_counts, thresholds, prob, gt, args.max_dist)
        slowest = max(slowest, cpu)
        print(f"| {name} | fast | {wall:.2f} | {cpu:.2f} | {f_best(fast):.3f} | |")
        if not args.no_pyedgeeval:
            from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold

            ref, wall, cpu = timed(evaluate_boundaries_threshold, thresholds, prob, gt, max_dist=args.max_dist,
                                   apply_thinning=True)
            ref = np.stack(ref[:4])
            print(f"| {name} | pyEdgeEval | {wall:.2f} | {cpu:.2f} | {f_best(ref):.3f} | "
                  f"{int(np.abs(fast - ref).max())} (fast - pyEdgeEval: {int((fast - ref)[0].min())} to "
                  f"{int((fast - ref)[0].max())} matched) |")
    hours = args.images * slowest / args.workers / 3600
    print(f"estimate: {args.images} images x {slowest:.2f} CPU s / {args.workers} workers = {hours:.2f} h "
          f"(the busier prediction's time, on cores as fast as this one)")


if __name__ == "__main__":
    main()
