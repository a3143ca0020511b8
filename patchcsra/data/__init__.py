"""Dataset readers: VOC, COCO, ImageFolder and CSV/JSON manifests as one multi-label :class:`ImageDataset`.

    >>> from patchcsra.data import open_dataset, align_classes
    >>> ds = open_dataset("data/VOCdevkit")                 # format and split detected: voc2007-test
    >>> ds.targets.shape                                    # (N, C) int8: 1 present, 0 absent, -1 ignore
"""
from .base import (DEFAULT_MAX_PIXELS, DIFFICULT_MODES, DatasetFormat, ImageDataset, UnreadableImage, get_format,
                   list_formats, open_dataset, read_image, register_format, select_class_names)
from .classes import (align_class_groups, align_classes, load_class_map, load_class_names, model_label_ids,
                      model_label_names, normalize_class_name)
from .coco import open_coco
from .folder import open_folder
from .manifest import open_manifest
from .transforms import TransformSpec, resolve_transform
from .voc import VOC_CLASSES, open_voc

__all__ = [
    "ImageDataset", "DatasetFormat", "open_dataset", "register_format", "list_formats", "get_format",
    "select_class_names", "DIFFICULT_MODES", "DEFAULT_MAX_PIXELS", "read_image", "UnreadableImage",
    "open_voc", "open_coco", "open_folder", "open_manifest", "VOC_CLASSES",
    "align_classes", "align_class_groups", "load_class_map", "load_class_names", "model_label_names", "model_label_ids", "normalize_class_name",
    "TransformSpec", "resolve_transform",
]
