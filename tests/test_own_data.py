"""A user's own data: teacher paths inherited through ``_BASE_``, the prototype period in
epochs, and the pre-flight report of tools/inspect_dataset.py."""
import os

import pytest

from d2kd.config import load_config, resolve_teacher_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_shipped_distillation_config_inherited_from_another_folder_resolves_its_teacher(tmp_path, monkeypatch):
    """The user's config lives elsewhere and inherits a shipped GK config by absolute path: the
    shipped file's relative teacher path is resolved beside the shipped file."""
    monkeypatch.chdir(tmp_path)
    mine = _write(tmp_path / "mine" / "my_gk.yaml", (
        f'_BASE_: "{os.path.join(SHAPES, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")}"\n'
        "SOLVER:\n  IMS_PER_BATCH: 2\n"))
    cfg = load_config(mine)
    expected = os.path.join(SHAPES, "faster_rcnn_R_18_FPN_1k_shapes.yaml")
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == expected
    assert resolve_teacher_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE) == expected
    from d2kd.modeling.teacher import build_teacher_cfg

    assert build_teacher_cfg(cfg).MODEL.FPN.OUT_CHANNELS == 64  # the shipped teacher's config


def test_each_level_of_base_resolves_the_teacher_it_writes_and_an_override_wins(tmp_path, monkeypatch):
    """top.yaml -> mid/mid.yaml -> <shipped gk config>: the value written lowest in the chain
    (nearest the top) wins and is resolved beside the file that wrote it; opts stay as typed."""
    monkeypatch.chdir(tmp_path)
    gk = os.path.join(SHAPES, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")
    teacher_text = f'_BASE_: "{os.path.join(SHAPES, "faster_rcnn_R_18_FPN_1k_shapes.yaml")}"\n'
    _write(tmp_path / "mid" / "teachers" / "t.yaml", teacher_text)
    _write(tmp_path / "top" / "teachers" / "t.yaml", teacher_text)  # same name, other folder
    mid = _write(tmp_path / "mid" / "mid.yaml", f'_BASE_: "{gk}"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "teachers/t.yaml"\n')
    # inherits mid's teacher: resolved beside mid.yaml, not beside top.yaml (which has a t.yaml too)
    top = _write(tmp_path / "top" / "top.yaml", '_BASE_: "../mid/mid.yaml"\nSEED: 3\n')
    assert load_config(top).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "mid" / "teachers" / "t.yaml")
    # a file nearer the top overrides: its own folder counts
    over = _write(tmp_path / "top" / "over.yaml", '_BASE_: "../mid/mid.yaml"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "teachers/t.yaml"\n')
    assert load_config(over).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "top" / "teachers" / "t.yaml")
    # a list of bases: the later one wins, as fvcore merges them
    listed = _write(tmp_path / "top" / "listed.yaml", f'_BASE_: ["{gk}", "../mid/mid.yaml"]\n')
    assert load_config(listed).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "mid" / "teachers" / "t.yaml")
    # the command line is taken as typed (the working directory's, when the teacher is built)
    typed = load_config(top, ["DISTILL.TEACHER.CONFIG_FILE", "teachers/t.yaml"])
    assert typed.DISTILL.TEACHER.CONFIG_FILE == "teachers/t.yaml"
    # a model-zoo name stays a name
    zoo = _write(tmp_path / "top" / "zoo.yaml", f'_BASE_: "{gk}"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"\n')
    assert load_config(zoo).DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"


def _box_records(n_with_boxes, n_empty, size=64, box=(4, 4, 40, 40), category=0):
    records = [{"file_name": f"img{i}.png", "image_id": i, "height": size, "width": size,
                "annotations": [{"bbox": list(box), "bbox_mode": 0, "category_id": category, "iscrowd": 0}]}
               for i in range(n_with_boxes)]
    records += [{"file_name": f"empty{i}.png", "image_id": n_with_boxes + i, "height": size, "width": size,
                 "annotations": []} for i in range(n_empty)]
    return records


