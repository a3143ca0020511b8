"""Dataset readers: VOC, COCO, ImageFolder, CSV/JSON manifests, webdataset tar shards and Hugging Face ``datasets``
folders as one multi-label :class:`ImageDataset`.

    >>> from patchcsra.data import open_dataset, align_classes
    >>> ds = open_dataset("data/VOCdevkit")                 # format and split detected: voc2007-test
    >>> ds.targets.shape                                    # (N, C) int8: 1 present, 0 absent, -1 ignore
"""
from .base import (DEFAULT_MAX_PIXELS, DIFFICULT_MODES, BlobSource, DatasetFormat, ImageDataset, UnreadableImage,
                   get_format, list_formats, open_dataset, read_image, read_image_bytes, register_format,
                   select_class_names)
from .classes import (align_class_groups, align_classes, load_class_map, load_class_names, model_label_ids,
                      model_label_names, normalize_class_name)
from .coco import open_coco
from .folder import open_folder
from .hf_datasets import open_hf_datasets
from .manifest import open_manifest
from .transforms import TransformSpec, resolve_transform
from .voc import VOC_CLASSES, open_voc
from .wds import open_webdataset

__all__ = [
    "ImageDataset", "DatasetFormat", "open_dataset", "register_format", "list_formats", "get_format",
    "select_class_names", "DIFFICULT_MODES", "DEFAULT_MAX_PIXELS", "read_image", "read_image_bytes", "UnreadableImage",
    "BlobSource", "open_voc", "open_coco", "open_folder", "open_manifest", "open_webdataset", "open_hf_datasets",
    "VOC_CLASSES",
    "align_classes", "align_class_groups", "load_class_map", "load_class_names", "model_label_names", "model_label_ids", "normalize_class_name",
    "TransformSpec", "resolve_transform",
]
