"""box_seeds (GrabCut, Eq. 3.2-3.3) and the dense CRF on hand-made images."""

import numpy as np
from pydensecrf.utils import unary_from_labels as reference_unary

from models.crf import CrfParams, crf_from_labels, crf_from_probs, unary_from_labels
from stages.base import IGNORE, Box
from models.grabcut import grabcut_refine, grabcut_seeds
from models.scale import object_side


def scene():
    """Grey noisy background; a red square (class 1) and, overlapping it, a blue square (class 2)."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 8, (80, 100, 3)), 0, 255)
    img[20:50, 15:45] = (220, 30, 30)
    img[35:65, 40:70] = (30, 30, 220)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, [Box(12, 17, 48, 53, 1), Box(37, 32, 73, 68, 2)]


def test_grabcut_seeds_follow_eq_3_2_and_3_3():
    img, boxes = scene()
    lab = grabcut_seeds(img, boxes, iterations=5)
    inside = np.zeros(lab.shape, bool)
    for b in boxes:
        inside[b.y0 : b.y1, b.x0 : b.x1] = True
    assert (lab[~inside] == 0).all()  # outside every box: background
    assert set(np.unique(lab[inside])) <= {1, 2, IGNORE}  # inside: box class or unknown, never bg
    # GrabCut background inside a box (its margin) is unknown.
    assert lab[18, 13] == IGNORE and lab[66, 71] == IGNORE
    # Object interiors take their box's class.
    assert (lab[24:34, 20:38] == 1).mean() > 0.95 and (lab[52:62, 50:66] == 2).mean() > 0.95


def test_smaller_box_wins_where_both_claim():
    img = np.full((60, 60, 3), 128, np.uint8)
    img[10:50, 10:50] = (200, 40, 40)  # a red object (class 1)...
    img[22:32, 22:32] = (40, 200, 40)  # ...carrying a green one (class 2)
    big, small = Box(10, 10, 50, 50, 1), Box(21, 21, 33, 33, 2)
    assert grabcut_seeds(img, [big], iterations=3)[26, 26] == 1  # the big box claims the green pixels too
    lab = grabcut_seeds(img, [big, small], iterations=3)
    # Both boxes claim the green object: the smaller box wins...
    assert (lab[23:31, 23:31] == 2).all()
    # ...and the big box keeps its class outside the small box.
    assert lab[45, 45] == 1
    assert (grabcut_seeds(img, [small, big], iterations=3) == lab).all()  # order-independent


def test_box_covering_whole_image_and_tiny_box():
    img, _ = scene()
    lab = grabcut_seeds(img, [Box(0, 0, 100, 80, 1)], iterations=2)
    assert (lab == 1).any() and (lab != 0).all()
    tiny = grabcut_seeds(img, [Box(5, 5, 7, 30, 1)], min_box_side=4)
    assert (tiny[5:30, 5:7] == IGNORE).all() and (tiny[:, 8:] == 0).all()


def test_grabcut_refine_snaps_a_blocky_map_to_the_object_edges():
    img, boxes = scene()
    truth = np.zeros(img.shape[:2], np.uint8)
    truth[20:50, 15:45] = 1
    truth[35:65, 40:70] = 2
    # A stride-8-like map: each square grown to its box (the whole margin labelled).
    blocky = np.zeros_like(truth)
    for b in boxes:
        blocky[b.y0 : b.y1, b.x0 : b.x1] = b.cls
    blocky[0:4, 0:4] = 2  # a class-2 pixel outside every box: left alone
    out = grabcut_refine(img, blocky, boxes, iterations=3)
    assert out[0, 0] == 2 and (out[5:10, 80:] == 0).all()
    core = truth[8:] > 0
    assert (out[8:] == truth[8:])[core].mean() > 0.97 and (out == truth)[10:].mean() > 0.98
    assert (blocky == truth)[10:].mean() < 0.91  # the snap is the refinement's doing
    assert (grabcut_refine(img, blocky, boxes, iterations=3) == out).all()


def test_grabcut_refine_keeps_the_map_where_grabcut_disagrees():
    img, boxes = scene()
    # Class 1 labelled on the grey margin only: GrabCut's result barely overlaps it.
    wrong = np.zeros(img.shape[:2], np.uint8)
    wrong[17:20, 12:48] = 1
    free = grabcut_refine(img, wrong, boxes[:1], iterations=3)
    assert (free == wrong).mean() < 0.99  # without the guard GrabCut rewrites the box
    kept = grabcut_refine(img, wrong, boxes[:1], iterations=3, min_iou=0.5)
    assert (kept == wrong).all()
    thin = grabcut_refine(img, wrong, [Box(12, 17, 14, 53, 1)], min_box_side=4)
    assert (thin == wrong).all()  # a box too thin for GrabCut keeps its labels


def test_grabcut_is_deterministic():
    img, boxes = scene()
    assert (grabcut_seeds(img, boxes, seed=3) == grabcut_seeds(img, boxes, seed=3)).all()


def test_unary_matches_pydensecrf_reference():
    labels = np.array([[0, 1, 2, -1], [2, -1, 1, 0]])
    mine = unary_from_labels(labels, 3, 0.7)
    ref = reference_unary((labels + 1).astype(np.int64), 3, 0.7, zero_unsure=True)
    assert np.allclose(mine, ref)
    # Hand values: -log 0.7 on the label, -log 0.15 elsewhere, -log(1/3) where unknown.
    assert np.isclose(mine[0, 0], -np.log(0.7)) and np.isclose(mine[1, 0], -np.log(0.15))
    assert np.allclose(mine[:, 3], -np.log(1 / 3))


def test_crf_fills_unknowns_along_edges():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = (200, 200, 200)
    lab = np.full((40, 60), IGNORE, np.uint8)
    lab[18:22, 3:8] = 0
    lab[18:22, 50:55] = 3  # class ids need not be contiguous
    out = crf_from_labels(img, lab, CrfParams())
    assert (out[:, :28] == 0).all() and (out[:, 32:] == 3).all()
    assert (crf_from_labels(img, np.full_like(lab, IGNORE), CrfParams()) == IGNORE).all()


def test_crf_on_probabilities_sharpens_to_edges():
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, 20:] = 255
    ramp = np.tile(np.linspace(0.3, 0.7, 40), (30, 1))
    q = crf_from_probs(img, np.stack([1 - ramp, ramp]), CrfParams())
    assert np.allclose(q.sum(0), 1, atol=1e-4)
    assert (q.argmax(0)[:, :18] == 0).all() and (q.argmax(0)[:, 22:] == 1).all()


def test_object_side_is_the_median_box_side_else_the_label_regions_else_a_quarter_frame():
    boxes = [Box(0, 0, 10, 40, 1), Box(0, 0, 30, 30, 1), Box(0, 0, 100, 100, 2)]  # areas 400, 900, 10000
    assert object_side((200, 300), boxes) == 30.0
    lab = np.zeros((60, 80), np.uint8)
    lab[0:10, 0:10] = 1  # 100 px
    lab[30:50, 30:50] = 1  # 400 px, a second region of the same class
    lab[55:58, 70:73] = 2  # 9 px: a speck, not an object
    lab[0:5, 60:80] = IGNORE
    assert object_side(lab.shape, (), lab) == np.sqrt(250.0)
    assert object_side((64, 100), (), np.zeros((64, 100), np.uint8)) == 40.0  # sqrt(6400) / 2


def test_crf_kernel_rule_is_the_absolute_kernel_at_scale_times_object_side():
    from stages.crf import CrfConfig, kernel_params

    img, boxes = scene()  # both boxes 36 x 36
    lab = np.zeros(img.shape[:2], np.uint8)
    fixed = CrfConfig(bilateral_sxy=50)
    assert kernel_params(fixed, img, boxes, lab) is fixed
    ruled = kernel_params(CrfConfig(bilateral_scale=0.5), img, boxes, lab)
    assert ruled.bilateral_sxy == 18.0 and ruled.gaussian_sxy == fixed.gaussian_sxy
    lab[20:50, 15:45] = 1
    lab[35:65, 40:70] = 2
    lab[lab == 0] = IGNORE
    lab[5:10, 5:95] = 0
    reference = crf_from_labels(img, lab, CrfConfig(bilateral_sxy=18.0))
    assert (crf_from_labels(img, lab, ruled) == reference).all()
