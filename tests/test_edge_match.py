"""ase_model/edge_match.py against pyEdgeEval, the reference: the thinning pixel for pixel, and the matched counts
of image-threshold pairs (synthetic edge maps: sparse, dense, noisy, empty prediction, empty ground truth, every
pixel predicted, the distance rule's boundary, a contour shifted along itself; and the synthetic dataset's images)
against several runs of pyEdgeEval's randomised assignment (``correspond_pixels``, BSDS match.cc).

The bound. A maximum matching is at least as large as any other, so fast >= every pyEdgeEval run. From above:
(a) the exact optimum of match.cc's objective with every outlier connection present (computed here independently
with SciPy's min-cost assignment) keeps all pairs of a maximum matching unless giving one up saves more distance
than the outlier cost ow = 100 maxDist (in pixels) times 100, i.e. along an alternating path of more than
100 maxDist / (step) real edges: only a long contour whose prediction is shifted along it, with a free end on each
side, does that (one pair per such contour; the "shifted-contour" case below); (b) match.cc connects each outlier
node to 6 random ones (kOfN), and an outlier node that no random edge reaches forces one pixel out of the
matching; of the smaller side's n_min outlier nodes, mu = n_min (1 - 6 / n_min)^n_max are expected so (n: the
pixels with a partner in reach on each side). Taking (b) as the model of the random loss (a model: the test
measures it), fast - max(runs) <= (fast - optimum) + ceil(mu + 3 sqrt(mu)) + 1. Where the random outlier edges
are all there are (at most 7 matchable pixels a side, 6 on the smaller: match.cc lines 147-149), there is no (b):
CSA is exact, and every run must give the optimum (the distance boundary's pairs are checked so).
"""

import functools
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.sparse
from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching

from ase_model.data import edges_from_context
from ase_model.edge_match import GroundTruthMatcher, disc_offsets, match_counts, thin
from ase_model.metrics import edge_thresholds
from ase_model.synthetic import _draw, image_size

RUNS = 5  # pyEdgeEval runs per pair: its outlier graph is random (its seed is the clock)
THRESHOLDS = edge_thresholds(99)[4::9]  # 11 of SEISM's 99: 0.05, 0.14, ..., 0.95


