"""The edge odsF counts of one image, fast: SEISM's boundary matching as a maximum bipartite matching.

pyEdgeEval (BSDS ``correspondPixels``, ``match.cc``) matches the thinned prediction to the ground truth by a
minimum-cost perfect assignment (CSA) on a graph of

- real edges between a predicted and a ground-truth pixel at distance d <= maxDist (``u*u + v*v > maxDist*maxDist``
  is skipped in the ``ceil(maxDist)`` window, ``match.cc`` lines 61 and 114-139), each costing ``rint(100 d)``
  <= 100 maxDist (line 186);
- outlier edges, six random ones per pixel (``kOfN``, ``degree = 6``, lines 189-237), each costing
  ``ow = ceil(100 outlierCost)`` (line 170) with ``outlierCost = 100 maxDist`` (``correspond_pixels.pyx``), and a
  perfect-match overlay at 100 ow (lines 238-250).

A perfect assignment with k real pairs costs (real distances) + ow (n1 + n2 - k) when its outliers find cheap
edges, so each further real pair saves ow - 100 maxDist, 99 times what any real edge costs: the optimum takes
the most real pairs it can, and P, R and odsF use nothing but that number. Here it is found directly, as a
maximum matching (a unit-capacity maximum flow, ``scipy.sparse.csgraph.maximum_flow``) on the same real edges.
pyEdgeEval can only reach it from below (no matching is larger than a maximum one): its random outlier graph
leaves a few assignments of maximum size without a cheap completion, and its optimum gives up a real pair where
that saves more than ow along an alternating path, which takes more than 100 maxDist / step real edges (a long
contour predicted shifted along itself). tests/test_edge_match.py measures how far below, against several
pyEdgeEval runs, and README.md (Protocol) states the numbers.

The prediction is thinned as pyEdgeEval's ``binary_thin`` does it (the same deletion tables and the same stopping
rule, pixel for pixel), but each pass looks only at the pixels next to what the last passes removed.
"""

import itertools
import math

import numpy as np
import scipy.ndimage
import scipy.sparse
from scipy.sparse.csgraph import maximum_flow

# Guo & Hall's deletion tables (conditions G1, G2, G3 / G3'), indexed by the 8-neighbour code (bit i = neighbour
# i counter-clockwise from east): the tables of pyEdgeEval's binary_thin (preprocess/thin/thin.py), which
# data.thin builds too
from .data import _THIN_LUTS


def thin(mask: np.ndarray) -> np.ndarray:
    """pyEdgeEval's ``binary_thin(mask)`` (bool (H, W) -> bool (H, W)), pixel for pixel.

    Its two sub-iterations delete, in parallel, every pixel whose neighbourhood the sub-iteration's table marks;
    it stops at the first sub-iteration that deletes nothing. A pixel's verdict changes only when its 3x3
    neighbourhood does, so each pass here reads only the pixels around those deleted since that table's previous
    pass (all pixels at its first): the same deletions, in time proportional to them rather than to the image."""
    h, w = mask.shape
    row = w + 2
    image = np.zeros((h + 2, row), np.uint8)  # zero-padded, so every neighbour of an image pixel exists
    image[1:-1, 1:-1] = mask
    flat = image.ravel()
    # east, north-east, north, north-west, west, south-west, south, south-east: bits 0 to 7 of the code
    neighbours = np.array([1, 1 - row, -row, -1 - row, -1, row - 1, row, row + 1])
    deleted = [np.empty(0, np.intp), np.empty(0, np.intp)]
    for step in itertools.count():
        table = step % 2
        if step < 2:
            pixels = np.flatnonzero(flat)
        else:  # deleted since this table's last pass (by it, then by the other table) and their neighbours
            near = np.zeros(flat.size, bool)
            changed = np.concatenate(deleted)
            near[changed] = True
            near[(changed[:, None] + neighbours).ravel()] = True
            pixels = np.flatnonzero(near & (flat != 0))
        if 8 * pixels.size > flat.size:  # most of the image: one code image by shifted slices is cheaper
            codes = np.zeros((h + 2, row), np.uint8)
            for bit, (dy, dx) in enumerate(((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))):
                codes[1:-1, 1:-1] |= image[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] << bit
            codes = codes.ravel()[pixels]
        else:
            codes = np.packbits(flat[pixels[:, None] + neighbours], axis=1, bitorder="little")[:, 0]
        gone = pixels[_THIN_LUTS[table][codes]]
        if gone.size == 0:
            break
        flat[gone] = 0
        deleted[table] = gone
    return flat.reshape(h + 2, row)[1:-1, 1:-1].astype(bool)


