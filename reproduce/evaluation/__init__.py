"""Evaluation: COCO AP through pycocotools and KITTI's own 2-D metric."""
