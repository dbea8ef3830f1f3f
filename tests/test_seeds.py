"""Seed-map rules on hand-made maps: Eq. 3.4 (every branch), Eq. 3.5, top-40%, superpixels."""

import numpy as np

from models.types import Box, Point
from models.seeds import (
    confident_box_seeds,
    expand_superpixels,
    fuse_box_cam,
    merge_seeds,
    reliable_cam_labels,
    top_ratio_mask,
)
from stages.sparse import points_map

X = 255

# Box A (class 1): rows 1-4, cols 1-4. Box B (class 2): rows 0-2, col 5. 6x6 image.
BOXES = [Box(1, 1, 5, 5, 1), Box(5, 0, 6, 3, 2)]
M_B = np.array(
    [
        [0, 0, 0, 0, 0, 2],
        [0, 1, 1, X, X, 2],
        [0, 1, 1, 1, X, X],
        [0, 1, 1, 1, X, 0],
        [0, X, X, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    np.uint8,
)
M_I = np.array(
    [
        [1, 0, 0, 0, 0, 0],  # (0,0): CAM says 1 outside every box -> branch 1 gives 0
        [0, 1, 1, 0, 0, 1],  # box B: the CAM has no class 2 inside it -> branch 3
        [0, 1, 0, 1, 0, 0],  # (2,2): M_B=1, M_I=0 inside A -> disagree -> 255
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],  # (4,2): M_B=255, M_I=1 -> 255
        [0, 0, 0, 0, 0, 0],
    ],
    np.uint8,
)


def test_fusion_eq_3_4_every_branch():
    m_f, from_box = fuse_box_cam(M_B, M_I, BOXES)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 2],  # branch 1 row; (0,5) branch 3 (M_Bk = 2)
            [0, 1, 1, X, X, 2],  # branch 2 where M_B = M_I = 1; (1,3),(1,4): M_B unknown -> 255
            [0, 1, X, 1, X, X],  # (2,5): branch 3 but GrabCut said background in B -> 255
            [0, 1, 1, 1, X, 0],
            [0, X, X, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(m_f, expected)
    outside = np.ones((6, 6), bool)
    outside[1:5, 1:5] = False
    outside[0:3, 5] = False
    branch3 = np.zeros((6, 6), bool)
    branch3[0:2, 5] = True
    np.testing.assert_array_equal(from_box, outside | branch3)


def test_branch_3_only_when_the_cam_misses_the_class_in_that_box():
    m_i = M_I.copy()
    m_i[2, 5] = 2  # now the CAM predicts class 2 somewhere in box B
    m_f, _ = fuse_box_cam(M_B, m_i, BOXES)
    assert m_f[0, 5] == X and m_f[1, 5] == X and m_f[2, 5] == X  # no agreement in B -> unknown


def test_confident_seeds_eq_3_5():
    m_f, from_box = fuse_box_cam(M_B, M_I, BOXES)
    m_rel = np.full((6, 6), X, np.uint8)
    m_rel[1, 1] = 1  # confirms a branch-2 label -> kept
    m_rel[3, 3] = 1  # confirms -> kept
    m_rel[0, 1] = 1  # disagrees with a branch-1 label -> still kept (from M_B)
    m_rel[0, 5] = 0  # disagrees with a branch-3 label -> still kept (from M_B)
    m_g = confident_box_seeds(m_f, from_box, m_rel)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 2],
            [0, 1, X, X, X, 2],
            [0, X, X, X, X, X],
            [0, X, X, 1, X, 0],
            [0, X, X, X, X, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(m_g, expected)
    # M_g only removes labels from M_F, never adds or changes one.
    kept = m_g != X
    np.testing.assert_array_equal(m_g[kept], m_f[kept])


def _naive_top(labels, score, ratio):
    keep = np.zeros(labels.shape, bool)
    for c in set(labels.ravel().tolist()):
        pix = sorted(
            (-score[i, j], i * labels.shape[1] + j, i, j)
            for i in range(labels.shape[0])
            for j in range(labels.shape[1])
            if labels[i, j] == c
        )
        n = int(np.ceil(ratio * len(pix)))
        for _, _, i, j in pix[:n]:
            keep[i, j] = True
    return keep


def test_top_ratio_selection_matches_a_naive_sort():
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 6), np.uint8)
    labels[1:5, 1:5] = 1  # 16 pixels of class 1, 20 of class 0
    score = rng.random((6, 6))
    keep = top_ratio_mask(labels, score, 0.4)
    np.testing.assert_array_equal(keep, _naive_top(labels, score, 0.4))
    assert keep[labels == 0].sum() == 8 and keep[labels == 1].sum() == 7  # ceil(0.4*20), ceil(0.4*16)
    # the kept pixels of a class score at least as high as every dropped one
    s1 = score[labels == 1]
    assert s1[keep[labels == 1]].min() > s1[~keep[labels == 1]].max()


def test_reliable_cam_labels_need_crf_agreement():
    fg = np.linspace(0.0, 1.0, 36).reshape(6, 6).astype(np.float32)
    probs = np.stack([1.0 - fg, fg])  # M_I: class 3 where fg > 0.5
    class_ids = np.array([0, 3])
    m_rel = reliable_cam_labels(probs, class_ids, 0.4)
    m_i = np.where(fg > 0.5, 3, 0)
    np.testing.assert_array_equal(m_rel != X, top_ratio_mask(m_i, probs.max(0), 0.4))
    assert set(np.unique(m_rel)) == {0, 3, X}
    assert (m_rel[0, :] == 0).all() and (m_rel[5, :] == 3).all()  # the most confident rows survive
    crf = m_i.copy()
    crf[5, 5] = 0  # the CRF disagrees at one confident pixel
    with_crf = reliable_cam_labels(probs, class_ids, 0.4, crf)
    assert with_crf[5, 5] == X and (with_crf[m_rel != X] != X).sum() == (m_rel != X).sum() - 1


def test_superpixel_expansion():
    segments = np.zeros((6, 6), np.int64)
    segments[:3, 3:] = 1
    segments[3:, :3] = 2
    segments[3:, 3:] = 3
    sparse = np.full((6, 6), X, np.uint8)
    sparse[1, 0:2] = 1  # segment 0: one class -> the whole segment
    sparse[0, 4] = 1  # segment 1: two classes -> only the marked pixels
    sparse[2, 5] = 0
    sparse[4, 4] = 2  # segment 3: a single point -> the whole segment
    out = expand_superpixels(sparse, segments)
    assert (out[:3, :3] == 1).all()
    assert out[0, 4] == 1 and out[2, 5] == 0 and (out[:3, 3:] != X).sum() == 2
    assert (out[3:, :3] == X).all()  # segment 2: untouched
    assert (out[3:, 3:] == 2).all()


def test_points_and_merge():
    pts = points_map((6, 6), [Point(1, 2, 3), Point(5, 5, 1), Point(9, 9, 2)])  # the last is outside
    assert pts[2, 1] == 3 and pts[5, 5] == 1 and (pts != X).sum() == 2
    fallback = np.full((6, 6), 0, np.uint8)
    merged = merge_seeds(pts, fallback)
    assert merged[2, 1] == 3 and merged[0, 0] == 0
