"""MODEL_ZOO.md: the zoo's index as a table in detectron2's style, plus the shipped configs
that are yet to be trained (COCO and VOC need GPUs and the datasets)."""
import glob
import os
from typing import Optional

from .model_zoo import configs_dir, zoo_name

__all__ = ["zoo_table"]


def _ms(latency: Optional[dict], threads: str, kind: str = "eager") -> str:
    value = ((latency or {}).get(kind) or {}).get(threads)
    return f"{value['median']:.1f}" if value else "—"


def _duration(seconds: Optional[float]) -> str:
    if not seconds:
        return "—"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _to_be_trained(published) -> list:
    root = configs_dir()
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
        name = zoo_name(os.path.relpath(path, root))
        base = os.path.basename(name)
        if base.startswith("Base-") or name in published or name.startswith("shapes/"):
            continue
        data = "VOC" if name.endswith("_voc") else "COCO" if name.endswith("_coco") else "COCO (alias)"
        rows.append(f"| `{name}.yaml` | {data} | to be trained |")
    return rows


def zoo_table(index: dict, note: str = "") -> str:
    """The markdown page for ``index`` (see publish.py); ``note``: a paragraph above the table."""
    models = index["models"]
    lines = [
        "# d2kd model zoo",
        "",
        "Generated from the zoo's `index.json` (`tools/model_zoo_table.py`). Every model is a release",
        "(d2kd.export): weights named by their md5, a stock detectron2 `config.yaml`, a traced",
        "TorchScript student, and `release.json`; each was verified before publishing (a process",
        "without d2kd loads it strictly and predicts what the trained student predicts). Load one with",
        "`d2kd.model_zoo.get(name, trained=True)` or reference its file as `d2kd://<name>/<file>`",
        "(the zoo is `$D2KD_ZOO`, default this checkout's `output/zoo`).",
        "",
        "AP is detectron2's COCOEvaluator box AP on the test set named; latency is the median per",
        "image on the CPU that published it, model call only (resized input), eager / TorchScript;",
        "GFLOPs at the test size (fvcore's count: a multiply-add is one flop).",
        "",
        *([note, ""] if note else []),
        "| name | teacher | train / test data | AP | AP50 | train time | params | GFLOPs | latency 1 thread (ms) | latency 2 threads (ms) | file | md5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in models.items():
        metrics = e.get("metrics") or {}
        teacher = e.get("teacher") or "—"
        if teacher.startswith("d2kd://"):
            teacher = teacher[len("d2kd://"):].rsplit("/", 1)[0]
        data = f"{'+'.join(e['dataset']['train'])} / {'+'.join(e['dataset']['test'])}"
        ap = f"{metrics['AP']:.1f}" if "AP" in metrics else "—"
        ap50 = f"{metrics['AP50']:.1f}" if "AP50" in metrics else "—"
        lat = e.get("latency_ms")
        lat1 = f"{_ms(lat, '1')} / {_ms(lat, '1', 'torchscript')}"
        lat2 = f"{_ms(lat, '2')} / {_ms(lat, '2', 'torchscript')}"
        lines.append(
            f"| `{name}` | {teacher} | {data} | {ap} | {ap50} | {_duration(e.get('train_time_s'))} | "
            f"{e['params'] / 1e6:.2f} M | {e['gflops']:.2f} | {lat1} | {lat2} | "
            f"[{e['weights']}](d2kd://{name}/{e['weights']}) | `{e['md5'][:8]}` |"
        )
    if not models:
        lines.append("| (nothing published yet: `make demo` publishes the built-in-data models) | | | | | | | | | | | |")
    lines += ["", "## Shipped configs not yet trained", "",
              "These need the datasets and GPUs (`python train_net.py --config-file configs/<name> --num-gpus 8`);",
              "publish the result with `tools/export_student.py --zoo DIR`.", "",
              "| config | data | status |", "|---|---|---|"]
    lines += _to_be_trained(models)
    return "\n".join(lines) + "\n"
