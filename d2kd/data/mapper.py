"""A dataset mapper whose unreadable images are named in the error."""
from typing import Callable, Sequence


class ImageReadError(OSError):
    """A training image cannot be read (missing, truncated, not an image); names the file."""


class ImageNamingMapper:
    """Wraps a detectron2 mapper (e.g. ``DatasetMapper``): an ``OSError`` reading an image
    (PIL's "image file is truncated", a missing file) becomes :class:`ImageReadError` naming
    the file and the datasets, instead of stopping training with PIL's bare text."""

    def __init__(self, mapper: Callable[[dict], dict], dataset_names: Sequence[str] = ()):
        self.mapper = mapper
        self.dataset_names = tuple(dataset_names)

    def __call__(self, dataset_dict: dict):
        try:
            return self.mapper(dataset_dict)
        except OSError as e:
            datasets = f" (in DATASETS.TRAIN {self.dataset_names})" if self.dataset_names else ""
            raise ImageReadError(
                f"cannot read training image {dataset_dict.get('file_name')!r}{datasets}: "
                f"{type(e).__name__}: {e}. Replace or re-encode the file, or remove its entry from "
                "the dataset"
            ) from e
