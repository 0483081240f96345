"""Reading the user's data: readers for each source (folders, csv, vtab lists, fgvc json) that all
end in one `DatasetSplits`, safe decoding, transforms and loaders.

Files are never copied: splits are lists of paths. Everything a user can fix raises `DataError`
with a one-line hint; single bad images or rows are skipped and reported instead, so one corrupt
file never stops a run.
"""
from vpt_cli.data.cache import DecodeCache
from vpt_cli.data.folders import VAL_SPLIT_NAMES, scan_class_folders
from vpt_cli.data.images import (
                                 IMAGE_EXTENSIONS,
                                 MAX_ASPECT_RATIO,
                                 MAX_IMAGE_PIXELS,
                                 ImageLoadError,
                                 decode_image_bytes,
                                 failure_reason,
                                 load_image,
                                 validate_samples,
)
from vpt_cli.data.inputs import MAX_GLOB_ENTRIES, list_images, read_task_requests
from vpt_cli.data.lists import LabelFormat
from vpt_cli.data.loading import ImageDataset, auto_workers, collate_skip_bad, make_loader
from vpt_cli.data.readers import DATA_FORMATS, discover_splits, read_eval_split
from vpt_cli.data.splits import DatasetSplits, Sample, class_counts, few_shot, missing_positives
from vpt_cli.data.transforms import build_transform, decode_size

__all__ = [
    "DATA_FORMATS", "IMAGE_EXTENSIONS", "MAX_ASPECT_RATIO", "MAX_GLOB_ENTRIES", "MAX_IMAGE_PIXELS", "VAL_SPLIT_NAMES",
    "DecodeCache", "decode_size",
    "DatasetSplits", "ImageDataset", "ImageLoadError", "LabelFormat", "Sample", "auto_workers", "build_transform",
    "class_counts", "collate_skip_bad", "decode_image_bytes", "discover_splits", "failure_reason", "few_shot",
    "list_images", "load_image", "make_loader", "missing_positives",
    "read_eval_split", "read_task_requests", "scan_class_folders", "validate_samples",
]
