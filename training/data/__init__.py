"""The subject's photos -> a prepared dataset, and the class images for prior preservation.

photos (decode, EXIF, modes) -> crop (faces, squares) -> dataset (PrepareConfig, dataset.json,
load_dataset) -> captions (sidecars, the repeated-trait check), regions (subject regions for the
weighted loss), report (summary, contact sheet) -> prepare (the job); class_images stands apart.
The public names are re-exported here: `from training.data import prepare_dataset`.
"""
from .class_images import ClassImageConfig, ClassImageReport, class_image_folder, ensure_class_images, list_images
from .crop import CROP_MODES, Box, detect_faces
from .dataset import DATASET_JSON, DatasetItem, PrepareConfig, PreparedDataset, load_dataset
from .photos import IMAGE_SUFFIXES, Photo, SkipImage, open_photo
from .prepare import prepare_dataset, prepare_from_images
from .report import DatasetReport

__all__ = ["CROP_MODES", "DATASET_JSON", "IMAGE_SUFFIXES", "Box", "ClassImageConfig", "ClassImageReport",
           "DatasetItem", "DatasetReport", "Photo", "PrepareConfig", "PreparedDataset", "SkipImage",
           "class_image_folder", "detect_faces", "ensure_class_images", "list_images", "load_dataset",
           "open_photo", "prepare_dataset", "prepare_from_images"]
