"""The ``d2kd`` logger, set up the way detectron2's ``default_setup`` sets up its own."""
import contextlib
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

__all__ = ["colour_wanted", "setup_d2kd_logger", "plain_config_dump"]


def colour_wanted(stream=None) -> bool:
    """Whether log output to ``stream`` (default stdout) may carry ANSI colour codes.

    detectron2's ``setup_logger`` colours through termcolor, which colours only a terminal
    (and honours ``NO_COLOR`` / ``FORCE_COLOR``); the same rule here.
    """
    stream = sys.stdout if stream is None else stream
    try:
        from termcolor import can_colorize  # termcolor >= 2.4

        if stream is sys.stdout:
            return bool(can_colorize())
    except ImportError:
        pass
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def setup_d2kd_logger(output_dir=None, distributed_rank: int = 0) -> logging.Logger:
    """Log ``d2kd.*`` messages like ``detectron2.*`` ones: to stdout on the main process and
    to ``OUTPUT_DIR/log.txt`` (``log.txt.rank<N>`` on other ranks), uncoloured unless stdout
    is a terminal. Safe to call more than once (detectron2 caches the set-up)."""
    return setup_logger(output_dir or None, distributed_rank=distributed_rank, name="d2kd",
                        abbrev_name="d2kd", color=colour_wanted())


@contextlib.contextmanager
def plain_config_dump():
    """While active, detectron2's ``default_setup`` logs the config without pygments colour
    when stdout is not a terminal (it highlights unconditionally, which puts ANSI codes into
    redirected output and ``log.txt``)."""
    from detectron2.engine import defaults

    if colour_wanted():
        yield
        return
    original = defaults._highlight
    defaults._highlight = lambda code, filename: code
    try:
        yield
    finally:
        defaults._highlight = original
