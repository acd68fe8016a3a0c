import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd.data import shapes
from d2kd.data.shapes import (
    CLASSES,
    ensure_shapes_generated,
    generate_shapes_split,
    register_shapes_datasets,
)

SIZE = 96


def _read_split(root, split):
    with open(os.path.join(root, f"{split}.json")) as f:
        coco = json.load(f)
    images = {}
    for im in coco["images"]:
        with open(os.path.join(root, split, im["file_name"]), "rb") as f:
            images[im["file_name"]] = f.read()
    return coco, images


def test_same_seed_gives_identical_files(tmp_path):
    generate_shapes_split(str(tmp_path / "a"), "train", 4, seed=3, image_size=SIZE)
    generate_shapes_split(str(tmp_path / "b"), "train", 4, seed=3, image_size=SIZE)
    generate_shapes_split(str(tmp_path / "c"), "train", 4, seed=4, image_size=SIZE)
    coco_a, images_a = _read_split(tmp_path / "a", "train")
    coco_b, images_b = _read_split(tmp_path / "b", "train")
    coco_c, images_c = _read_split(tmp_path / "c", "train")
    assert coco_a == coco_b
    assert images_a == images_b
    assert images_a != images_c


def test_boxes_inside_image_and_all_classes_present(tmp_path):
    generate_shapes_split(str(tmp_path), "val", 40, seed=0, image_size=SIZE)
    coco, _ = _read_split(tmp_path, "val")
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert len(CLASSES) >= 6
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert all(s == (SIZE, SIZE) for s in sizes.values())
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert w >= 1 and h >= 1 and ann["area"] > 0
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert ann["iscrowd"] == 0
    assert {a["category_id"] for a in coco["annotations"]} == set(range(1, len(CLASSES) + 1))
    # Several instances per image on average.
    assert len(coco["annotations"]) >= 2 * len(coco["images"])


@pytest.fixture
def tiny_registry(tmp_path, monkeypatch):
    """Register the shapes datasets on a tmp root with tiny splits; restore afterwards."""
    monkeypatch.setattr(shapes, "SPLITS", {"train": (3, 0), "val": (2, 1)})
    monkeypatch.setattr(shapes, "IMAGE_SIZE", SIZE)
    register_shapes_datasets(str(tmp_path))
    yield tmp_path
    register_shapes_datasets()


def test_registration_is_lazy_idempotent_and_loads_records(tiny_registry):
    root = tiny_registry
    register_shapes_datasets(str(root))  # a second call with the same root is a no-op
    assert not os.path.exists(root / "train.json")
    records = DatasetCatalog.get("d2kd_shapes_train")
    assert len(records) == 3
    assert sum(len(r["annotations"]) for r in records) > 0
    assert all(os.path.isfile(r["file_name"]) for r in records)
    meta = MetadataCatalog.get("d2kd_shapes_val")
    assert meta.thing_classes == CLASSES
    assert meta.evaluator_type == "coco"
    assert ensure_shapes_generated("d2kd_shapes_val") == meta.json_file
    assert os.path.isfile(meta.json_file)


def test_interrupted_generation_is_redone(tiny_registry):
    root = tiny_registry
    json_file = ensure_shapes_generated("d2kd_shapes_train")
    # An interruption leaves images but no json (the json is written last).
    os.remove(json_file)
    os.remove(root / "train" / "000001.png")
    assert ensure_shapes_generated("d2kd_shapes_train") == json_file
    assert os.path.isfile(root / "train" / "000001.png")
    assert len(DatasetCatalog.get("d2kd_shapes_train")) == 3


def test_package_import_registers_and_is_idempotent():
    import importlib

    import d2kd.data

    importlib.reload(d2kd.data)  # registering again must not raise "already registered"
    assert "d2kd_shapes_train" in DatasetCatalog.list()
    assert "d2kd_shapes_val" in DatasetCatalog.list()
