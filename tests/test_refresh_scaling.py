"""The prototype refresh: the teacher's instance features kept across builds, and the
(class, stride) selections split among ranks with every rank ending with the same bank."""
import logging

import torch

from conftest import distill_cfg, random_batch
from d2kd.engine.prototype_refresh import (
    assign_selections,
    collect_instance_features,
    rebuild_bank,
    select_share,
)
from d2kd.prototypes.bank import PrototypeBank


def _gk_model(tmp_path):
    from detectron2.modeling import build_model

    cfg = distill_cfg(tmp_path, heads=("gk",))
    cfg.DISTILL.PROTOTYPES.NUM = 3
    return build_model(cfg)


def _batches():
    batches = [random_batch(2, seed=i) for i in range(3)]
    for b, batch in enumerate(batches):
        for i, x in enumerate(batch):
            x["d2kd_index"] = 2 * b + i
    return batches


def _same(a, b):
    assert a.keys() == b.keys()
    for s in a:
        assert a[s].keys() == b[s].keys()
        for c in a[s]:
            for x, y in zip(a[s][c], b[s][c]):
                assert torch.equal(x, y), (s, c)


def test_teacher_features_are_computed_once_and_reused(tmp_path, caplog, monkeypatch):
    import d2kd.engine.prototype_refresh as refresh

    model = _gk_model(tmp_path)
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *args: calls.append(1))
    cache = {}
    first = collect_instance_features(model, _batches(), 4, teacher_cache=cache, total_images=6)
    assert len(calls) == 3 and sorted(cache) == list(range(6))
    from detectron2.utils import logger as d2_logger

    d2_logger._LOG_TIMER.clear()  # the progress line is rate-limited per call site
    with caplog.at_level(logging.INFO, logger="d2kd"):
        collect_instance_features(model, _batches(), 4, teacher_cache=cache, total_images=6)
    # a build quicker than PROGRESS_AFTER_S logs no progress line
    assert not any("ETA" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    monkeypatch.setattr(refresh, "PROGRESS_AFTER_S", 0.0)  # as if the build were slow
    with caplog.at_level(logging.INFO, logger="d2kd"):
        second = collect_instance_features(model, _batches(), 4, teacher_cache=cache, total_images=6)
    assert len(calls) == 3  # the teacher did not run again
    assert any("Prototype build: instance features: 2/6 images" in r.getMessage() and "ETA" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    _same(first, second)
    _same(first, collect_instance_features(model, _batches(), 4))  # as without a cache
    # the student's features are extracted again: a changed student changes them
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.mul_(1.1)
    third = collect_instance_features(model, _batches(), 4, teacher_cache=cache)
    s, c = next((s, c) for s in first for c in first[s])
    assert not torch.equal(first[s][c][0], third[s][c][0])
    assert torch.equal(first[s][c][1], third[s][c][1])


def _features(seed=0, classes=5, strides=(8, 16)):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in strides:
        out[s] = {}
        for c in range(classes):
            if c == 3:
                continue  # a class without instances
            n = int(torch.randint(5, 120, (1,), generator=g))
            f_s = torch.randn(n, 8, generator=g) + torch.randn(1, 8, generator=g) * 3
            out[s][c] = (f_s, f_s @ torch.randn(8, 6, generator=g), torch.rand(n, 5, generator=g))
    return out


def test_assignment_is_a_balanced_partition():
    features = _features()
    items = {(s, c) for s in features for c in features[s]}
    for world in (1, 2, 3, 8, 20):
        shares = assign_selections(features, world)
        assert len(shares) == world
        flat = [x for share in shares for x in share]
        assert len(flat) == len(set(flat)) and set(flat) == items
        assert shares == assign_selections(features, world)  # deterministic
    costs = [sum(len(features[s][c][0]) ** 2 for s, c in share) for share in assign_selections(features, 2)]
    assert max(costs) <= 0.75 * sum(costs)


def test_split_selection_gives_the_single_rank_bank():
    features = _features(1)

    def bank():
        return PrototypeBank([8, 16], {8: 8, 16: 8}, {8: 6, 16: 6}, num_classes=5, num_prototypes=3)

    single = bank()
    rebuild_bank(single, features, alpha=10.0)
    for world in (2, 3, 8):
        shares = assign_selections(features, world)

        def gather(own):  # what comm.all_gather returns: every rank's share, in rank order
            return [select_share(features, shares[r], 3, 10.0) for r in range(world)]

        for rank in range(world):
            split = bank()
            rebuild_bank(split, features, alpha=10.0, rank=rank, world_size=world, gather=gather)
            for k, v in single.state_dict().items():
                assert torch.equal(v, split.state_dict()[k]), (world, rank, k)
    assert single.is_built and not single.valid_s8[3].any() and single.valid_s8[0].any()


def test_later_builds_reuse_the_read_images_within_the_cache_budget(tmp_path, shapes_cache, storage):
    from types import SimpleNamespace

    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    cfg = distill_cfg(tmp_path, heads=("gk",))
    cfg.DATASETS.TRAIN = ("d2kd_shapes_train",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.DISTILL.PROTOTYPES.NUM = 3
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES = 3
    cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4
    from detectron2.modeling import build_model

    for budget, reads_again in ((1 << 30, 0), (0, None)):
        cfg.DISTILL.PROTOTYPES.IMAGE_CACHE_BYTES = budget
        model = build_model(cfg)
        hook = PrototypeRefreshHook(cfg)
        hook.trainer = SimpleNamespace(model=model)
        reads = []
        mapper = hook._mapper
        hook._mapper = lambda record: reads.append(1) or mapper(record)
        hook.refresh(0)
        first, bank = len(reads), {k: v.clone() for k, v in model.prototype_bank.state_dict().items()}
        assert first == len(hook.images()) and set(hook.timings) >= {"images", "student", "pooling", "selection"}
        hook.refresh(1)
        assert len(reads) - first == (first if reads_again is None else reads_again)
        for k, v in model.prototype_bank.state_dict().items():  # the same images, the same bank
            if k != "num_builds":
                assert torch.equal(v, bank[k]), k
