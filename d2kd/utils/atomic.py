"""Writing files so that a reader sees the old content or the complete new one, never half."""
import os
from typing import Callable, IO, Union


def atomic_write(path: str, content: Union[bytes, str, Callable[[IO], None]]) -> None:
    """Write ``content`` (bytes, text, or a function that writes to a file object) to ``path``.

    It goes to a temporary file in the same directory, is flushed to disk, and is renamed over
    ``path`` (``os.replace`` is atomic on POSIX). A crash or kill at any point leaves ``path``
    as it was, and the temporary file is removed when Python gets the chance.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
