"""SPML's numerics (pixel-to-segment contrast) against naive per-pixel loops on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.spml import (
    Memory,
    co_occurrence_loss,
    feature_affinity_loss,
    grid_clusters,
    image_similarity_loss,
    make_batch,
    nearest_labelled,
    segment_prototypes,
    segsort_plus,
    semantic_annotation_loss,
    spherical_kmeans,
)

U = 9  # "unlabelled" in these tests


def _naive_nll(e, protos, own, pos, neg, kappa):
    """Eq. 3 for one pixel with explicit sets (segsort+: the positives other than its own
    segment, or its own segment alone)."""
    others = [t for t in pos if t != own]
    num_set = others if others else [own]
    den_set = set(num_set) | {t for t in neg if t not in num_set}
    num = sum(torch.exp(kappa * (protos[t] * e).sum()) for t in num_set)
    den = sum(torch.exp(kappa * (protos[t] * e).sum()) for t in den_set)
    return -torch.log(num / den)


def _naive_protos(emb, seg, n):
    out = []
    for s in range(n):
        rows = [emb[i] for i in range(len(seg)) if int(seg[i]) == s]
        v = sum(rows) if rows else torch.zeros_like(emb[0])
        out.append(v / v.norm().clamp_min(1e-12))
    return torch.stack(out)


def test_segsort_plus_against_the_pixel_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    protos = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    own = torch.tensor([0, 1, 2, 3, 4, 0])
    pos = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]],
        dtype=torch.bool,
    )  # rows 1, 4, 5: only the own segment is positive
    neg = ~pos
    neg[2, 4] = False  # segment 4 in neither set of pixel 2
    got = segsort_plus(emb, own, protos, pos, neg, 6.0)
    want = torch.stack(
        [
            _naive_nll(
                emb[i],
                protos,
                int(own[i]),
                torch.nonzero(pos[i]).flatten().tolist(),
                torch.nonzero(neg[i]).flatten().tolist(),
                6.0,
            )
            for i in range(6)
        ]
    )
    torch.testing.assert_close(got, want)
    gw = torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.autograd.grad((got * gw).sum(), emb, retain_graph=True)[0]
    b = torch.autograd.grad((want * gw).sum(), emb)[0]
    torch.testing.assert_close(a, b)
    # by hand, pixel 1: numerator = its own segment, denominator = own + segments 0, 2, 3, 4
    s = protos @ emb[1].detach()
    assert float(got[1].detach()) == pytest.approx(float(-torch.log(torch.exp(6 * s[1]) / torch.exp(6 * s).sum())))


def test_spherical_kmeans_against_the_loop_and_the_grid_start():
    assert grid_clusters(4, 6, 2, 3).tolist() == [
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 4, 4, 5, 5],
        [3, 3, 4, 4, 5, 5],
    ]
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(30, 3, generator=g, dtype=torch.float64), dim=1)
    init = torch.arange(30) % 4
    got = spherical_kmeans(x, init, 4, 5)
    labels = init.clone()
    for _ in range(5):
        protos = _naive_protos(x, labels, 4)
        labels = torch.tensor([max(range(4), key=lambda s: float(protos[s] @ x[i])) for i in range(30)])
    assert torch.equal(got, labels)
    torch.testing.assert_close(segment_prototypes(x, labels, 4), _naive_protos(x, labels, 4))


def _tiny_batch(seed=0, with_grad=True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64).requires_grad_(with_grad)
    label = torch.full((2, 4, 6), U)
    label[0, :2, :2] = 0
    label[0, 3, 4:] = 2
    label[1, 0, :3] = 0
    label[1, 2:, 5] = 1
    region = (torch.arange(6)[None, None, :] // 3).expand(2, 4, 6) + 2 * (torch.arange(4)[None, :, None] // 2)
    tags = torch.tensor([[False, True], [True, False]])  # classes 1, 2 (background left out)
    valid = torch.ones(2, 4, 6, dtype=torch.bool)
    valid[1, :, 0] = False  # crop padding
    return emb, make_batch(emb, label, region, tags, (2, 2), 3, valid)


def _pixel_sets(batch, rule):
    """Per pixel: (own segment, positives, negatives) from a predicate on (pixel, segment)."""
    out = []
    for i in range(len(batch.seg)):
        pos, neg = [], []
        for t in range(len(batch.seg_image)):
            r = rule(i, t)
            if r is True:
                pos.append(t)
            elif r is False:
                neg.append(t)
        out.append((int(batch.seg[i]), pos, neg))
    return out


def test_batch_segments_split_clusters_by_label_and_region():
    _, b = _tiny_batch(with_grad=False)
    assert len(b.seg) == 24 + 20  # padding left out
    for t in range(len(b.seg_image)):
        m = b.seg == t
        assert (b.image[m] == b.seg_image[t]).all() and (b.label[m] == b.seg_label[t]).all()
        assert (b.region[m] == b.seg_region[t]).all()
    torch.testing.assert_close(b.emb.norm(dim=1), torch.ones(44, dtype=torch.float64))


def test_semantic_annotation_term_with_memory_against_the_loop():
    emb, b = _tiny_batch()
    n = len(b.seg_image)
    protos = segment_prototypes(b.emb, b.seg, n)
    g = torch.Generator().manual_seed(3)
    mem = Memory(
        F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1),
        torch.tensor([1, U, 0]),
        torch.tensor([[True, False], [False, True], [False, False]]),
    )
    got = semantic_annotation_loss(b, protos, U, 6.0, mem)
    allp = torch.cat([_naive_protos(b.emb, b.seg, n), mem.protos])
    all_lab = torch.cat([b.seg_label, mem.label]).tolist()
    terms = []
    for i in range(len(b.seg)):
        if int(b.label[i]) == U:
            continue
        kept = [t for t in range(len(all_lab)) if all_lab[t] != U]
        pos = [t for t in kept if all_lab[t] == int(b.label[i])]
        neg = [t for t in kept if all_lab[t] != int(b.label[i])]
        terms.append(_naive_nll(b.emb[i], allp, int(b.seg[i]), pos, neg, 6.0))
    want = torch.stack(terms).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    a = torch.autograd.grad(got, emb, retain_graph=True)[0]
    c = torch.autograd.grad(want, emb)[0]
    torch.testing.assert_close(a, c)


def test_co_occurrence_term_against_the_loop():
    emb, b = _tiny_batch(1)
    n = len(b.seg_image)
    protos = segment_prototypes(b.emb, b.seg, n)
    mem = Memory(
        F.normalize(torch.ones(2, 5, dtype=torch.float64), dim=1),
        torch.tensor([0, 1]),
        torch.tensor([[True, False], [False, True]]),
    )
    got = co_occurrence_loss(b, protos, 8.0, mem)
    allp = torch.cat([_naive_protos(b.emb, b.seg, n), mem.protos])
    seg_tags = [b.tags[int(b.seg_image[t])].tolist() for t in range(n)] + mem.tags.tolist()
    terms = []
    for i in range(len(b.seg)):
        mine = b.tags[int(b.image[i])].tolist()
        pos, neg = [], []
        for t in range(len(seg_tags)):
            share = any(x and y for x, y in zip(mine, seg_tags[t]))
            same = t < n and int(b.seg_image[t]) == int(b.image[i])
            (pos if share or same else neg).append(t)
        terms.append(_naive_nll(b.emb[i], allp, int(b.seg[i]), pos, neg, 8.0))
    want = torch.stack(terms).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, emb, retain_graph=True)[0], torch.autograd.grad(want, emb)[0])


def test_image_similarity_term_against_the_loop():
    emb, b = _tiny_batch(2)
    got = image_similarity_loss(b, 16.0)
    per_image = []
    for img in (0, 1):
        pix = [i for i in range(len(b.seg)) if int(b.image[i]) == img]
        segs = [t for t in range(len(b.seg_image)) if int(b.seg_image[t]) == img]
        protos = {}
        for t in segs:
            v = sum(b.emb_loc[i] for i in pix if int(b.seg[i]) == t)
            protos[t] = v / v.norm()
        terms = []
        for i in pix:
            num_pos = [t for t in segs if int(b.seg_region[t]) == int(b.region[i])]
            pos_other = [t for t in num_pos if t != int(b.seg[i])] or [int(b.seg[i])]
            den = set(pos_other) | {t for t in segs if int(b.seg_region[t]) != int(b.region[i])}
            e = b.emb_loc[i]
            num = sum(torch.exp(16.0 * (protos[t] * e).sum()) for t in pos_other)
            terms.append(-torch.log(num / sum(torch.exp(16.0 * (protos[t] * e).sum()) for t in den)))
        per_image.append(torch.stack(terms).mean())
    want = torch.stack(per_image).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, emb, retain_graph=True)[0], torch.autograd.grad(want, emb)[0])


def test_feature_affinity_labels_unlabelled_segments_by_their_nearest_labelled_one():
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [-1.0, 0.0]]), dim=1)
    lab = torch.tensor([0, 1, U, U, U])
    assert nearest_labelled(protos, lab, U).tolist() == [0, 1, 0, 1, 1]  # [-1, 0]: cos -1 vs 0 -> class 1
    emb, b = _tiny_batch(4)
    protos = segment_prototypes(b.emb, b.seg, len(b.seg_image))
    got = feature_affinity_loss(b, protos, U, 6.0)
    seg_lab = nearest_labelled(protos, b.seg_label, U)
    assert (seg_lab != U).all()
    want = semantic_annotation_loss(b, protos, U, 6.0, labels=seg_lab[b.seg], seg_labels=seg_lab)
    assert float(got.detach()) == pytest.approx(float(want))
    assert float(got.detach()) != pytest.approx(float(semantic_annotation_loss(b, protos, U, 6.0)))


def test_embedding_walk_against_the_transition_loop():
    from models.spml import embedding_walk

    g = torch.Generator().manual_seed(5)
    emb = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)  # stride-4 grid of a 16 x 24 image
    logits = torch.randn(4, 4, 6, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 2, 3])
    got = embedding_walk(emb, logits, ids, (16, 24), 2.0, 5.0, 2)
    grid = (2, 3)
    e = F.normalize(F.interpolate(emb[None], size=grid, mode="bilinear", align_corners=False)[0], dim=0).flatten(1)
    p = torch.softmax(F.interpolate(logits[None], size=grid, mode="bilinear", align_corners=False)[0], 0)
    m = p[ids].flatten(1)
    m = m / m.max(1, keepdim=True).values
    n = e.shape[1]
    a = [[math.exp(5.0 * (float(e[:, i] @ e[:, j]) - 1.0)) ** 2.0 for j in range(n)] for i in range(n)]
    t = [[a[i][j] / sum(a[k][j] for k in range(n)) for j in range(n)] for i in range(n)]
    walked = m.clone()
    for _ in range(2**2):  # M T, four times
        walked = torch.stack(
            [torch.stack([sum(walked[c, i] * t[i][j] for i in range(n)) for j in range(n)]) for c in range(len(ids))]
        )
    up = F.interpolate(walked.view(1, len(ids), *grid), size=(16, 24), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got.double(), up / up.sum(0, keepdim=True), rtol=1e-4, atol=1e-6)
    assert got.shape == (3, 16, 24)


def test_spml_stages_join_the_dag_only_for_method_spml_and_feed_the_crf(tmp_path):
    from pipeline.runner import make_run

    from .conftest import demo_config

    assert "spml_train" not in make_run(demo_config(tmp_path / "off")).names
    run = make_run(demo_config(tmp_path / "on", method="spml"))
    names = run.names
    assert names.index("seeds") < names.index("spml_train") < names.index("spml") < names.index("crf")
    assert run.spec("crf").inputs(run.config) == ["spml"]
    run = make_run(demo_config(tmp_path / "kept", method="spml", crf__input="a2gnn"))
    assert run.spec("crf").inputs(run.config) == ["a2gnn"] and "spml" in run.names


def test_spml_train_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    import stages.spml_train as st
    from .conftest import TINY_TRAINING
    from pipeline.runner import make_run, run_local

    from .conftest import assert_same_training, demo_config, kill_and_resume

    def make(path):
        return demo_config(
            path,
            method="spml",
            spml_train={**TINY_TRAINING["spml_train"], "iterations": 4, "checkpoint_every": 2, "weight_affinity": 0.5},
        )

    for sub in ("a", "b"):
        run = make_run(make(tmp_path / sub))
        run_local(run, run.names[: run.names.index("seeds") + 1])
    m1, m2, s1, s2 = kill_and_resume(tmp_path, monkeypatch, make, "spml_train", st, "spml_objective")
    assert_same_training(m1, m2, s1, s2)
    assert m1["info"]["terms"] == ["ce", "annotation", "occurrence", "image", "affinity"]


def test_bench_spml_train_rows(tmp_path):
    from .conftest import bench_rows

    train, infer = bench_rows(
        tmp_path,
        "spml_train",
        "--images",
        "2",
        "--size",
        "96x64",
        "--opt",
        "depth=18",
        "--opt",
        "batch=2",
        "--opt",
        "crop=64",
    )
    assert "spml_train step resnet18" in train["case"] and "memory 2" in train["case"]
    assert "random walk" in infer["case"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in (train, infer))
