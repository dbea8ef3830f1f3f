import numpy as np

from models.metrics import confusion_matrix, evaluate, scores


def test_hand_computed_3x3():
    gt = np.array([[0, 0, 1], [1, 1, 2], [2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1], [1, 255, 2], [0, 2, 2]], np.uint8)
    conf = confusion_matrix(pred, gt, 3)
    # rows: GT 0,1,2; columns: pred 0,1,2,unlabeled
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 2, 0]]
    s = scores(conf, ["bg", "a", "b"])
    # IoU_bg = 1/(2+2-1) ; IoU_a = 2/(3+3-2) ; IoU_b = 2/(3+2-2)
    assert np.isclose(s["iou"]["bg"], 1 / 3) and np.isclose(s["iou"]["a"], 0.5) and np.isclose(s["iou"]["b"], 2 / 3)
    assert np.isclose(s["miou"], (1 / 3 + 0.5 + 2 / 3) / 3)
    assert np.isclose(s["coverage"], 7 / 8) and np.isclose(s["precision"], 5 / 7)


def naive_iou(preds, gts, c):
    inter = np.zeros(c)
    union = np.zeros(c)
    for p, g in zip(preds, gts):
        for k in range(c):
            valid = g != 255
            pk, gk = (p == k) & valid, (g == k) & valid
            inter[k] += (pk & gk).sum()
            union[k] += (pk | gk).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return iou, np.nanmean(iou)


def test_matches_naive_per_image_computation():
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(5):
        g = rng.integers(0, 4, (13, 17)).astype(np.uint8)
        g[rng.random(g.shape) < 0.1] = 255
        p = np.where(rng.random(g.shape) < 0.7, g, rng.integers(0, 4, g.shape)).astype(np.uint8)
        p[rng.random(g.shape) < 0.1] = 255
        gts.append(g)
        preds.append(p)
    s = evaluate(preds, gts, 4, ["a", "b", "c", "d"])
    iou, miou = naive_iou(preds, gts, 4)
    assert np.allclose([s["iou"][k] for k in "abcd"], iou)
    assert np.isclose(s["miou"], miou) and s["images"] == 5


def test_absent_class_is_nan_and_excluded():
    gt = np.zeros((2, 2), np.uint8)
    s = scores(confusion_matrix(gt.copy(), gt, 3))
    assert s["iou"]["1"] is None and s["miou"] == 1.0


def test_lost_names_gt_classes_that_no_pixel_is_labelled():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    everything_fg = np.array([[1, 1, 1], [1, 2, 0]])  # the only background "prediction" sits on an ignored pixel
    assert scores(confusion_matrix(everything_fg, gt, 3), ["bg", "a", "b"])["lost"] == ["bg"]
    assert scores(confusion_matrix(gt, gt, 3))["lost"] == []
    partial = np.array([[0, 255, 1], [1, 255, 255]])  # class 2 only unlabeled: lost too
    assert scores(confusion_matrix(partial, gt, 3), ["bg", "a", "b"])["lost"] == ["b"]
