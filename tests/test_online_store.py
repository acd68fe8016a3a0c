"""DISTILL.PROTOTYPES.SOURCE "online": the bounded per-class, per-level store the training
steps fill, a build from it, its checkpointing and resume, and every rank's identical store
and bank after a build."""
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from conftest import distill_cfg, random_batch, training_cfg
from d2kd.prototypes.online_store import OnlineInstanceStore


def _store(capacity=4, classes=3, strides=(8, 16)):
    return OnlineInstanceStore(list(strides), {s: 2 for s in strides}, {s: 3 for s in strides}, classes,
                               capacity, min_size=0)


def _rows(classes, start=0, strides=(8, 16)):
    """Instances whose features encode their order (value start + i) and stride."""
    classes = torch.as_tensor(classes)
    v = torch.arange(start, start + len(classes), dtype=torch.float32)[:, None]
    f_s = {s: v.repeat(1, 2) + 10 * s for s in strides}
    f_t = {s: -v.repeat(1, 3) - 10 * s for s in strides}
    source = torch.cat([torch.full((len(classes), 1), 7.0), v.repeat(1, 4)], 1)
    return classes, f_s, f_t, source


def test_the_store_is_bounded_per_class_and_per_level_keeping_the_latest():
    store = _store(capacity=4)
    store.add(*_rows([0, 0, 1, 0, 0, 0, 0, 1]), iteration=3)  # class 0: 6 > 4 instances at once
    assert store.count.tolist() == [4, 2, 0] and len(store) == 6
    for s in store.strides:  # fixed shapes: (classes, capacity, channels) per level
        assert store.student(s).shape == (3, 4, 2) and store.teacher(s).shape == (3, 4, 3)
    sets = store.feature_sets()
    assert sorted(sets) == [8, 16] and sorted(sets[8]) == [0, 1]  # class 2: none, absent
    # class 0 keeps its latest 4 (positions 3..6 of the batch), oldest first, at every level
    for s in (8, 16):
        assert sets[s][0][0][:, 0].tolist() == [10 * s + v for v in (3, 4, 5, 6)]
        assert sets[s][0][1][:, 0].tolist() == [-10 * s - v for v in (3, 4, 5, 6)]
        assert sets[s][1][0][:, 0].tolist() == [10 * s + v for v in (2, 7)]
    assert sets[8][0][2][:, 1].tolist() == [3, 4, 5, 6]  # sources follow their instances
    # a ring: three more of class 0 replace its three oldest; class 1 grows to 4, then wraps
    store.add(*_rows([0, 1, 0, 1, 0, 1], start=100), iteration=4)
    assert store.count.tolist() == [4, 4, 0]
    sets = store.feature_sets()
    assert sets[8][0][0][:, 0].tolist() == [80 + v for v in (6, 100, 102, 104)]
    assert sets[8][1][0][:, 0].tolist() == [80 + v for v in (7, 101, 103, 105)]
    store.add(*_rows([1], start=200), iteration=5)
    assert store.feature_sets()[16][1][0][:, 0].tolist() == [160 + v for v in (101, 103, 105, 200)]
    assert sorted(store.ages(5).tolist()) == [0] + [1] * 6 + [2]
    assert store.count.max() <= store.capacity


def test_the_store_survives_a_state_dict_round_trip_and_refuses_another_shape(caplog):
    store = _store()
    store.add(*_rows([0, 2, 2]), iteration=9)
    again = _store()
    again.load_state_dict(store.state_dict())
    for name, buf in store.state_dict().items():
        assert torch.equal(buf, again.state_dict()[name]), name
    other = _store(capacity=5)
    with caplog.at_level(logging.WARNING, logger="d2kd"):
        result = other.load_state_dict(store.state_dict(), strict=False)
    assert len(other) == 0 and result.missing_keys  # left empty, never half-loaded
    assert any("does not fit" in r.getMessage() for r in caplog.records)


