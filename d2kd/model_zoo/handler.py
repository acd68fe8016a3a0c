"""The ``d2kd://`` prefix: files of a d2kd model zoo, for detectron2's ``PathManager``.

``d2kd://<name>/<file>`` is ``<base>/<name>/<file>``, where the base is ``$D2KD_ZOO``: a local
directory or an ``http(s)://`` URL; unset, it is this checkout's ``output/zoo`` (where
``make demo`` publishes). Like detectron2's own ``detectron2://`` handler it is registered with
``detectron2.utils.file_io.PathManager``, so a ``d2kd://`` URI works wherever detectron2 reads
a path: ``MODEL.WEIGHTS``, ``DISTILL.TEACHER.WEIGHTS``, ``DISTILL.TEACHER.CONFIG_FILE``.

Downloads are cached the way detectron2 caches its own (under iopath's cache directory,
``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``, in ``d2kd_zoo/<host>/<path>``). A file whose
name ends in ``_<6 hex digits>.<ext>`` (as every zoo weights file does) is checked against the
md5 of its content, downloaded or local: a corrupt or truncated file is an error naming it,
and a download is written to a temporary file and renamed into the cache only once it
checks, so nothing half-written is ever cached. Such a file is downloaded once; files
without a hash in their name (``config.yaml``, ``release.json``, ``index.json``) can change,
so they are fetched again each time they are asked for.
"""
import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Tuple

from detectron2.utils.file_io import PathHandler
from iopath.common.file_io import file_lock, get_cache_dir

from ..utils.atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["PREFIX", "ZOO_ENV", "ZooFileError", "D2KDHandler", "zoo_base", "default_zoo_base",
           "md5_in_name", "file_md5"]

PREFIX = "d2kd://"
ZOO_ENV = "D2KD_ZOO"
_HASHED = re.compile(r"_(?P<md5>[0-9a-f]{6})\.[A-Za-z0-9]+$")
DOWNLOAD_TIMEOUT_S = 60


class ZooFileError(OSError):
    """A zoo file that cannot be had, or whose content does not match the md5 in its name."""


def default_zoo_base() -> str:
    """This checkout's ``output/zoo``: where ``make demo`` and ``--zoo output/zoo`` publish."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "output", "zoo")


def zoo_base() -> str:
    """The zoo the ``d2kd://`` prefix reads: ``$D2KD_ZOO`` (a directory or an http(s) URL),
    else :func:`default_zoo_base`. Read at every call, so a process can switch zoos."""
    return os.environ.get(ZOO_ENV) or default_zoo_base()


def _is_url(base: str) -> bool:
    return base.startswith(("http://", "https://"))


def md5_in_name(path: str):
    """The 6-hex-digit md5 prefix a file name carries (``model_final_f6e8b1.pth``), or None."""
    match = _HASHED.search(os.path.basename(path))
    return match.group("md5") if match else None


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(uri: str, where: str, expected: str, got: str) -> ZooFileError:
    return ZooFileError(
        f"{uri}: the content of {where} has md5 {got[:6]}..., but its name says {expected}: the file is "
        "corrupt or truncated (nothing was cached). Publish it again, or check the zoo at "
        f"{zoo_base()} (${ZOO_ENV})"
    )


class D2KDHandler(PathHandler):
    """Resolves ``d2kd://`` URIs against :func:`zoo_base` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # local files already checked: path -> (size, mtime) when checked
        self._checked: Dict[str, Tuple[int, float]] = {}

    def _get_supported_prefixes(self) -> List[str]:
        return [PREFIX]

    def _relative(self, path: str) -> str:
        rel = path[len(PREFIX):].lstrip("/")
        if not rel or any(part == ".." for part in rel.split("/")):
            raise ZooFileError(f"{path}: not a zoo file (d2kd://<name>/<file>)")
        return rel

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        self._check_kwargs(kwargs)
        rel, base = self._relative(path), zoo_base()
        if _is_url(base):
            return self._download(path, base.rstrip("/") + "/" + urllib.parse.quote(rel), rel, base, force)
        local = os.path.join(base, rel)
        if not os.path.isfile(local):
            raise ZooFileError(
                f"{path}: {local} does not exist in the zoo at {base}. Publish the model there "
                f"(tools/export_student.py --zoo {base}), or point ${ZOO_ENV} at the zoo that has it"
            )
        expected = md5_in_name(local)
        if expected:
            stat = os.stat(local)
            if self._checked.get(local) != (stat.st_size, stat.st_mtime):
                got = file_md5(local)
                if not got.startswith(expected):
                    raise _mismatch(path, local, expected, got)
                self._checked[local] = (stat.st_size, stat.st_mtime)
        return local

    def _download(self, uri: str, url: str, rel: str, base: str, force: bool) -> str:
        parsed = urllib.parse.urlparse(base)
        cached = os.path.join(get_cache_dir(), "d2kd_zoo", parsed.netloc.replace(":", "_"),
                              parsed.path.strip("/"), rel)
        expected = md5_in_name(rel)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with file_lock(cached):  # ranks of one machine download once
            if expected and os.path.isfile(cached) and not force:
                return cached  # only ever renamed into place after its md5 checked
            logger.info(f"Downloading {url} ...")
            atomic_write(cached, lambda f: self._fetch(uri, url, f, expected))
            logger.info(f"{uri} cached in {cached}")
        return cached

    @staticmethod
    def _fetch(uri: str, url: str, out, expected) -> None:
        digest, size = hashlib.md5(), 0
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                announced = response.headers.get("Content-Length")
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as e:
            raise ZooFileError(f"{uri}: {url} answered HTTP {e.code} ({e.reason})") from None
        except (urllib.error.URLError, OSError) as e:
            raise ZooFileError(f"{uri}: could not download {url}: {getattr(e, 'reason', e)}") from None
        if announced is not None and int(announced) != size:
            raise ZooFileError(f"{uri}: the download from {url} stopped after {size} of {announced} bytes "
                               "(nothing was cached); try again")
        if expected and not digest.hexdigest().startswith(expected):
            raise _mismatch(uri, url, expected, digest.hexdigest())

    def _open(self, path: str, mode: str = "r", **kwargs):
        if any(m in mode for m in "wax+"):
            raise ZooFileError(f"{path}: the zoo is read-only through d2kd:// (publish with --zoo DIR)")
        return open(self._get_local_path(path), mode)

    def _exists(self, path: str, **kwargs) -> bool:
        try:
            return bool(self._get_local_path(path))
        except ZooFileError:
            return False

    def _isfile(self, path: str, **kwargs) -> bool:
        return self._exists(path)