def optimum_pairs(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Real pairs of match.cc's minimum-cost assignment when every outlier connection exists: each predicted pixel
    takes a ground-truth pixel within maxDist at rint(100 d) or its own outlier at ow = ceil(100 * 100 maxDist);
    the ground-truth side's outlier costs are the same for every assignment of a given size and drop out."""
    h, w = gt.shape
    radius = max_dist * math.sqrt(h * h + w * w)
    p, g = np.argwhere(pred), np.argwhere(gt)
    if len(p) == 0 or len(g) == 0:
        return 0
    d2 = ((p[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    i, j = np.nonzero(d2.astype(np.float64) <= radius * radius)
    cost = np.concatenate([np.rint(100 * np.sqrt(d2[i, j])), np.full(len(p), math.ceil(100 * 100 * radius))])
    rows, cols = np.concatenate([i, np.arange(len(p))]), np.concatenate([j, len(g) + np.arange(len(p))])
    # + 1: a cost of 0 (coincident pixels) would read as no edge
    graph = scipy.sparse.csr_array((cost + 1, (rows, cols)), shape=(len(p), len(g) + len(p)))
    _, col = min_weight_full_bipartite_matching(graph)
    return int(np.count_nonzero(col < len(g)))


def matchable(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int]:
    """(n1, n2): the predicted and ground-truth pixels with a partner in reach, match.cc's nodes."""
    offsets = disc_offsets(gt.shape, max_dist)
    r = int(np.abs(offsets).max())
    disc = np.zeros((2 * r + 1, 2 * r + 1), bool)
    disc[offsets[:, 0] + r, offsets[:, 1] + r] = True
    n1 = np.count_nonzero(pred & scipy.ndimage.binary_dilation(gt, disc))
    n2 = np.count_nonzero(gt & scipy.ndimage.binary_dilation(pred, disc))
    return n1, n2


def expected_unreached(n1: int, n2: int) -> float:
    """mu above: the outlier nodes of match.cc's smaller side that none of the larger side's 6 random outlier
    edges reach, in expectation, for n1 and n2 matchable nodes."""
    small, large = min(n1, n2), max(n1, n2)
    return small * (1 - 6 / small) ** large if small > 6 else 0.0


def complete_outlier_graph(n1: int, n2: int) -> bool:
    """match.cc's random outlier edges are all of them (d1 = n1 - 1, d2 = n2 - 1, d3 = min(n1, n2): lines
    147-149): CSA then solves the full problem exactly, and every run must give the optimum."""
    return max(n1, n2) <= 7 and min(n1, n2) <= 6


def _contours(h, w, rng, shapes=3):
    label = np.zeros((h, w), np.uint8)
    for _ in range(shapes):
        y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
        label[y0:y0 + rng.integers(4, h // 2), x0:x0 + rng.integers(4, w // 2)] = rng.integers(1, 5)
    return edges_from_context(label).astype(bool)


def _blurred(gt, rng, sigma, gain, noise):
    """A prediction of gt: shifted by up to 2 px, blurred, with uniform noise; 8-bit as the meter reads it."""
    shifted = np.roll(gt, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2))).astype(float)
    prob = np.clip(scipy.ndimage.gaussian_filter(shifted, sigma) * gain + rng.random(gt.shape) * noise, 0, 1)
    return np.floor(prob * 255) / 255


def cases():
    """(name, prob, gt, max_dist, thresholds): max_dist above PASCAL's 0.0075 on the small images gives their
    graphs the 2-6 px radius of a full-size image (0.0075 of a 375x500 diagonal is 4.7 px)."""
    rng = np.random.default_rng(24)
    out = []
    for max_dist in (0.0075, 0.03, 0.05):
        gt = _contours(48, 70, rng)
        out.append(("sparse", (rng.random(gt.shape) < 0.03) * rng.random(gt.shape), gt, max_dist, THRESHOLDS))
        out.append(("dense", rng.random(gt.shape), gt, max_dist, THRESHOLDS))
        out.append(("noisy", _blurred(gt, rng, 1.0, 2.0, 0.6), gt, max_dist, THRESHOLDS))
        out.append(("empty-prediction", np.zeros(gt.shape), gt, max_dist, THRESHOLDS[:3]))
        out.append(("empty-ground-truth", _blurred(gt, rng, 1.0, 3.0, 0.2), np.zeros_like(gt), max_dist,
                    THRESHOLDS[::3]))
    # a 60 x 80 image has a diagonal of 100: maxDist 0.05 -> 5.0 px exactly, 0.0499 -> 4.99 px. Pixels 5 apart
    # (along an axis, and as 3-4-5) match only under the first: match.cc keeps d^2 <= maxDist^2
    gt, pred = np.zeros((60, 80), bool), np.zeros((60, 80))
    gt[10, 10] = gt[30, 40] = True
    pred[10, 15] = pred[33, 44] = 1.0
    for max_dist in (0.05, 0.0499):
        out.append(("distance-boundary", pred, gt, max_dist, THRESHOLDS[:1]))
    # a 200 px contour (3/4 of the 24 x 260 image's diagonal, so more than 100 maxDist) predicted one pixel
    # further along: a maximum matching pairs all 200 pixels one step apart; match.cc's optimum gives one up
    gt, pred = np.zeros((24, 260), bool), np.zeros((24, 260))
    gt[12, 20:220] = True
    pred[12, 21:221] = 1.0
    out.append(("shifted-contour", pred, gt, 0.0075, THRESHOLDS[:1]))
    # the synthetic dataset's images and label maps, with predictions of their edges
    for i in range(8):
        h, w = image_size(rng, 64 if i < 6 else 120)
        gt = edges_from_context(_draw(rng, h, w)[2]).astype(bool)
        prob = _blurred(gt, rng, rng.uniform(0.5, 2), rng.uniform(1.5, 5), rng.uniform(0, 0.5))
        out.append(("synthetic-dataset", prob, gt, (0.0075, 0.02, 0.04)[i % 3], THRESHOLDS))
    # every pixel predicted (the thinning of a full image), against the last dataset image's edges
    for max_dist in (0.0075, 0.05):
        out.append(("all-on", np.ones(gt.shape), gt, max_dist, THRESHOLDS[:1]))
    return out


@functools.cache
def agreement():
    """Per image-threshold pair: (name, fast counts (4,), pyEdgeEval counts (RUNS, 4), optimum pairs, (n1, n2))."""
    from pyEdgeEval._lib import correspond_pixels
    from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    from pyEdgeEval.preprocess import binary_thin

    rows = []
    for name, prob, gt, max_dist, thresholds in cases():
        fast = match_counts(thresholds, prob, gt, max_dist)
        # pyEdgeEval's counts of one run, through its own per-image function
        once = np.stack(evaluate_boundaries_threshold(thresholds, prob, gt, max_dist=max_dist, apply_thinning=True))
        for i, t in enumerate(thresholds):
            pred = binary_thin(prob >= t)
            runs = [once[:, i]]
            for _ in range(RUNS - 1):
                if gt.any():
                    m1, m2, _, _ = correspond_pixels(pred, gt, max_dist=max_dist)
                    runs.append(np.array([np.count_nonzero(m2), gt.sum(), np.count_nonzero(m1), pred.sum()]))
                else:
                    runs.append(once[:, i])
            rows.append((name, fast[:, i], np.stack(runs), optimum_pairs(pred, gt, max_dist),
                         matchable(pred, gt, max_dist)))
    return rows


def test_thinning_is_pyedgeeval_s_pixel_for_pixel(pyedgeeval):
    from pyEdgeEval.preprocess import binary_thin

    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((1, 1), bool), np.ones((9, 13), bool), np.ones((3, 40), bool)]
    for _ in range(60):  # blobs of every size and density, touching the borders, odd shapes
        h, w = rng.integers(1, 45, 2)
        noise = scipy.ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0, 3))
        masks.append(noise > np.quantile(noise, rng.uniform(0.1, 0.9)))
    masks += [prob >= t for _, prob, _, _, _ in cases()[:4] for t in (0.05, 0.5)]
    for mask in masks:
        np.testing.assert_array_equal(thin(mask), binary_thin(mask), err_msg=f"{mask.shape} {mask.sum()} pixels")


def test_disc_is_match_cc_s_window():
    """match.cc: r = ceil(maxDist), offsets (u, v) in [-r, r]^2 with u^2 + v^2 <= maxDist^2 (maxDist = max_dist *
    the diagonal); a 60 x 80 image has diagonal 100."""
    five = {tuple(o) for o in disc_offsets((60, 80), 0.05)}
    assert (0, 5) in five and (3, 4) in five and (4, 4) not in five and len(five) == 81
    assert (0, 5) not in {tuple(o) for o in disc_offsets((60, 80), 0.0499)}
    assert len(disc_offsets((60, 80), 0.001)) == 1  # 0.1 px: only the pixel itself


def test_match_counts_refuses_other_shapes():
    """pyEdgeEval refuses maps of two shapes; a (1, W) prediction would otherwise broadcast against the ground
    truth into wrong counts."""
    gt = np.zeros((6, 9), bool)
    for pred in (np.ones((1, 9)), np.ones((6, 8)), np.ones(9)):
        with pytest.raises(ValueError, match="prediction"):
            match_counts(THRESHOLDS[:1], pred, gt)


def test_the_maximum_flow_is_a_maximum_matching():
    """Dinic's flow value against SciPy's Hopcroft-Karp on the same within-reach graphs (small ones, where its
    dead-end re-exploration does not show)."""
    for name, prob, gt, max_dist, thresholds in cases()[:12]:
        matcher = GroundTruthMatcher(gt, max_dist)
        pred = thin(prob >= thresholds[len(thresholds) // 2])
        p, g = np.argwhere(pred), np.argwhere(gt)
        radius = max_dist * math.hypot(*gt.shape)
        if len(p) and len(g):
            near = (((p[:, None, :] - g[None, :, :]) ** 2).sum(-1)).astype(np.float64) <= radius * radius
            matching = maximum_bipartite_matching(scipy.sparse.csr_array(near.astype(np.int8)), perm_type="column")
            assert matcher.count(pred) == np.count_nonzero(matching >= 0), name
        else:
            assert matcher.count(pred) == 0, name


def test_counts_are_pyedgeeval_s_within_its_spread(pyedgeeval):
    rows = agreement()
    names = {r[0] for r in rows}
    assert len(rows) >= 200 and {"sparse", "dense", "noisy", "empty-prediction", "empty-ground-truth", "all-on",
                                 "synthetic-dataset"} <= names
    exact = set()
    for name, fast, runs, optimum, (n1, n2) in rows:
        # totals exact: the same thinning, the same ground truth
        np.testing.assert_array_equal(runs[:, [1, 3]], np.broadcast_to(fast[[1, 3]], (RUNS, 2)), err_msg=name)
        assert fast[0] == fast[2] and (runs[:, 0] == runs[:, 2]).all(), name
        best = runs[:, 0].max()
        assert fast[0] >= best, f"{name}: {fast[0]} pairs, pyEdgeEval {runs[:, 0]}"
        assert optimum == fast[0] - (name == "shifted-contour"), f"{name}: optimum {optimum}, fast {fast[0]}"
        if complete_outlier_graph(n1, n2):  # no random loss: every run is the optimum
            exact.add(name)
            assert (runs[:, 0] == optimum).all(), f"{name}: optimum {optimum}, pyEdgeEval {runs[:, 0]}"
        mu = expected_unreached(n1, n2)
        bound = (fast[0] - optimum) + math.ceil(mu + 3 * math.sqrt(mu)) + 1
        assert fast[0] - best <= bound, f"{name}: {fast[0]} pairs, pyEdgeEval {runs[:, 0]}, bound {bound}"
    assert {"distance-boundary", "empty-prediction"} <= exact, exact
    shifted = [r for r in rows if r[0] == "shifted-contour"]
    assert all(r[1][0] == 200 and r[2][:, 0].max() <= 199 for r in shifted), "match.cc gives one pair up"
    boundary = [r[1][0] for r in rows if r[0] == "distance-boundary"]
    assert boundary == [2, 0], "pixels maxDist apart match, beyond it not"


def dataset_ods_f():
    """odsF (percent) over the synthetic dataset's images, their pairs summed per threshold: the fast counts, each
    pyEdgeEval run's, and the best run's per pair (the limit pyEdgeEval approaches from below); and the most a
    single run can lose under the model of the random loss. With count_r = count_p = c, F = 2 c / (gt +
    predicted pixels), so a run that loses L pairs at the fast counts' best threshold reads at most
    2 L / (gt + predicted) lower; L is taken as at most ceil(M + 4 sqrt(M)) + 1, M the sum of mu over the images
    there (as the per-pair bound above, at 4 sigma for the sum)."""
    rows = [r for r in agreement() if r[0] == "synthetic-dataset"]
    n = len(THRESHOLDS)

    def f(counts):  # (pairs, 4) -> F per threshold of the counts summed over the images
        c = counts.reshape(-1, n, 4).sum(0)
        recall, precision = c[:, 0] / np.maximum(c[:, 1], 1), c[:, 2] / np.maximum(c[:, 3], 1)
        return 100 * 2 * precision * recall / np.maximum(precision + recall, 1e-12)

    fast = np.stack([r[1] for r in rows])  # (pairs, 4)
    runs = np.stack([r[2] for r in rows])  # (pairs, RUNS, 4)
    best_t = int(f(fast).argmax())
    m = sum(expected_unreached(*r[4]) for r in rows[best_t::n])
    totals = fast.reshape(-1, n, 4)[:, best_t].sum(0)
    allowed = 100 * 2 * (math.ceil(m + 4 * math.sqrt(m)) + 1) / (totals[1] + totals[3])
    return f(fast).max(), [f(runs[:, k]).max() for k in range(RUNS)], f(runs.max(1)).max(), allowed


def test_dataset_ods_f_of_the_two_matchers(pyedgeeval):
    """Dataset odsF from either matcher's counts: fast above every pyEdgeEval run, by at most 0.1 points over the
    best of its 5 runs per pair (the issue's criterion: 1.4% of triples of runs exceed it, 5e-5 of quintuples, on
    30 runs measured) and by what the random-loss model allows over a single run (one run alone reads 0-0.32 points
    lower on these images, 40 runs measured: see README.md, Protocol)."""
    fast, runs, best, allowed = dataset_ods_f()
    assert 0 <= fast - best <= 0.1, (fast, best)
    assert all(0 <= fast - r <= allowed for r in runs), (fast, runs, allowed)


def test_the_speed_benchmark_runs(pyedgeeval, capsys):
    """bench/edge_speed.py on a small image (a check that it works; its timings are not asserted)."""
    from bench import edge_speed

    edge_speed.main(["--size", "60", "90", "--thresholds", "5", "--images", "10", "--workers", "2"])
    out = capsys.readouterr().out
    assert out.count("| fast |") == 2 and out.count("| pyEdgeEval |") == 2 and "estimate: 10 images" in out
