"""Writing files so that a reader sees the old content or the complete new one, never half."""
import logging
import os
import re
import shutil
from typing import IO, Callable, List, Union

logger = logging.getLogger(__name__)

# ``{path}.tmp.{pid}``: the name atomic_write (and the export's release directory) writes to
TEMPORARY_NAME = re.compile(r"^(?P<target>.+)\.tmp\.(?P<pid>\d+)$")


def temporary_path(path: str) -> str:
    """Where a writer in this process puts ``path`` before renaming it into place."""
    return f"{path}.tmp.{os.getpid()}"


def fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (POSIX; a no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, content: Union[bytes, str, Callable[[IO], None]]) -> None:
    """Write ``content`` (bytes, text, or a function that writes to a file object) to ``path``.

    It goes to ``{path}.tmp.{pid}`` in the same directory, is flushed to disk, and is renamed
    over ``path`` (``os.replace`` is atomic on POSIX). A crash or kill at any point leaves
    ``path`` as it was. The temporary file is removed when Python gets the chance; one left by
    a kill -9 is removed by :func:`remove_stale_temporaries` (the trainer calls it at start-up).
    """
    tmp = temporary_path(path)
    binary = not isinstance(content, str)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove the ``*.tmp.<pid>`` files (and directories) in ``directory`` whose writer is dead.

    A process killed with SIGKILL mid-write cannot remove its temporary file; the target itself
    is intact (see :func:`atomic_write`), so the leftover is garbage. A temporary whose pid is
    still running on this machine (a concurrent writer, or an unrelated process that reused
    the pid) is left alone. Only call this from the one process that writes ``directory``
    (the main process): a pid names a process on this machine only.

    Returns:
        the names removed.
    """
    if not directory or not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = TEMPORARY_NAME.match(name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or pid_is_alive(pid):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        logger.warning(
            f"Removed {len(removed)} temporary file(s) left in {directory} by writers that were "
            f"killed mid-write (the files they were writing are intact): {', '.join(removed)}"
        )
    return removed