def _gk_online(tmp_path, capacity=50):
    from detectron2.modeling import build_model

    cfg = distill_cfg(tmp_path, heads=("gk",))
    cfg.DISTILL.PROTOTYPES.NUM = 3
    cfg.DISTILL.PROTOTYPES.SOURCE = "online"
    cfg.DISTILL.PROTOTYPES.ONLINE_CAPACITY = capacity
    cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_training_steps_fill_the_store_with_the_features_they_computed(tmp_path, storage):
    from d2kd.prototypes.instance_features import instance_features
    from d2kd.structures import by_stride

    _, model = _gk_online(tmp_path)
    model.train()
    store = model.prototype_bank.store
    batch = random_batch(2, seed=3)
    model(batch)
    boxes = torch.cat([x["instances"].gt_boxes.tensor for x in batch])
    classes = torch.cat([x["instances"].gt_classes for x in batch])
    index = torch.tensor([0] * len(batch[0]["instances"]) + [1] * len(batch[1]["instances"]))
    assert len(store) == len(boxes) and int(store.count.sum()) == len(boxes)
    with torch.no_grad():  # the same maps again (train mode: BatchNorm uses the batch's statistics)
        student = by_stride(model.backbone, model.backbone(model.preprocess_image(batch).tensor))
        teacher = by_stride(model.teacher.backbone, model.teacher_backbone(batch))
    sets = store.feature_sets()
    for s in store.strides:
        f_s, f_t = instance_features(student[s], boxes, index, s), instance_features(teacher[s], boxes, index, s)
        for c in classes.unique().tolist():
            got_s, got_t, _ = sets[s][c]
            torch.testing.assert_close(got_s, f_s[classes == c], rtol=2e-3, atol=2e-3)  # float16 store
            torch.testing.assert_close(got_t, f_t[classes == c], rtol=2e-3, atol=2e-3)


def test_an_online_build_extracts_nothing_and_selects_from_the_store(tmp_path, storage):
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    cfg, model = _gk_online(tmp_path)
    model.train()
    for i in range(4):
        storage.iter = i
        model(random_batch(2, seed=10 + i))
    store = model.prototype_bank.store
    hook = PrototypeRefreshHook(cfg)
    hook.trainer = SimpleNamespace(model=model)
    forwards = []
    model.backbone.register_forward_hook(lambda *a: forwards.append("student"))
    model.teacher.backbone.register_forward_hook(lambda *a: forwards.append("teacher"))
    hook.refresh(4)
    assert forwards == [] and hook._images is None  # no image read, no model run
    bank = model.prototype_bank
    assert bank.is_built
    sets = store.feature_sets()
    for s in bank.strides:
        for c in range(bank.num_classes):
            k = int(bank.prototypes_per_class(s)[c])
            if c not in sets[s]:
                assert k == 0
                continue
            stored = sets[s][c][0]
            for row in bank.student(s)[c, :k]:  # every prototype is one of the stored instances
                assert (stored == row).all(dim=1).any()


def test_an_empty_store_builds_from_the_images(tmp_path, storage, shapes_cache, caplog):
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    cfg, model = _gk_online(tmp_path)
    cfg.DATASETS.TRAIN = ("d2kd_shapes_train",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES = 2
    hook = PrototypeRefreshHook(cfg)
    hook.trainer = SimpleNamespace(model=model)
    with caplog.at_level(logging.INFO, logger="d2kd"):
        hook.refresh(0)
    assert any("the online store is empty" in r.getMessage() for r in caplog.records)
    assert model.prototype_bank.is_built and hook._images


def test_the_store_is_checkpointed_and_restored_on_resume(tmp_path, shapes_cache, caplog):
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, heads=("gk",), max_iter=4)
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6  # the random teacher's features are large
    cfg.DISTILL.PROTOTYPES.SOURCE = "online"
    cfg.DISTILL.PROTOTYPES.ONLINE_CAPACITY = 6
    cfg.DISTILL.PROTOTYPES.NUM = 2
    cfg.DISTILL.PROTOTYPES.START_ITER = 2
    cfg.DISTILL.PROTOTYPES.PERIOD = 2
    cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4
    with caplog.at_level(logging.INFO, logger="d2kd"):
        trainer = DistillTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    assert any("instances of the online store" in r.getMessage() for r in caplog.records)
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"), weights_only=True)["model"]
    keys = [k for k in saved if k.startswith("prototype_bank.store.")]
    assert "prototype_bank.store.count" in keys and int(saved["prototype_bank.store.count"].sum()) > 0
    assert int(saved["prototype_bank.store.count"].max()) <= 6
    final = trainer.model.prototype_bank.store.state_dict()

    cfg.SOLVER.MAX_ITER = 4  # resuming the finished run restores it, trains nothing more
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    restored = resumed.model.prototype_bank.store.state_dict()
    assert sorted(restored) == sorted(final)
    for name in final:
        assert torch.equal(restored[name], final[name]), name