def disc_offsets(shape: tuple[int, int], max_dist: float) -> np.ndarray:
    """(dy, dx) pairs (K, 2) within the matching radius of an image of this shape: maxDist = max_dist times the
    diagonal, and the offsets of the ceil(maxDist) window with dy^2 + dx^2 <= maxDist^2, in match.cc's float64
    arithmetic (correspond_pixels.pyx: idiag = sqrt(rows^2 + cols^2), maxDist = max_dist * idiag)."""
    rows, cols = shape
    radius = max_dist * math.sqrt(rows * rows + cols * cols)
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = (dy * dy + dx * dx).astype(np.float64) <= radius * radius
    return np.stack([dy[inside], dx[inside]], 1)


class GroundTruthMatcher:
    """Matches predicted edge maps to one ground-truth map gt (H, W) bool within max_dist of the image diagonal.

    ``count(pred)`` is the number of (predicted, ground-truth) pixel pairs of a maximum matching, for a bool pred
    (H, W): pyEdgeEval's matched prediction and matched ground-truth counts are both this number, or less.

    The matching is a unit-capacity maximum flow (source -> predicted pixel -> ground-truth pixel within maxDist
    -> sink) by Dinic's algorithm (``scipy.sparse.csgraph.maximum_flow``): SciPy's Hopcroft-Karp
    (``maximum_bipartite_matching``) re-explores dead ends (scipy/scipy#26147) and takes up to seconds on the
    ladder-like graphs of two nearby contours, where Dinic's takes milliseconds."""

    def __init__(self, gt: np.ndarray, max_dist: float):
        gt = np.asarray(gt, bool)
        self.n_gt = int(np.count_nonzero(gt))
        self.offsets = disc_offsets(gt.shape, max_dist)
        r = self.r = int(np.abs(self.offsets).max())
        h, w = gt.shape
        self.index = np.full((h + 2 * r, w + 2 * r), -1, np.int32)  # ground-truth pixel id, -1 elsewhere
        self.index[r:r + h, r:r + w][gt] = np.arange(self.n_gt, dtype=np.int32)
        disc = np.zeros((2 * r + 1, 2 * r + 1), bool)
        disc[self.offsets[:, 0] + r, self.offsets[:, 1] + r] = True
        self.reach = scipy.ndimage.binary_dilation(gt, disc)  # where a predicted pixel has a match in reach

    def count(self, pred: np.ndarray) -> int:
        py, px = np.nonzero(pred & self.reach)
        if py.size == 0:
            return 0
        r, padded = self.r, self.index.shape[1]
        near = self.index.ravel()[((py + r) * padded + px + r)[:, None] + self.offsets @ [padded, 1]]  # (pred, K)
        near = np.sort(near, axis=1)  # each row's ground-truth ids ascending, after the -1 of the misses
        edge = near >= 0
        n_pred, n_gt = near.shape[0], self.n_gt
        # nodes: 0 source, 1..n_pred predicted pixels, then the ground-truth pixels, then the sink; capacities 1
        sink = n_pred + n_gt + 1
        indices = np.concatenate([np.arange(1, n_pred + 1), near[edge] + n_pred + 1, np.full(n_gt, sink)])
        degree = np.concatenate([[n_pred], edge.sum(1), np.ones(n_gt, np.intp), [0]])
        graph = scipy.sparse.csr_array((np.ones(indices.size, np.int32), indices.astype(np.int32),
                                        np.concatenate([[0], np.cumsum(degree)]).astype(np.int32)),
                                       shape=(sink + 1, sink + 1))
        return int(maximum_flow(graph, 0, sink, method="dinic").flow_value)


def match_counts(thresholds: np.ndarray, pred: np.ndarray, gt: np.ndarray, max_dist: float = 0.0075) -> np.ndarray:
    """One image's (count_r, sum_r, count_p, sum_p) per threshold, (4, n) float64, as pyEdgeEval's
    ``evaluate_boundaries_threshold(thresholds, pred, gt, max_dist, apply_thinning=True)`` returns them: pred
    (H, W) float edge strength, binarised as ``pred >= t`` and thinned; gt (H, W) bool, already thin; count_r =
    count_p = the matched pairs, sum_r = gt pixels (0 with no ground truth), sum_p = thinned predicted pixels.
    Thresholds that select the same pixels share one thinning and matching."""
    pred, gt = np.asarray(pred), np.asarray(gt, bool)
    if pred.shape != gt.shape or gt.ndim != 2:
        raise ValueError(f"edge matching: the prediction {pred.shape} and the ground truth {gt.shape} must be one "
                         "(H, W) shape")
    matcher = GroundTruthMatcher(gt, max_dist)
    out = np.zeros((4, len(thresholds)))
    done = {}  # pixels selected -> (matched, predicted); the selections are nested, so the count names the set
    for i, t in enumerate(thresholds):
        selected = pred >= t
        key = int(np.count_nonzero(selected))
        if key not in done:
            thinned = thin(selected)
            done[key] = matcher.count(thinned), np.count_nonzero(thinned)
        matched, predicted = done[key]
        out[:, i] = matched, matcher.n_gt, matched, predicted
    return out