@pytest.fixture
def ten_image_dataset():
    """A registered training set of 12 records, 2 of them without boxes: 10 images after
    detectron2's filtering."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"d2kd_test_ten_images_{os.getpid()}"
    DatasetCatalog.register(name, lambda: _box_records(10, 2))
    MetadataCatalog.get(name).thing_classes = ["thing"]
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _epoch_cfg(dataset, **prototypes):
    from detectron2.config import get_cfg

    from d2kd.config import add_distill_config

    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.MAX_ITER = 20
    for k, v in prototypes.items():
        cfg.DISTILL.PROTOTYPES[k] = v
    return cfg


def test_the_prototype_period_in_epochs_follows_the_training_set_and_the_batch(ten_image_dataset, monkeypatch):
    """10 images at 4 per batch: 2.5 iterations an epoch, rounded up per schedule entry. The
    epoch keys replace inherited iterations, and the hook logs the iterations it will use."""
    from d2kd.engine import prototype_refresh
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    logged = []
    monkeypatch.setattr(prototype_refresh.logger, "info", logged.append)
    cfg = _epoch_cfg(ten_image_dataset, START_ITER=250, PERIOD=250, START_EPOCHS=1.0, PERIOD_EPOCHS=2.0)
    hook = PrototypeRefreshHook(cfg)
    assert (hook.start_iter, hook.period) == (3, 5)
    assert len(hook._dataset) == 10  # the list it built the schedule from is the prototypes' source
    message = logged[-1]
    assert "first build at iteration 3 (DISTILL.PROTOTYPES.START_EPOCHS 1, which replaces START_ITER 250)" in message
    assert "rebuilt every 5 iterations (DISTILL.PROTOTYPES.PERIOD_EPOCHS 2" in message
    assert "an epoch is 2.5 iterations (10 images of DATASETS.TRAIN" in message
    assert "4 build(s) in SOLVER.MAX_ITER 20" in message  # iterations 3, 8, 13, 18
    from types import SimpleNamespace

    bank = SimpleNamespace(is_built=False)
    monkeypatch.setattr(hook, "_model", lambda: SimpleNamespace(prototype_bank=bank))
    builds = []
    for it in range(cfg.SOLVER.MAX_ITER):
        if hook.is_due(it):
            builds.append(it)
            bank.is_built = True
    assert builds == [3, 8, 13, 18]

    cfg.SOLVER.IMS_PER_BATCH = 2  # half the batch: twice the iterations
    half = PrototypeRefreshHook(cfg)
    assert (half.start_iter, half.period) == (5, 10)
    # without epoch keys the iterations are used as given, and the training set is not loaded
    plain = PrototypeRefreshHook(_epoch_cfg(ten_image_dataset, START_ITER=7, PERIOD=4))
    assert (plain.start_iter, plain.period, plain._dataset) == (7, 4, None)
    assert "first build at iteration 7 (DISTILL.PROTOTYPES.START_ITER), rebuilt every 4 iterations" in logged[-1]


def test_a_bad_or_unreachable_prototype_schedule_is_named(ten_image_dataset):
    from d2kd.engine.prototype_refresh import prototype_schedule

    with pytest.raises(ValueError, match=r"DISTILL.PROTOTYPES.PERIOD_EPOCHS = -1.0 is negative"):
        prototype_schedule(_epoch_cfg(ten_image_dataset, PERIOD_EPOCHS=-1.0), 10)
    late = prototype_schedule(_epoch_cfg(ten_image_dataset, START_EPOCHS=8.0), 10)  # iteration 20
    assert late.builds == 0 and "never built" in late.warnings[0] and "START_EPOCHS" in late.warnings[0]


GK_SHAPES = os.path.join(SHAPES, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")


def _inspect_main():
    import runpy

    return runpy.run_path(os.path.join(REPO, "tools", "inspect_dataset.py"), run_name="d2kd_inspect_under_test")["main"]


def test_the_inspect_report_on_the_built_in_data_matches_the_json_the_loader_and_the_refresh_hook(capsys):
    """The numbers against independent counts: the json's annotations, detectron2's filtered
    training set, the shapes config's anchors, and what the refresh hook feeds the model."""
    import json
    from collections import Counter

    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2kd.data.preflight import preflight
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook, annotated_test_mapper

    cfg = load_config(GK_SHAPES)
    DatasetCatalog.get("d2kd_shapes_train")  # generated on first use
    report = preflight(cfg)
    meta = MetadataCatalog.get("d2kd_shapes_train")
    with open(meta.json_file) as f:
        data = json.load(f)
    to_class = meta.thing_dataset_id_to_contiguous_id
    per_class = Counter(to_class[a["category_id"]] for a in data["annotations"])
    with_boxes = len({a["image_id"] for a in data["annotations"]})

    train = report.datasets[0]
    assert (train.name, train.records, train.with_boxes, train.boxes) == ("d2kd_shapes_train", len(data["images"]),
                                                                         with_boxes, len(data["annotations"]))
    assert (report.train_images, report.iterations_per_epoch) == (with_boxes, with_boxes / 4)
    assert (report.train_images, report.iterations_per_epoch) == (995, 248.75)  # the built-in set, v2
    assert report.anchors == [("p2", 4, [12.0]), ("p3", 8, [24.0]), ("p4", 16, [48.0]), ("p5", 32, [96.0]),
                              ("p6", 64, [192.0])]
    assert sum(report.boxes_per_level) == train.boxes
    assert {k.id: k.boxes for k in report.classes} == dict(per_class)
    assert report.num_classes == 6 and report.warnings == []

    # what the hook samples and maps, counted the way collect_instance_features keeps boxes
    hook = PrototypeRefreshHook(cfg)
    drawn = hook.images()
    mapper, seen, images = annotated_test_mapper(cfg), Counter(), Counter()
    for j, classes in drawn:
        x = mapper(hook._dataset[j])
        scale = x["width"] / x["image"].shape[-1]
        boxes = x["instances"].gt_boxes.tensor * scale
        keep = ((boxes[:, 2:] - boxes[:, :2]) > cfg.DISTILL.PROTOTYPES.MIN_SIZE).all(dim=1)
        keep &= torch.isin(x["instances"].gt_classes, torch.tensor(classes))
        seen.update(x["instances"].gt_classes[keep].tolist())
        images.update(classes)
    assert {k.id: k.sampled_images for k in report.classes} == dict(images)
    assert {k.id: k.sampled_instances for k in report.classes} == dict(seen)
    assert report.prototype_images == len(drawn)

    assert _inspect_main()(["--config-file", GK_SHAPES]) == 0
    out = capsys.readouterr().out
    assert "995 training images (after detectron2's filtering) at SOLVER.IMS_PER_BATCH 4: 248.75 iterations per epoch" in out
    assert "## Warnings (0)" in out