# ---- two ranks (gloo on CPU): the same store and the same bank after a build
def _rank_worker(rank, cfg, init_file, out_dir):
    import torch.distributed as dist
    from detectron2.modeling import build_model
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from d2kd.engine.prototype_refresh import online_feature_sets, rebuild_bank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage(0) as storage:
        for i in range(3):
            storage.iter = i
            model(random_batch(2, seed=100 * rank + i))  # each rank its own images
        bank = model.prototype_bank
        rebuild_bank(bank, online_feature_sets(bank.store), 10.0, rank=rank, world_size=2,
                     gather=comm.all_gather)
    torch.save({k: v for k, v in bank.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_every_rank_has_the_same_store_and_bank_after_a_build(tmp_path):
    cfg, _ = _gk_online(tmp_path)
    mp.spawn(_rank_worker, args=(cfg, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pth", weights_only=True)
    b = torch.load(tmp_path / "rank1.pth", weights_only=True)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the store holds both ranks' instances: 3 steps x 2 images x 3 boxes per rank
    assert int(a["store.count"].sum()) == 2 * 3 * 2 * 3
    assert int(a["num_builds"]) == 1 and a["valid_s8"].any()


@pytest.mark.parametrize("bad", [0, -3])
def test_online_capacity_is_range_checked(tmp_path, bad):
    from detectron2.modeling import build_model

    from d2kd.value_checks import InvalidValueError

    cfg, _ = _gk_online(tmp_path)
    cfg.DISTILL.PROTOTYPES.ONLINE_CAPACITY = bad
    with pytest.raises(InvalidValueError, match="ONLINE_CAPACITY"):
        build_model(cfg)


def test_an_unknown_source_is_refused(tmp_path):
    from detectron2.modeling import build_model

    cfg, _ = _gk_online(tmp_path)
    cfg.DISTILL.PROTOTYPES.SOURCE = "cache"
    with pytest.raises(ValueError, match="SOURCE"):
        build_model(cfg)


def test_another_teacher_empties_the_store_a_misfit_bank_does_not():
    from d2kd.prototypes.bank import PrototypeBank

    bank = PrototypeBank([8, 16], {8: 2, 16: 2}, {8: 3, 16: 3}, 3, 2, store=_store())
    bank.store.add(*_rows([0, 1]), iteration=1)
    bank.clear()  # a checkpoint's bank of another shape: the store keeps what it holds
    assert len(bank.store) == 2
    bank.clear("the checkpoint's prototypes were built with another teacher")
    assert len(bank.store) == 0


def test_step_instances_pool_each_box_in_its_own_image_at_every_stride():
    # images with 3, 0 and 1 boxes (one of the first image's too small to keep): each box is
    # pooled in its own image's map, as the summed-area form pools it, at every stride
    from detectron2.structures import Boxes, Instances

    from d2kd.prototypes.instance_features import instance_features
    from d2kd.prototypes.online_store import step_instances

    g = torch.Generator().manual_seed(11)
    strides = [8, 16]
    student = {s: torch.randn(3, 5, 64 // s, 96 // s, generator=g) for s in strides}
    teacher = {s: torch.randn(3, 7, 64 // s, 96 // s, generator=g) for s in strides}
    all_boxes = [torch.tensor([[0.0, 0, 40, 30], [10, 5, 11, 60], [50, 20, 90, 63]]), torch.zeros(0, 4),
                 torch.tensor([[30.0, 8, 70, 50]])]
    batch, gts = [], []
    for i, b in enumerate(all_boxes):
        inst = Instances((64, 96))
        inst.gt_boxes, inst.gt_classes = Boxes(b), torch.arange(len(b)) % 2
        gts.append(inst)
        batch.append({"image": torch.zeros(3, 64, 96), "width": 96, "image_id": i})
    classes, f_s, f_t, sources = step_instances(batch, gts, student, teacher, strides, min_size=2.0)
    kept = torch.cat([all_boxes[0][[0, 2]], all_boxes[2]])  # the 1-pixel-wide box is left out
    index = torch.tensor([0, 0, 2])
    assert classes.tolist() == [0, 0, 0]
    assert sources[:, 0].tolist() == [0, 0, 2] and torch.equal(sources[:, 1:], kept)
    for s in strides:
        torch.testing.assert_close(f_s[s], instance_features(student[s], kept, index, s), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_t[s], instance_features(teacher[s], kept, index, s), rtol=1e-5, atol=1e-5)
