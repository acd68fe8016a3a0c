"""Benchmark GK prototype selection against the direct candidates x D x N implementation.

Usage:
    python benchmarks/bench_prototype_selection.py                       # all sizes, CPU
    python benchmarks/bench_prototype_selection.py --sizes 500 2000 --device cuda
    python benchmarks/bench_prototype_selection.py --coco                # one COCO refresh

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
    "fast64": lambda fs, ft, k, alpha: select_prototypes(fs, ft, k, alpha),
    "fast32": lambda fs, ft, k, alpha: select_prototypes(fs, ft, k, alpha, dtype=torch.float32),
}


def worker(spec):
    """Runs one (method, N) in this process; prints one JSON line."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    fs, ft = make_problem(spec["n"], spec["dim"], spec["seed"], device)
    fn = METHODS[spec["method"]]
    fn(*make_problem(64, spec["dim"], 1, device), spec["k"], spec["alpha"])  # load kernels
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
    print(f"device={args.device} threads={args.threads} D={args.dim} K={args.k} "
          f"alpha={args.alpha} memory cap for the baseline tensor={args.mem_cap_gib} GiB")
    header = (f"{'N':>6} {'|cand|':>6} | {'fast64 s':>9} {'peak':>9} {'P,Q':>9} | "
              f"{'fast32 s':>9} {'peak':>9} | {'baseline s':>10} {'peak':>9} "
              f"{'GxDxN':>9} | {'speedup':>7} {'same idx':>8}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        spec = dict(n=n, dim=args.dim, k=args.k, alpha=args.alpha, seed=n,
                    device=args.device, threads=args.threads, repeats=args.repeats)
        f64 = run_worker(dict(spec, method="fast64"))
        if "error" in f64:
            print(f"{n:>6} fast64 failed: {f64['error']}")
            continue
        f32 = run_worker(dict(spec, method="fast32"))
        g = f64["candidates"]
        cached = 2 * g * n * 8
        # select_prototypes caches P, Q only under its cache_bytes default (1 GiB).
        cached_col = _fmt_mem(cached) if cached <= (1 << 30) else "streamed"
        big = g * args.dim * n * 4  # one float32 candidates x D x N tensor
        if big > args.mem_cap_gib * GIB:
            base_cols = f"{'skipped: would need ' + _fmt_mem(big) + ' per tensor':>30}"
            speed, same = "-", "-"
        else:
            base = run_worker(dict(spec, method="baseline", repeats=1))
            if "error" in base:
                base_cols, speed, same = f"{'failed: ' + base['error'][:22]:>30}", "-", "-"
            else:
                base_cols = f"{base['time']:>10.3f} {_fmt_mem(base['peak']):>9} {_fmt_mem(big):>9}"
                speed = f"{base['time'] / f64['time']:.0f}x"
                same = "yes" if base["indices"] == f64["indices"] else "NO"
        same32 = "" if f32.get("indices") == f64["indices"] else " (fast32 differs)"
        print(f"{n:>6} {g:>6} | {f64['time']:>9.3f} {_fmt_mem(f64['peak']):>9} "
              f"{cached_col:>9} | {f32['time']:>9.3f} {_fmt_mem(f32['peak']):>9} | "
              f"{base_cols} | {speed:>7} {same:>8}{same32}", flush=True)
    print("peak = measured (CPU: peak RSS - RSS before the call; CUDA: max allocated - "
          "allocated before). P,Q and GxDxN = analytic size of the largest tensors "
          "(fast64's cached inner products, or 'streamed' when they exceed its 1 GiB cache "
          "bound and residuals are kept instead; one baseline residual tensor). Times: best of "
          f"{args.repeats} for fast, 1 run for the baseline.")


def coco(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes, levels, n = 80, 5, 1000
    print(f"COCO-sized refresh: {classes} classes x {levels} levels x {n} instances, "
          f"D={args.dim}, K={args.k}, device={args.device}, threads={args.threads} "
          "(selection only; data generation not timed)")
    select_prototypes(*make_problem(64, args.dim, 1, device), args.k)  # load kernels
    for name, dtype in (("fast64", torch.float64), ("fast32", torch.float32)):
        total, rss0 = 0.0, _current_rss_bytes()
        for problem in range(classes * levels):
            fs, ft = make_problem(n, args.dim, problem, device)
            _sync(device)
            start = time.perf_counter()
            select_prototypes(fs, ft, args.k, args.alpha, dtype=dtype)
            _sync(device)
            total += time.perf_counter() - start
        print(f"  {name}: {total:.2f} s total, {1000 * total / (classes * levels):.1f} ms "
              f"per class-level (peak RSS - RSS before: "
              f"{_fmt_mem(max(0, _peak_rss_bytes() - rss0))})", flush=True)
    if args.coco_baseline_sample:
        total = 0.0
        for problem in range(args.coco_baseline_sample):
            fs, ft = make_problem(n, args.dim, problem, device)
            start = time.perf_counter()
            baseline_select(fs, ft, args.k, args.alpha)
            _sync(device)
            total += time.perf_counter() - start
        per = total / args.coco_baseline_sample
        print(f"  baseline: {per:.2f} s per class-level over {args.coco_baseline_sample} "
              f"problems -> ~{per * classes * levels / 60:.0f} min for the refresh "
              "(extrapolated)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000, 20000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast method")
    parser.add_argument("--mem-cap-gib", type=float, default=4.0,
                        help="skip the baseline when one candidates x D x N float32 tensor "
                             "would exceed this")
    parser.add_argument("--coco", action="store_true", help="time one COCO-sized refresh")
    parser.add_argument("--coco-baseline-sample", type=int, default=2,
                        help="with --coco: time the baseline on this many problems and "
                             "extrapolate (0: skip)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
    elif args.coco:
        coco(args)
    else:
        sizes_table(args)


if __name__ == "__main__":
    main()