def _coco_json(path, annotations, categories=("dot", "blob"), images=4, size=128):
    import json

    data = {"images": [{"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size} for i in range(images)],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
            "annotations": [dict(a, id=k + 1, iscrowd=0, area=a["bbox"][2] * a["bbox"][3]) for k, a in enumerate(annotations)]}
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def own_coco(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []

    def register(annotations, **kwargs):
        name = f"d2kd_test_own_{len(names)}_{os.getpid()}"
        register_coco_instances(name, {}, _coco_json(tmp_path / f"{name}.json", annotations, **kwargs), str(tmp_path))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_the_inspect_report_warns_of_dropped_boxes_unusable_classes_far_anchors_and_class_counts(own_coco, capsys):
    """Own data: class 'dot' is all 3 px boxes (under MIN_SIZE 8 and half the 12 px anchor);
    'blob' has two boxes whose polygons are point dicts (detectron2 drops them, boxes and all)."""
    from d2kd.data.preflight import preflight

    square = [40, 40, 60, 40, 60, 60, 40, 60]
    points = [{"x": 40, "y": 40}, {"x": 60, "y": 40}, {"x": 60, "y": 60}, {"x": 40, "y": 60}]
    anns = [{"image_id": i, "category_id": 1, "bbox": [10, 10, 3, 3]} for i in (1, 2, 3, 4)]
    anns += [{"image_id": i, "category_id": 2, "bbox": [40, 40, 20, 20], "segmentation": [square]} for i in (1, 2)]
    anns += [{"image_id": i, "category_id": 2, "bbox": [40, 40, 20, 20], "segmentation": [points]} for i in (3, 4)]
    name = own_coco(anns)
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"]
    report = preflight(load_config(GK_SHAPES, opts))
    assert report.datasets[0].boxes == 6
    assert list(report.datasets[0].bad_segmentations.values()) == [2]
    assert "polygons of point dicts" in next(iter(report.datasets[0].bad_segmentations))
    dot, blob = report.classes[:2]
    assert (dot.boxes, dot.usable, dot.sampled_instances, dot.below_anchors) == (4, 0, 0, 4)
    assert (blob.boxes, blob.usable, blob.sampled_images, blob.sampled_instances) == (2, 2, 2, 2)
    text = "\n".join(report.warnings)
    assert "2 of the 8 annotations in" in text and "did not reach detectron2's dataset dicts" in text
    assert "class 0 (dot): 0 usable instance(s) for prototypes" in text and "Lower DISTILL.PROTOTYPES.MIN_SIZE" in text
    assert "4 of 6 training boxes (66.7%) are under half the smallest anchor (12 px" in text
    assert "add smaller anchors (MODEL.ANCHOR_GENERATOR.SIZES)" in text
    assert "DATASETS.TRAIN has 2 classes (dot, blob) but MODEL.ROI_HEADS.NUM_CLASSES = 6: set it to 2" in text
    assert _inspect_main()(["--config-file", GK_SHAPES, *opts]) == 1

    # a segmentation detectron2 cannot even load: the dataset and the form are named
    broken = own_coco([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": {"polygons": [square]}}])
    opts = ["DATASETS.TRAIN", f"('{broken}',)", "DATASETS.TEST", "()"]
    assert _inspect_main()(["--config-file", GK_SHAPES, *opts]) == 2
    err = capsys.readouterr().err
    assert f"detectron2 cannot load dataset '{broken}' (train): KeyError" in err
    assert "1 x a dict that is not RLE (no 'counts')" in err
    # every polygon a rectangle of point dicts: every box is dropped, and with it every image
    lost = own_coco([{"image_id": i, "category_id": 2, "bbox": [40, 40, 20, 20], "segmentation": [points]} for i in (1, 2)])
    opts = ["DATASETS.TRAIN", f"('{lost}',)", "DATASETS.TEST", "()"]
    assert _inspect_main()(["--config-file", GK_SHAPES, *opts]) == 2
    err = capsys.readouterr().err
    assert "has a box as detectron2 loads it, so detectron2 stops with 'No valid data found'" in err
    assert "2 of the 2 annotations in" in err and "polygons of point dicts" in err
