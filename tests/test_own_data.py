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
    assert [it for it in range(20) if it >= hook.start_iter and (it - hook.start_iter) % hook.period == 0] == [3, 8, 13, 18]

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
