"""d2kd's CPU thread policy, one meaning for every command (the demo, the benchmarks, tools).

A leaf: it imports nothing of d2kd, so any floor may use it.
"""
import logging
import os

logger = logging.getLogger("d2kd")


def _available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a
    container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads(requested: int = 0, side_by_side: int = 1) -> int:
    """d2kd's CPU thread policy: the torch threads each of ``side_by_side`` processes running
    at the same time gets.

    The budget is ``requested`` (a ``--threads`` flag) when > 0, else ``OMP_NUM_THREADS`` when
    set (its first value), else every core this process may run on; processes side by side
    split it evenly, one thread each at least. Small CPU convolutions gain little from a
    second thread, and a thread that shares its core with other work stalls the others at
    every synchronisation: on a shared machine ask for fewer threads than cores.
    """
    if requested < 0:
        raise ValueError(f"--threads {requested}: give a number of threads >= 1, or 0 for the default "
                         "(OMP_NUM_THREADS when set, else every core)")
    budget = requested
    if not budget and os.environ.get("OMP_NUM_THREADS", "").strip():
        value = os.environ["OMP_NUM_THREADS"]
        first = value.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a number of threads >= 1: unset it, "
                             "set e.g. OMP_NUM_THREADS=1, or pass --threads N")
        budget = int(first)
    budget = budget or _available_cores()
    return max(1, budget // max(1, side_by_side))


def set_cpu_threads(requested: int = 0) -> int:
    """Give this process :func:`cpu_threads`'s budget (``torch.set_num_threads``) and export it
    as ``OMP_NUM_THREADS``, so that processes started from here (the stage runner's workers,
    which split it) see the same budget. Returns the number of threads."""
    import torch

    threads = cpu_threads(requested)
    source = ("--threads" if requested else "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS", "").strip()
              else f"all {_available_cores()} cores")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logger.info(f"CPU threads: {threads} ({source}; lower with --threads N or OMP_NUM_THREADS when "
                "other work shares the cores)")
    return threads


def add_threads_argument(parser) -> None:
    """The ``--threads`` flag of d2kd's commands (the demo and the benchmarks), one meaning for all."""
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads to use (default: OMP_NUM_THREADS when set, else every core; "
                             "the demo splits them among the stages it trains side by side); use fewer "
                             "than the cores when other work shares them")
