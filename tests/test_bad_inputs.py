"""Hostile and damaged inputs: each ends in one line naming the file and what is wrong, and
none is read silently wrong (EXIF orientation, COCO / VOC boxes and ids, configs, disk full,
damaged checkpoints, edited inputs, pickled code)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, MasksDataset, WeakConfig, config_from_dict, dump_config, load_config
from pipeline.datasets import MasksData, build_dataset, read_image
from pipeline.runner import WorkKind, make_run, needs_work, run_local, run_stage_local
from pipeline.store import StageStore, UnsafeFile, read_label_png
from stages.base import DataError

from .conftest import bench_rows, horse_config, horse_subset
from .test_datasets import OBJ, XML, make_voc, voc  # noqa: F401 (the voc fixture)
from .test_own_data import coco_config, coco_tree

ORIENT_6 = 6  # EXIF: the stored pixels are shown turned 90 degrees clockwise


def _exif6(img: Image.Image) -> Image.Image.Exif:
    exif = img.getexif()
    exif[0x0112] = ORIENT_6
    return exif


def _stored_for_orientation_6(shown: Image.Image) -> Image.Image:
    """The pixels a camera stores for ``shown`` with orientation 6 (viewers turn them clockwise)."""
    return shown.transpose(Image.Transpose.ROTATE_90)


@pytest.mark.parametrize("square", [False, True])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, horses, square):
    shown = Image.open(horses / "rgb" / "horse001.jpg").convert("RGB")
    mask = Image.open(horses / "figure_ground" / "horse001.jpg").convert("L").resize(shown.size)
    if square:
        side = min(shown.size)
        shown, mask = shown.crop((0, 0, side, side)), mask.crop((0, 0, side, side))
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stored = _stored_for_orientation_6(shown)
    stored.save(root / "images" / "a.jpg", quality=95, exif=_exif6(stored))
    mask.save(root / "masks" / "a.png")
    data = MasksData(MasksDataset(root=str(root), val_fraction=0.0), WeakConfig(), "box")
    image = data.load_image("a")
    raw = np.asarray(Image.open(root / "images" / "a.jpg").convert("RGB"))
    assert image.shape[:2] == np.asarray(mask).shape  # upright, as the mask is drawn
    assert np.array_equal(image, np.rot90(raw, k=-1))
    # upright, the horse's pixels are where its mask is: foreground and background colours differ
    # as in the original; read as stored, a square image would mix them
    fg = np.asarray(mask) >= 128
    ref = np.asarray(shown).astype(float)
    gap = abs(ref[fg].mean() - ref[~fg].mean())
    assert abs(image[fg].astype(float).mean() - image[~fg].astype(float).mean()) > 0.8 * gap
    assert read_image(root / "images" / "a.jpg").shape == image.shape


def test_exif_orientation_of_a_label_png_turns_it_like_its_image(tmp_path):
    label = np.zeros((20, 30), np.uint8)
    label[2:5, 20:28] = 1
    stored = _stored_for_orientation_6(Image.fromarray(label, mode="L"))
    stored.save(tmp_path / "s.png", exif=_exif6(stored))
    assert np.array_equal(read_label_png(tmp_path / "s.png"), label)


# ----------------------------------------------------------------------------- COCO
def _coco_variant(root: Path, edit) -> str:
    data = json.loads((root / "train.json").read_text())
    edit(data)
    (root / "variant.json").write_text(json.dumps(data))
    return "variant.json"


def test_coco_duplicate_image_ids_are_refused_naming_both(horses, tmp_path):
    root, _ = coco_tree(tmp_path, horses)

    def dup(d):
        d["images"][1]["id"] = d["images"][0]["id"]

    with pytest.raises(DataError, match=r"variant\.json: images 'horse001\.jpg' and 'horse002\.jpg' share the id 100"):
        build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, dup)))


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"])
def test_coco_file_names_that_leave_the_image_folder_fail_that_image(horses, tmp_path, name):
    root, _ = coco_tree(tmp_path, horses)
    (tmp_path / "outside.jpg").write_bytes((horses / "rgb" / "horse001.jpg").read_bytes())

    def escape(d):
        d["images"][0]["file_name"] = name

    data = build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, escape)))
    bad = Path(name).stem
    assert bad in data.ids("train")
    for read in (data.load_image, data.load_weak, data.image_path):
        with pytest.raises(DataError, match=r"variant\.json: image 100: file_name .* leaves the image folder"):
            read(bad)
    assert data.load_image("horse002").shape[2] == 3  # the other images go on


def test_coco_without_a_usable_annotation_stops_before_any_work(horses, tmp_path):
    root, _ = coco_tree(tmp_path, horses)

    def empty(d):
        d["annotations"] = []

    with pytest.raises(DataError, match=r"variant\.json: no usable annotation .* background alone"):
        build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, empty)))


@pytest.mark.parametrize(
    "bbox,problem",
    [
        ([math.nan, 1.0, 5.0, 5.0], "not finite"),
        ([1.0, 1.0, math.inf, 5.0], "not finite"),
        ([1.0, 1.0, -5.0, 5.0], "negative width or height"),
        (["a", 1, 5, 5], "not a number"),
    ],
)
def test_coco_bad_boxes_fail_their_image_naming_the_annotation(horses, tmp_path, bbox, problem):
    root, _ = coco_tree(tmp_path, horses)

    def bad(d):
        d["annotations"][1]["bbox"] = bbox  # horse002's object

    data = build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, bad)))
    with pytest.raises(DataError, match=rf"variant\.json: annotation 11 \(horse002\.jpg\): box .*{problem}"):
        data.load_weak("horse002")
    assert len(data.load_weak("horse001").boxes) == 1


@pytest.mark.parametrize(
    "corners,problem",
    [(("nan", 1, 5, 5), "not finite"), ((1, 1, "inf", 5), "not finite"), ((20, 1, 5, 5), "inverted")],
)
def test_voc_bad_boxes_name_the_file_and_the_object(voc, corners, problem):  # noqa: F811 (fixture)
    x0, y0, x1, y1 = corners
    (voc / "Annotations" / "b.xml").write_text(
        XML.format(id="b", objects=OBJ.format(name="horse", x0=x0, y0=y0, x1=x1, y1=y1))
    )
    with pytest.raises(DataError, match=rf"b\.xml: object 'horse': <bndbox> box .*{problem}"):
        make_voc(voc).load_weak("b")


def test_a_coco_image_turned_by_its_exif_against_the_json_says_so(horses, tmp_path):
    root, _ = coco_tree(tmp_path, horses)
    path = root / "images" / "horse001.jpg"
    pixels = Image.open(path).convert("RGB")
    path.unlink()  # a symlink to the shared data: replaced, not written through
    # the pixels the JSON's width and height describe, tagged to be shown turned
    pixels.save(path, quality=95, exif=_exif6(pixels))
    data = build_dataset(coco_config(root, tmp_path))
    with pytest.raises(DataError, match=r"horse001\.jpg: image is .* \(upright, after its EXIF orientation"):
        data.load_image("horse001")


@pytest.mark.parametrize(
    "box,problem",
    [([1, 2, float("nan"), 9, 1], "not finite"), ([30, 2, 5, 9, 1], "inverted"), ([1, 2, 3], "needs \\[x0")],
)
def test_own_boxes_json_with_bad_boxes_names_the_image(tmp_path, box, problem):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "weak").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(root / "images" / "a.png")
    (root / "weak" / "boxes.json").write_text(json.dumps({"a": [box]}))  # NaN as JSON writes it
    cfg = MasksDataset(root=str(root), weak_dir=str(root / "weak"), class_names=["background", "x"])
    with pytest.raises(DataError, match=rf"boxes\.json: image 'a': .*{problem}"):
        MasksData(cfg, WeakConfig(), "box").load_weak("a")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (bytes(range(256)) * 4, "not a text"),
        (b"\xff\xfe\x00r\x00u\x00n", "not a text"),
        (b"- a\n- list\n", "expected a mapping"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"c\.yaml: .*{message}"):
        load_config(path)


# ----------------------------------------------------------------------------- checkpoints
class _Payload:
    """What a planted checkpoint carries: an object whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _killed_cam_run(tmp_path, monkeypatch):
    """cam_train (4 steps, a checkpoint after each) killed in step 4: ckpt-2 and ckpt-3 kept."""
    import stages.cam_train as ct

    from .test_cam import _tiny

    run = make_run(_tiny(tmp_path, cam_train__checkpoint_every=1))
    real, calls = ct.classification_loss, {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ct, "classification_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage_local(run, "cam_train")
    monkeypatch.setattr(ct, "classification_loss", real)
    store = run.store("cam_train")
    assert [p.name for p in store.checkpoints()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    return run, store


def test_a_truncated_checkpoint_resumes_from_the_one_before(tmp_path, monkeypatch, caplog):
    run, store = _killed_cam_run(tmp_path, monkeypatch)
    last = store.checkpoint_path(3)
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="wsss"):
        m = run_stage_local(run, "cam_train")
    assert m["status"] == "complete" and m["info"]["resumed_from"] == 2
    assert any(
        "ckpt-00000003.pt" in r.message and "resuming from ckpt-00000002.pt" in r.message for r in caplog.records
    )


def test_damaged_checkpoints_fall_back_to_the_start_and_an_unrecorded_one_is_checked_by_loading(tmp_path, caplog):
    store = StageStore(tmp_path, "s", "f", "model")
    store.save_checkpoint(1, {"w": torch.ones(3)})
    store.save_checkpoint(2, {"w": torch.full((3,), 2.0)})
    data = bytearray(store.checkpoint_path(2).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another hash
    store.checkpoint_path(2).write_bytes(bytes(data))
    assert store.latest_checkpoint()[0] == 1 and [p.name for p in store.checkpoints()] == ["ckpt-00000001.pt"]
    store.checkpoint_path(1).with_suffix(".json").unlink()  # a checkpoint without its record
    store.checkpoint_path(1).write_bytes(b"PK\x03\x04 cut")
    with caplog.at_level(logging.WARNING, logger="wsss"):
        assert store.latest_checkpoint() is None
    assert "damaged or truncated" in caplog.text and "training from the start" in caplog.text


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    store = StageStore(tmp_path, "s", "f", "model")
    store.dir.mkdir(parents=True)
    torch.save({"state_dict": {}, "x": _Payload(marker)}, store.model_path)
    with pytest.raises(UnsafeFile, match=r"model\.pt: holds more than tensors and plain data.*refused"):
        store.read_model()
    torch.save({"model": _Payload(marker)}, store.checkpoint_path(5))
    with pytest.raises(UnsafeFile, match=r"ckpt-00000005\.pt: holds more than tensors"):
        store.latest_checkpoint()
    assert not marker.exists()
    with pytest.raises(TypeError, match=r"state\['x'\]: _Payload is not a tensor or plain data"):
        store.write_model({"x": _Payload(marker)})


def test_a_planted_checkpoint_in_a_stage_folder_stops_the_resume_in_one_line(tmp_path, monkeypatch):
    run, store = _killed_cam_run(tmp_path, monkeypatch)
    marker = tmp_path / "ran"
    torch.save({"model": _Payload(marker)}, store.checkpoint_path(9))
    (tmp_path / "c.yaml").write_text(dump_config(run.config))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "--only", "cam_train"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "ckpt-00000009.pt: holds more than tensors" in said, said
    assert "Traceback" not in said and not marker.exists()


# ----------------------------------------------------------------------------- the disk
@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(folder, make_room): a folder on a 40 KiB tmpfs where the test may mount one, else one
    whose store writes fail with ENOSPC after the first 12; ``make_room()`` ends the shortage."""
    import errno
    import subprocess

    import pipeline.store as store_module

    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(folder)]
    if os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
        subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    real, calls = store_module.atomic_write, {"n": 0}

    def filling(path, write):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(store_module, "atomic_write", filling)
    yield folder, lambda: monkeypatch.setattr(store_module, "atomic_write", real)


def test_a_full_disk_stops_in_one_line_loses_nothing_and_the_rerun_completes(tmp_path, horses, small_disk):
    folder, make_room = small_disk
    root = horse_subset(tmp_path, horses)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**horse_config(tmp_path, root), "output_root": str(folder)}))
    res = CliRunner().invoke(app, ["run", str(config), "--only", "box_seeds"])
    said = " ".join(res.output.split())  # rich wraps long paths
    assert res.exit_code == 3, said
    assert "No space left on device; nothing finished is lost" in said and "Traceback" not in said
    run = make_run(load_config(config))
    store = run.store("box_seeds")
    assert store.failures() == {}  # the disk's fault is no image's failure
    done = store.done_ids()
    assert 0 < len(done) < 6
    stamps = {i: store.item_path(i).stat().st_mtime_ns for i in done}
    make_room()
    res = CliRunner().invoke(app, ["run", str(config), "--only", "box_seeds"])
    assert res.exit_code == 0, res.output
    assert len(store.done_ids()) == 6 and {i: store.item_path(i).stat().st_mtime_ns for i in done} == stamps


def test_a_read_only_output_root_is_one_line_with_exit_3(tmp_path, monkeypatch):
    import errno

    import pipeline.runner as runner

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(runner, "atomic_write_text", read_only)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": "t", "output_root": str(tmp_path / "ro"), "engine": "local"}))
    res = CliRunner().invoke(app, ["run", str(config), "--only", "box_seeds"])
    said = " ".join(res.output.split())
    assert res.exit_code == 3 and "Read-only file system" in said and "config.yaml" in said, said
    assert "Traceback" not in said


# ----------------------------------------------------------------------------- edited inputs
def test_an_edited_image_or_mask_recomputes_exactly_the_items_that_read_it(tmp_path, horses):
    root = horse_subset(tmp_path, horses)
    cfg = config_from_dict(horse_config(tmp_path, root))
    names = ["box_seeds", "seeds", "affinity_train", "graph"]
    run_local(make_run(cfg), names)

    def mtimes(run, name):
        store = run.store(name)
        return {p.relative_to(store.dir).as_posix(): p.stat().st_mtime_ns for p in store.items_dir.rglob("*.*")}

    run = make_run(cfg)
    before = {n: mtimes(run, n) for n in ("box_seeds", "seeds", "graph")}
    model = run.store("affinity_train").model_path.stat().st_mtime_ns
    image = root / "rgb" / "horse003.jpg"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image, quality=95)
    work = needs_work(run, "box_seeds")
    assert work.kind is WorkKind.EDITED and "horse003" in work.why
    run_local(make_run(cfg), names)
    for name in ("box_seeds", "seeds"):
        after = mtimes(run, name)
        changed = {k for k in after if after[k] != before[name][k]}
        assert changed and {Path(k).stem for k in changed} == {"horse003"}, (name, changed)
    # the affinity net learnt from the old image: it is trained again, and the graphs follow
    assert run.store("affinity_train").model_path.stat().st_mtime_ns != model
    assert all(v != before["graph"][k] for k, v in mtimes(run, "graph").items())
    assert all(needs_work(run, n) is None for n in names)

    # an edited mask: `eval` says its scores are stale, `run` recomputes that image and rescores
    mask = root / "figure_ground" / "horse005.jpg"
    old = run.store("box_seeds").read_manifest()["metrics"]["miou"]
    Image.open(mask).convert("L").point(lambda v: 255 - v).save(mask, quality=95)
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "c.yaml"), "--stage", "box_seeds"])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "1 image(s) changed since box_seeds ran (e.g. horse005)" in said, said
    run_local(make_run(cfg), ["box_seeds"])
    after = mtimes(run, "box_seeds")
    assert {Path(k).stem for k in after if after[k] != before["box_seeds"].get(k)} == {"horse003", "horse005"}
    assert run.store("box_seeds").read_manifest()["metrics"]["miou"] != pytest.approx(old, abs=1e-3)


def test_bench_stamps_rows(tmp_path):
    rows = bench_rows(tmp_path, "stamps", "--images", "30", "--opt", "image_kb=4")
    assert [r["images"] for r in rows] == [30, 30, 30] and rows[0]["case"].startswith("stamp: size + mtime")
    assert rows[1]["json_bytes"] == len(json.dumps({f"{k:06d}": "0" * 16 for k in range(30)}, separators=(",", ":")))


def test_prefect_logs_no_traceback_of_an_error_the_cli_reports_in_one_line():
    import errno

    from pipeline.flow import ONE_LINE

    def record(err: BaseException | None, message: str = "Task run failed with exception") -> logging.LogRecord:
        exc_info = (type(err), err, None) if err is not None else None
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, None, exc_info)

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/items/a.png")
    assert not ONE_LINE.filter(record(full)) and not ONE_LINE.filter(record(DataError("a.jpg", "truncated")))
    failed = "Finished in state Failed('Task run encountered an exception OSError: [Errno 28] No space left')"
    assert not ONE_LINE.filter(record(None, failed))
    # anything else is a bug: its traceback is kept
    assert ONE_LINE.filter(record(ValueError("bug"))) and ONE_LINE.filter(record(None, "exception ValueError: x"))
