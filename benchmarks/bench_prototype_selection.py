"""Benchmark GK prototype selection (PGM): the implementation before issue 12, the current
one per pursuit method, and the direct candidates x D x N implementation.

Usage:
    python benchmarks/bench_prototype_selection.py                       # N = 2000, 5000, 20000
    python benchmarks/bench_prototype_selection.py --sizes 500 2000 --baseline --device cuda
    python benchmarks/bench_prototype_selection.py --coco                # COCO-like refresh, 1/2/8 ranks

Methods (all float64 picks; "same" compares each with "before"):

- before: the implementation before issue 12 (float64 Gram products, P and Q cached under a
  1 GiB bound, else recomputed every pursuit step from the residuals);
- auto: ``select_prototypes`` as the refresh calls it (float32 Gram products verified to give
  the float64 candidate set, pursuit by the cheapest method, usually the D x D moments);
- cached: the same with the pursuit forced to the cached |candidates| x N products
  (``DISTILL.PROTOTYPES.CACHE_BYTES``, 4 GiB by default);
- baseline (``--baseline``): the direct implementation.

Each (method, N) runs in its own subprocess so peak memory is attributable to it:
on CPU "peak" is the process's peak RSS (``ru_maxrss``) minus its RSS just before the
call, i.e. everything the call allocated at its high point, allocator slack included;
on CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before
the call. The table also gives the analytic size of each method's largest tensor.

Features are synthetic but clustered (a few hundred clusters of varying spread, teacher
space = a random mix of the student space plus noise), so the density filter keeps a
realistic 40-60 % of the instances.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from d2kd.prototypes.selection import dense_candidates, select_prototypes
from d2kd.utils.threads import add_threads_argument, set_cpu_threads

GIB = float(1 << 30)


# ---------------------------------------------------------------------------- baseline
def baseline_select(fs, ft, k, alpha=10.0, sigma=0.1, fraction=0.4):
    """The direct implementation: full N x N density, then per step the candidates x D x N
    residual tensors (every candidate's updated residuals, broadcast), as the reference does.
    float32, chosen candidates excluded, first minimum on ties (torch.argmin)."""
    a, b = F.normalize(fs.float(), dim=1), F.normalize(ft.float(), dim=1)
    n = a.shape[0]

    def dense(x):
        rho = torch.exp(-((1.0 - x @ x.T) / sigma) ** 2).sum(1)
        return rho > torch.sort(rho).values[int(math.floor(fraction * n))]

    cand = (dense(a) & dense(b)).nonzero().squeeze(1)
    u, v = a[cand], b[cand]  # (G, D)
    ra, rb = a.T.clone(), b.T.clone()  # residuals (D, N)
    chosen = []
    for _ in range(min(k, len(cand))):
        p = (u[:, :, None] * ra[None]).sum(1)  # (G, D, N) product, reduced to (G, N)
        q = (v[:, :, None] * rb[None]).sum(1)
        wa = (alpha * (p + q) + p) / (1 + 2 * alpha)
        wb = (alpha * (p + q) + q) / (1 + 2 * alpha)
        err = alpha * (wa - wb).square().sum(1)
        res = ra[None] - wa[:, None, :] * u[:, :, None]  # (G, D, N) residuals
        err += res.square_().sum((1, 2))
        del res
        res = rb[None] - wb[:, None, :] * v[:, :, None]
        err += res.square_().sum((1, 2))
        del res
        if chosen:
            err[torch.stack(chosen)] = math.inf
        best = torch.argmin(err)
        ra = ra - wa[best][None, :] * u[best][:, None]
        rb = rb - wb[best][None, :] * v[best][:, None]
        chosen.append(best)
    return cand[torch.stack(chosen)] if chosen else cand[:0]


# ---------------------------------------------------------------------------- data
def make_problem(n, dim, seed, device):
    """(N, D) student and teacher features of one synthetic class."""
    g = torch.Generator().manual_seed(seed)
    clusters = max(4, n // 50)
    label = torch.randint(clusters, (n,), generator=g)
    spread = 0.2 + 0.4 * torch.rand(clusters, generator=g)  # varying density per cluster
    centres = torch.randn(clusters, dim, generator=g)
    fs = centres[label] + spread[label, None] * torch.randn(n, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    ft = fs @ mix + 0.25 * torch.randn(n, dim, generator=g)
    return fs.to(device), ft.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


METHODS = {
    "baseline": lambda fs, ft, k, alpha: baseline_select(fs, ft, k, alpha),
    "before": lambda fs, ft, k, alpha: select_prototypes(
        fs, ft, k, alpha, gram_dtype=None, method="cached", cache_bytes=1 << 30),
    "auto": lambda fs, ft, k, alpha: select_prototypes(fs, ft, k, alpha),
    "cached": lambda fs, ft, k, alpha: select_prototypes(fs, ft, k, alpha, method="cached"),
}


def worker(spec):
    """Runs one (method, N) in this process; prints one JSON line."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    fs, ft = make_problem(spec["n"], spec["dim"], spec["seed"], device)
    fn = METHODS[spec["method"]]
    fn(*make_problem(512, spec["dim"], 1, device), spec["k"], spec["alpha"])  # load the kernels of every path
    _sync(device)
    times, out = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss_bytes()
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        out = fn(fs, ft, spec["k"], spec["alpha"])
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _peak_rss_bytes() - base
    result = {"time": min(times), "peak": peak, "indices": out.tolist()}
    if spec["method"] != "baseline":  # report |candidates| (untimed) for the skip rule
        a, b = F.normalize(fs.double(), dim=1), F.normalize(ft.double(), dim=1)
        result["candidates"] = int(dense_candidates(a, b).numel())
    print(json.dumps(result))


def run_worker(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mem(b):
    return f"{b / GIB:.2f} GiB" if b >= GIB / 4 else f"{b / (1 << 20):.0f} MiB"


def sizes_table(args):
    print(f"device={args.device} threads={args.threads} D={args.dim} K={args.k} alpha={args.alpha} "
          f"(clustered synthetic features; each cell its own process)")
    methods = ["before", "auto", "cached"] + (["baseline"] if args.baseline else [])
    differ = []
    header = f"{'N':>6} {'|cand|':>6} | " + " | ".join(f"{m + ' s':>11} {'peak':>9} {'same':>4}" for m in methods)
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        spec = dict(n=n, dim=args.dim, k=args.k, alpha=args.alpha, seed=n,
                    device=args.device, threads=args.threads, repeats=args.repeats)
        results = {m: run_worker(dict(spec, method=m, repeats=1 if m in ("before", "baseline") else args.repeats))
                   for m in methods}
        ref = results["before"]
        cells = []
        for m in methods:
            r = results[m]
            if "error" in r:
                cells.append(f"{'failed: ' + r['error'][:14]:>26}")
                continue
            same = "-" if m == "before" or "error" in ref else ("yes" if r["indices"] == ref["indices"] else "NO")
            if same == "NO":
                differ.append((m, n))
            cells.append(f"{r['time']:>11.2f} {_fmt_mem(r['peak']):>9} {same:>4}")
        g = ref.get("candidates", results["auto"].get("candidates", -1))
        print(f"{n:>6} {g:>6} | " + " | ".join(cells), flush=True)
    print("peak = measured (CPU: peak RSS - RSS before the call; CUDA: max allocated - allocated "
          f"before). Times: best of {args.repeats} (before, baseline: 1 run). same = the same "
          "indices as 'before'.")
    if differ:
        sys.exit(f"bench_prototype_selection: other picks than 'before' for (method, N) {differ}")


def coco_like_sizes(images: int, budget: int, min_size: float = 30):
    """Usable instances per class in a COCO-like long-tail set with per-class image sampling
    (up to ``budget`` images per class holding it), as the refresh draws them."""
    from collections import Counter

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_prototype_sampling import coco_like, usable

    from d2kd.engine.prototype_refresh import images_and_classes, per_class_image_subsets

    records, _ = coco_like(images)
    counts = Counter()
    for i, classes in images_and_classes(per_class_image_subsets(records, budget, min_size, seed=0)):
        counts.update(usable(records[i], set(classes), min_size))
    return [counts.get(c, 0) for c in range(80)]


def coco(args):
    from d2kd.engine.prototype_refresh import assign_selections

    device = torch.device(args.device)
    sizes = coco_like_sizes(args.coco_images, args.coco_budget)
    levels = 5
    print(f"COCO-like refresh: {args.coco_images} images, 80 long-tail classes, up to "
          f"{args.coco_budget} images per class -> instances per class min {min(sizes)}, median "
          f"{sorted(sizes)[40]}, max {max(sizes)}, total {sum(sizes)}; x {levels} levels, D={args.dim}, "
          f"K={args.k}, device={args.device}, threads={args.threads} (selection only)")
    features = {}
    for level in range(levels):
        features[level] = {}
        for c, n in enumerate(sizes):
            if n:
                fs, ft = make_problem(n, args.dim, 1000 * level + c, device)
                features[level][c] = (fs, ft, None)
    select_prototypes(*make_problem(64, args.dim, 1, device), args.k)  # load kernels
    for name in ("before", "auto"):
        fn = METHODS[name]
        times, rss0 = {}, _current_rss_bytes()
        for level, per_class in features.items():
            for c, (fs, ft, _) in per_class.items():
                _sync(device)
                start = time.perf_counter()
                fn(fs, ft, args.k, args.alpha)
                _sync(device)
                times[(level, c)] = time.perf_counter() - start
        total = sum(times.values())
        print(f"  {name}: {total:.2f} s on one rank ({1000 * total / len(times):.1f} ms per class-level; "
              f"peak RSS - RSS before: {_fmt_mem(max(0, _peak_rss_bytes() - rss0))})", flush=True)
        for world in (1, 2, 8):
            shares = assign_selections(features, world)
            per_rank = [sum(times[item] for item in share) for share in shares]
            print(f"    {world} rank(s): selection time per rank max {max(per_rank):.2f} s, "
                  f"min {min(per_rank):.2f} s (the measured per-selection times, split as the "
                  "refresh splits them)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast method")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the direct candidates x D x N implementation (slow)")
    parser.add_argument("--coco", action="store_true", help="time one COCO-like refresh, 1/2/8 ranks")
    parser.add_argument("--coco-images", type=int, default=118000)
    parser.add_argument("--coco-budget", type=int, default=800, help="images per class")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.threads = set_cpu_threads(args.threads)  # each (method, N) process gets this many
    if args.coco:
        coco(args)
    else:
        sizes_table(args)


if __name__ == "__main__":
    main()
