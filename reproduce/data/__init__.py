"""Data: synthetic KITTI-format scenes, downloads, conversion to COCO JSON, datasets and transforms."""
