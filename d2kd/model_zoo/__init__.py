"""d2kd's model zoo: ``get_config_file``, ``get_checkpoint_url``, ``get_config`` and ``get`` in the
shape of ``detectron2.model_zoo``, the ``d2kd://`` prefix (registered with detectron2's
``PathManager`` on import), and publishing into a zoo directory (publish.py)."""
from detectron2.utils.file_io import PathManager

from .handler import PREFIX, ZOO_ENV, D2KDHandler, ZooFileError, default_zoo_base, zoo_base
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file, read_index

PathManager.register_handler(D2KDHandler())  # as detectron2 registers its detectron2:// handler

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "read_index", "PREFIX", "ZOO_ENV",
           "ZooFileError", "zoo_base", "default_zoo_base"]
