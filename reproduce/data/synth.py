"""Seeded synthetic road scenes in KITTI's native layout (the ``mini`` profile's dataset).

``python -m reproduce.synth [--out DIR] [--seed S] [--num-train N] ... [--difficulty D]`` writes::

    DIR/training/image_2/000000.png ...   RGB PNG, width x height
    DIR/training/label_2/000000.txt ...   KITTI label lines (15 fields)
    DIR/training/calib/000000.txt ...     KITTI calib (P2 = this image's pinhole camera)
    DIR/ImageSets/{train,val,test}.txt    contiguous ids, train first
    DIR/synth_meta.json                   seed, counts, size, difficulty, generator version

so the real KITTI preparation code runs on it unchanged.

The scene is a front-camera view built in 3-D road coordinates (``s`` metres to the right of
the road centre, ``t`` metres ahead, ``up`` metres above the ground) and projected with a
KITTI-like pinhole camera (focal length 0.58 * width, horizon near 0.46 * height, camera
1.65 m above the road, small random yaw and lateral offset).  Objects get KITTI-style 3-D
boxes; the 2-D label box is the bounding box of the projected 3-D box, and each object is
drawn to fill that box, so pixel size follows depth.

Labelling rules (the decisions the brief leaves open):

* Labelled classes are Car, Pedestrian, Cyclist; Van and Truck are drawn and labelled with
  their own KITTI type as distractors (the preparation code drops them).
* Objects are proposed, sorted nearest-first and accepted one by one.  An object's visible
  fraction is the share of its (clipped) box not covered by the boxes of nearer accepted
  objects.  Objects more than 80 % covered are *rejected* (never drawn), so no hidden object
  goes unlabelled.  ``occluded`` = 0 if visible >= 0.85, 1 if >= 0.5, else 2; 3 is unused.
* ``truncated`` is the fraction of the projected box outside the image; objects more than
  60 % outside are rejected.  Boxes are clipped to [0, width-1] x [0, height-1].
* Labelled-class objects whose box is shorter than 6 px (at 128 px image height) are drawn
  but labelled ``DontCare``, like KITTI's unannotated far objects; small far clusters of
  tiny vehicles/people are drawn and covered by one ``DontCare`` region each.

``difficulty`` (0 easy, 1 default, 2 hard) scales the number of objects, the share of far
(small) objects, how often objects are placed behind one another and accepted while
occluded, clutter density, the distractor (Van/Truck) rate, image noise and lighting
variation.  Every image has its own RNG seeded by (seed, split, index), so the output does
not depend on ``--workers`` or on the other splits' sizes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "1.0"
CLASSES = ("Car", "Pedestrian", "Cyclist")
DISTRACTORS = ("Van", "Truck")
SPLITS = ("train", "val", "test")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Same values as params.yaml -> data.synth (used when params.yaml is absent).
DEFAULTS = {
    "out": "data/raw/mini",   # data/raw/<profile> (dvc.yaml); the mini profile is synthetic
    "seed": 0,
    "num_train": 2000,
    "num_val": 300,
    "num_test": 300,
    "width": 416,
    "height": 128,
    "difficulty": 1.0,
}
DEFAULT_WORKERS = 2
SS = 2                  # supersampling factor: draw at 2x, box-filter down (anti-aliasing)
CAM_HEIGHT = 1.65       # metres, as KITTI
MIN_LABEL_H = 6.0       # px at 128 px image height; smaller labelled-class objects -> DontCare
PNG_COMPRESS = 1

# Road cross-section (metres from the road centre): 3 lanes of 3.5 m, parking strip,
# sidewalk, then buildings / trees.
LANE = 3.5
EDGE = 1.5 * LANE       # solid edge line
CURB = 7.5              # end of asphalt (parking strip EDGE..CURB)
WALK = 10.5             # end of sidewalk

# 3-D sizes (h, w, l) in metres: uniform ranges around KITTI's class means.
DIMS = {
    "Car": ((1.38, 1.62), (1.55, 1.85), (3.6, 4.6)),
    "Pedestrian": ((1.5, 1.9), (0.45, 0.7), (0.5, 0.9)),
    "Cyclist": ((1.6, 1.85), (0.5, 0.7), (1.6, 1.9)),
    "Van": ((1.9, 2.4), (1.8, 2.05), (4.6, 5.6)),
    "Truck": ((2.9, 3.7), (2.3, 2.6), (7.0, 11.0)),
}
CLASS_WEIGHTS = (0.6, 0.25, 0.15)   # Car, Pedestrian, Cyclist among labelled proposals

CAR_COLOURS = [(235, 235, 232), (190, 192, 196), (120, 122, 128), (35, 35, 40), (30, 50, 110),
               (150, 25, 30), (30, 80, 50), (200, 185, 150), (90, 60, 40), (60, 110, 170)]
CLOTH_COLOURS = [(30, 30, 35), (200, 30, 40), (40, 60, 150), (230, 230, 225), (90, 90, 95),
                 (60, 110, 60), (230, 180, 40), (120, 70, 40), (170, 120, 180), (40, 140, 160)]
SKIN = [(235, 200, 170), (200, 150, 110), (150, 100, 70), (95, 65, 45)]
BUILDING_COLOURS = [(180, 160, 130), (150, 150, 150), (160, 90, 70), (215, 210, 195),
                    (120, 110, 100), (190, 180, 150), (100, 100, 110)]


# --------------------------------------------------------------------------- geometry


@dataclass
class Camera:
    """Pinhole camera; road coordinates (s right, up, t ahead) -> pixel (u, v)."""

    f: float
    cx: float
    cy: float
    yaw: float      # road direction relative to the optical axis (radians)
    offset: float   # camera's lateral position on the road (metres)

    def to_cam(self, s, up, t):
        s = np.asarray(s, dtype=float) - self.offset
        c, n = math.cos(self.yaw), math.sin(self.yaw)
        return s * c + t * n, CAM_HEIGHT - np.asarray(up, dtype=float), -s * n + t * c

    def project_cam(self, x, y, z):
        return self.f * x / z + self.cx, self.f * y / z + self.cy

    def project(self, s, up, t):
        return self.project_cam(*self.to_cam(s, up, t))

    def depth(self, s, t) -> float:
        return float(self.to_cam(s, 0.0, t)[2])

    def poly(self, pts, min_z=0.5):
        """Project [(s, up, t), ...]; None if any point is behind ``min_z``."""
        a = np.asarray(pts, dtype=float)
        x, y, z = self.to_cam(a[:, 0], a[:, 1], a[:, 2])
        if np.any(z < min_z):
            return None
        u, v = self.project_cam(x, y, z)
        return list(zip(u.tolist(), v.tolist()))


def wrap_angle(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def box_corners(dims, loc, ry) -> np.ndarray:
    """The 8 corners (camera coordinates) of a KITTI 3-D box: location = bottom centre."""
    h, w, l = dims
    x = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * (l / 2)
    y = np.array([0, 0, 0, 0, -1, -1, -1, -1]) * h
    z = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * (w / 2)
    c, s = math.cos(ry), math.sin(ry)
    return np.stack([c * x + s * z + loc[0], y + loc[1], -s * x + c * z + loc[2]])


# --------------------------------------------------------------------------- drawing


class Canvas:
    """ImageDraw in output-pixel coordinates on a ``SS``-times supersampled image."""

    def __init__(self, img: Image.Image):
        self.draw = ImageDraw.Draw(img)

    def poly(self, pts, fill):
        if pts:
            self.draw.polygon([(x * SS, y * SS) for x, y in pts], fill=fill)

    def rect(self, x1, y1, x2, y2, fill):
        self.draw.rectangle([x1 * SS, y1 * SS, max(x1, x2) * SS, max(y1, y2) * SS], fill=fill)

    def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, width=1.0):
        rx, ry = max(rx, 0.25), max(ry, 0.25)
        self.draw.ellipse([(cx - rx) * SS, (cy - ry) * SS, (cx + rx) * SS, (cy + ry) * SS],
                          fill=fill, outline=outline, width=max(1, round(width * SS)))

    def line(self, pts, fill, width=1.0):
        self.draw.line([(x * SS, y * SS) for x, y in pts], fill=fill,
                       width=max(1, round(width * SS)))


def shade(c, k: float):
    return tuple(int(min(255, max(0, v * k))) for v in c)


def jitter(rng, c, amount=18):
    return tuple(int(min(255, max(0, v + rng.integers(-amount, amount + 1)))) for v in c)


class Frame:
    """Maps fractional coordinates inside a box to pixels; fx = 0 rear, 1 front when mirrored."""

    def __init__(self, x1, y1, x2, y2, facing_right=True):
        self.x1, self.y1, self.w, self.h = x1, y1, x2 - x1, y2 - y1
        self.right = facing_right

    def x(self, fx):
        return self.x1 + (fx if self.right else 1.0 - fx) * self.w

    def y(self, fy):
        return self.y1 + fy * self.h

    def pts(self, fracs):
        return [(self.x(fx), self.y(fy)) for fx, fy in fracs]

    def rect(self, cv, fx1, fy1, fx2, fy2, fill):
        xa, xb = sorted((self.x(fx1), self.x(fx2)))
        cv.rect(xa, self.y(fy1), xb, self.y(fy2), fill)


TYRE, GLASS, TAIL, HEAD = (22, 22, 24), (45, 60, 75), (200, 20, 25), (250, 240, 200)


def draw_wheel(cv, cx, cy, rx, ry):
    cv.ellipse(cx, cy, rx, ry, fill=TYRE)
    if ry > 1.2:
        cv.ellipse(cx, cy, 0.45 * rx, 0.45 * ry, fill=(140, 140, 145))


def draw_vehicle_side(cv, kind, box, facing_right, body, extra, rear_joined=False):
    """Side view of a Car / Van / Truck (front towards ``facing_right``).

    ``rear_joined``: the rear face is drawn next to this one (3/4 view), so the car's cabin
    runs straight up at the rear instead of sloping (otherwise it reads as two cars).
    """
    fr = Frame(*box, facing_right)
    dark = shade(body, 0.6)
    if kind == "Car":
        r, rx = 0.21 * fr.h, min(0.21 * fr.h, 0.13 * fr.w)
        back = ((0.0, 0.44), (0.0, 0.03)) if rear_joined else ((0.06, 0.44), (0.22, 0.02))
        cv.poly(fr.pts([*back, (0.60, 0.0), (0.78, 0.44)]), shade(body, 0.9))
        cv.poly(fr.pts([(0.0, 0.40), (0.76, 0.42), (1.0, 0.54), (1.0, 0.84), (0.0, 0.84)]), body)
        if rear_joined:                          # one long side window, no sloping back
            cv.poly(fr.pts([(0.04, 0.42), (0.04, 0.10), (0.58, 0.07), (0.72, 0.42)]), GLASS)
        else:
            cv.poly(fr.pts([(0.12, 0.42), (0.25, 0.08), (0.40, 0.07), (0.40, 0.42)]), GLASS)
            cv.poly(fr.pts([(0.44, 0.42), (0.44, 0.07), (0.58, 0.07), (0.72, 0.42)]), GLASS)
        fr.rect(cv, 0.1, 0.80, 0.9, 0.88, dark)
        fr.rect(cv, 0.94, 0.52, 1.0, 0.62, HEAD)
        fr.rect(cv, 0.0, 0.45, 0.04, 0.56, TAIL)
        wheels = (0.2, 0.8)
    elif kind == "Van":
        r, rx = 0.16 * fr.h, min(0.16 * fr.h, 0.10 * fr.w)
        cv.poly(fr.pts([(0.0, 0.04), (0.80, 0.02), (0.97, 0.42), (1.0, 0.5), (1.0, 0.86),
                        (0.0, 0.86)]), body)
        cv.poly(fr.pts([(0.80, 0.07), (0.94, 0.40), (0.78, 0.40)]), GLASS)
        panes = (0.62,) if extra < 0.4 else (0.06, 0.26, 0.46, 0.62)   # panel van vs minibus
        for px in panes:
            fr.rect(cv, px, 0.1, px + 0.14, 0.38, GLASS)
        fr.rect(cv, 0.0, 0.82, 1.0, 0.88, dark)
        fr.rect(cv, 0.95, 0.52, 1.0, 0.60, HEAD)
        fr.rect(cv, 0.0, 0.48, 0.03, 0.66, TAIL)
        wheels = (0.18, 0.82)
    else:  # Truck: cargo box + cab
        r, rx = 0.13 * fr.h, min(0.13 * fr.h, 0.06 * fr.w)
        cargo = (235, 235, 230) if extra < 0.5 else jitter_cargo(extra)
        fr.rect(cv, 0.0, 0.0, 0.75, 0.78, cargo)
        fr.rect(cv, 0.0, 0.74, 0.75, 0.78, shade(cargo, 0.7))
        cv.poly(fr.pts([(0.77, 0.30), (0.94, 0.30), (1.0, 0.50), (1.0, 0.86), (0.77, 0.86)]), body)
        cv.poly(fr.pts([(0.81, 0.35), (0.94, 0.35), (0.97, 0.55), (0.81, 0.55)]), GLASS)
        fr.rect(cv, 0.0, 0.78, 1.0, 0.87, (40, 40, 42))
        wheels = (0.12, 0.25, 0.87)
    for fx in wheels:
        draw_wheel(cv, fr.x(fx), fr.y(1.0) - r, rx, r)


def jitter_cargo(extra):
    palette = [(200, 40, 40), (40, 80, 160), (230, 190, 50), (80, 140, 80), (170, 170, 175)]
    return palette[int(extra * 100) % len(palette)]


def draw_vehicle_end(cv, kind, box, front, body, extra):
    """Rear (or front, if ``front``) view of a Car / Van / Truck."""
    fr = Frame(*box)
    dark = shade(body, 0.55)
    lamp = HEAD if front else TAIL
    if kind == "Car":
        for a in (0.06, 0.76):
            fr.rect(cv, a, 0.78, a + 0.18, 1.0, TYRE)
        fr.rect(cv, 0.0, 0.40, 1.0, 0.86, body)
        cv.poly(fr.pts([(0.08, 0.42), (0.2, 0.02), (0.8, 0.02), (0.92, 0.42)]), shade(body, 0.9))
        cv.poly(fr.pts([(0.14, 0.40), (0.24, 0.08), (0.76, 0.08), (0.86, 0.40)]), GLASS)
        fr.rect(cv, 0.0, 0.78, 1.0, 0.86, dark)
        for a in (0.03, 0.79):
            fr.rect(cv, a, 0.47, a + 0.18, 0.58, lamp)
        if front:
            fr.rect(cv, 0.3, 0.50, 0.7, 0.64, (30, 30, 32))
        fr.rect(cv, 0.41, 0.64, 0.59, 0.74, (235, 235, 225))
    elif kind == "Van":
        for a in (0.08, 0.74):
            fr.rect(cv, a, 0.84, a + 0.18, 1.0, TYRE)
        fr.rect(cv, 0.0, 0.04, 1.0, 0.88, body)
        if front:
            fr.rect(cv, 0.07, 0.12, 0.93, 0.42, GLASS)
            for a in (0.04, 0.80):
                fr.rect(cv, a, 0.55, a + 0.16, 0.64, lamp)
        else:
            fr.rect(cv, 0.07, 0.1, 0.47, 0.40, GLASS)
            fr.rect(cv, 0.53, 0.1, 0.93, 0.40, GLASS)
            for a in (0.02, 0.89):
                fr.rect(cv, a, 0.45, a + 0.09, 0.70, lamp)
        fr.rect(cv, 0.0, 0.82, 1.0, 0.88, dark)
    else:
        for a in (0.05, 0.70):
            fr.rect(cv, a, 0.85, a + 0.25, 1.0, TYRE)
        cargo = (235, 235, 230) if extra < 0.5 else jitter_cargo(extra)
        if front:
            fr.rect(cv, 0.06, 0.0, 0.94, 0.32, cargo)
            fr.rect(cv, 0.0, 0.28, 1.0, 0.88, body)
            fr.rect(cv, 0.08, 0.33, 0.92, 0.58, GLASS)
            fr.rect(cv, 0.25, 0.62, 0.75, 0.80, (35, 35, 38))
            for a in (0.03, 0.83):
                fr.rect(cv, a, 0.66, a + 0.14, 0.74, lamp)
        else:
            fr.rect(cv, 0.0, 0.0, 1.0, 0.82, cargo)
            ln = shade(cargo, 0.6)
            cv.line([(fr.x(0.5), fr.y(0.03)), (fr.x(0.5), fr.y(0.8))], ln, max(0.5, 0.01 * fr.w))
            for fy in (0.3, 0.6):
                cv.line([(fr.x(0.03), fr.y(fy)), (fr.x(0.97), fr.y(fy))], ln, max(0.5, 0.01 * fr.h))
            fr.rect(cv, 0.0, 0.82, 1.0, 0.88, (40, 40, 42))
            for a in (0.02, 0.90):
                fr.rect(cv, a, 0.74, a + 0.08, 0.81, lamp)


def draw_vehicle(cv, obj):
    """3/4 views: split the box into an end face and a side face by the observation angle."""
    kind, box, (h, w, l), a = obj.kind, obj.box_full, obj.dims, obj.alpha
    c, s = math.cos(a), math.sin(a)
    end_w, side_w = abs(s) * w, abs(c) * l
    frac_end = end_w / (end_w + side_w)
    facing_right, front = c > 0, s > 0
    x1, y1, x2, y2 = box
    if frac_end > 0.85:
        draw_vehicle_end(cv, kind, box, front, obj.colour, obj.extra)
    elif frac_end < 0.15:
        draw_vehicle_side(cv, kind, box, facing_right, obj.colour, obj.extra)
    else:
        end_right = facing_right == front    # rear face on the left of a right-facing car
        split = x2 - frac_end * (x2 - x1) if end_right else x1 + frac_end * (x2 - x1)
        side_box = (x1, y1, split, y2) if end_right else (split, y1, x2, y2)
        end_box = (split, y1, x2, y2) if end_right else (x1, y1, split, y2)
        draw_vehicle_side(cv, kind, side_box, facing_right, shade(obj.colour, 0.72), obj.extra,
                          rear_joined=not front)
        draw_vehicle_end(cv, kind, end_box, front, obj.colour, obj.extra)


def draw_pedestrian(cv, obj):
    """Head, torso, two arms and two legs; walking stride when seen from the side."""
    x1, y1, x2, y2 = obj.box_full
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    shirt, pants, skin, hair, stride, bag = obj.style
    side = abs(math.cos(obj.alpha)) > 0.5
    lw = max(0.5, 0.09 * h)
    tw = min(0.6 * w, 0.17 * h) if side else min(0.85 * w, 0.25 * h)
    hip, sho = y1 + 0.53 * h, y1 + 0.19 * h
    if side:
        feet = (cx - stride * 0.4 * w, cx + stride * 0.4 * w)
        hands = (cx - stride * 0.3 * w, cx + stride * 0.3 * w)
    else:
        feet = (cx - 0.3 * tw, cx + 0.3 * tw)
        hands = (cx - 0.5 * tw - 0.03 * h, cx + 0.5 * tw + 0.03 * h)
    for fx in feet:
        cv.line([(cx + (fx - cx) * 0.15, hip), (fx, y2 - lw / 2)], pants, lw)
    cv.rect(cx - tw / 2, sho, cx + tw / 2, hip + 0.04 * h, shirt)
    if bag:
        bx = cx + (0.5 if obj.alpha > 0 else -0.5) * tw
        cv.rect(bx - 0.06 * h, y1 + 0.25 * h, bx + 0.06 * h, y1 + 0.45 * h, shade(pants, 0.7))
    for i, hx in enumerate(hands):
        sx = cx + (-1 if i == 0 else 1) * 0.35 * tw
        cv.line([(sx, sho + lw / 2), (hx, y1 + 0.5 * h)], shade(shirt, 0.85), lw * 0.8)
    r = 0.075 * h
    cv.ellipse(cx, y1 + r, r * 0.85, r, fill=skin)
    cv.ellipse(cx, y1 + r * 0.7, r * 0.85, r * 0.7, fill=hair)


def draw_cyclist(cv, obj):
    """Two wheels (ellipses foreshortened by the view angle), frame and a leaning rider."""
    x1, y1, x2, y2 = obj.box_full
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    shirt, pants, skin, frame_col = obj.style
    ca = abs(math.cos(obj.alpha))
    d = 1 if math.cos(obj.alpha) >= 0 else -1          # front direction in the image
    r = 0.19 * h
    rx = max(0.12 * r, r * ca)
    sep = max(0.0, w - 2 * rx) * ca
    rear, front = cx - d * sep / 2, cx + d * sep / 2
    wy = y2 - r
    tyre_w = max(0.5, 0.22 * r)
    for xw in (rear, front):
        cv.ellipse(xw, wy, rx, r, outline=TYRE, width=tyre_w)
    lw = max(0.5, 0.05 * h)
    seat = (rear + 0.35 * (front - rear), y2 - 2.1 * r)
    bar = (front - 0.12 * (front - rear), y2 - 2.35 * r)
    crank = (cx, y2 - 0.9 * r)
    cv.line([(rear, wy), seat, crank, (rear, wy)], frame_col, lw)
    cv.line([crank, bar, (front, wy)], frame_col, lw)
    lean = 0.25 * sep
    sho = (seat[0] + d * lean, y1 + 0.2 * h)
    tw = max(0.09 * h, (1 - ca) * 0.5 * w)
    cv.line([(crank[0] - 0.15 * sep, crank[1]), seat, (crank[0] + 0.1 * sep, crank[1] + 0.3 * r)],
            pants, max(lw, 0.08 * h))
    cv.poly([(seat[0] - tw / 2, seat[1]), (seat[0] + tw / 2, seat[1]),
             (sho[0] + tw / 2, sho[1]), (sho[0] - tw / 2, sho[1])], shirt)
    cv.line([sho, bar], shade(shirt, 0.85), max(lw, 0.06 * h))
    rh = 0.075 * h
    cv.ellipse(sho[0] + d * 0.02 * h, y1 + rh, rh * 0.9, rh, fill=skin)
    cv.ellipse(sho[0] + d * 0.02 * h, y1 + 0.7 * rh, rh * 0.95, 0.75 * rh, fill=obj.helmet)


# --------------------------------------------------------------------------- scene objects


@dataclass
class Obj:
    kind: str                 # Car, Pedestrian, Cyclist, Van, Truck
    s: float
    t: float
    ry: float
    dims: tuple               # (h, w, l)
    colour: tuple = (0, 0, 0)
    style: tuple = ()
    extra: float = 0.0
    helmet: tuple = (0, 0, 0)
    loc: tuple = (0.0, 0.0, 0.0)
    alpha: float = 0.0
    box_full: tuple = ()
    box: tuple = ()
    truncated: float = 0.0
    occluded: int = 0
    label: str = ""           # KITTI type written to the label file ("DontCare" if tiny)


@dataclass
class Label:
    type: str
    box: tuple
    truncated: float = -1.0
    occluded: int = -1
    alpha: float = -10.0
    dims: tuple = (-1.0, -1.0, -1.0)
    loc: tuple = (-1000.0, -1000.0, -1000.0)
    ry: float = -10.0

    def line(self) -> str:
        x1, y1, x2, y2 = self.box
        if self.type == "DontCare":
            return (f"DontCare -1 -1 -10 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} "
                    f"-1 -1 -1 -1000 -1000 -1000 -10")
        h, w, l = self.dims
        x, y, z = self.loc
        return (f"{self.type} {self.truncated:.2f} {self.occluded:d} {self.alpha:.2f} "
                f"{x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} {h:.2f} {w:.2f} {l:.2f} "
                f"{x:.2f} {y:.2f} {z:.2f} {self.ry:.2f}")


@dataclass
class Knobs:
    """Everything difficulty controls, in one place."""

    n_labelled: float         # Poisson mean of labelled-class proposals (plus one)
    n_distractors: float      # Poisson mean of Van/Truck proposals
    p_far: float              # share of proposals in the far depth band
    far_max: float            # far end of that band (metres)
    p_group: float            # proposal placed just behind an earlier one (occlusion)
    p_keep_occluded: float    # acceptance probability of a partly hidden proposal
    n_clutter: float          # trees, poles, signs, bollards, bushes
    n_patches: float          # road patches and shadows
    n_dontcare: float         # far clusters
    noise: float              # Gaussian noise sigma (0-255 scale)
    light: float              # brightness / contrast half-range
    cast: float               # per-channel colour cast half-range

    @classmethod
    def from_difficulty(cls, d: float) -> "Knobs":
        return cls(n_labelled=3.0 + 2.8 * d, n_distractors=0.25 + 0.65 * d,
                   p_far=min(0.85, 0.2 + 0.25 * d), far_max=40.0 + 20.0 * d,
                   p_group=min(0.7, 0.1 + 0.25 * d), p_keep_occluded=min(1.0, 0.25 + 0.6 * d),
                   n_clutter=3.0 + 5.0 * d, n_patches=1.0 + 3.0 * d, n_dontcare=0.3 + 0.6 * d,
                   noise=1.5 + 4.5 * d, light=0.06 + 0.18 * d, cast=0.02 + 0.05 * d)


class Scene:
    """One image: camera, background, objects, labels."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, difficulty: float):
        self.rng, self.W, self.H = rng, width, height
        self.k = Knobs.from_difficulty(difficulty)
        self.cam = Camera(f=0.58 * width, cx=width / 2 + rng.uniform(-2, 2),
                          cy=0.46 * height + rng.uniform(-0.035, 0.035) * height,
                          yaw=rng.uniform(-0.07, 0.07), offset=rng.uniform(-0.6, 0.6))
        self.min_h = MIN_LABEL_H * height / 128.0
        self.img = Image.new("RGB", (width * SS, height * SS))
        self.cv = Canvas(self.img)
        self.road = jitter(rng, (95, 95, 98), 15)

    # ---- background -------------------------------------------------------------------

    def draw_background(self):
        rng, H, W = self.rng, self.H * SS, self.W * SS
        hz = int(round(self.cam.cy * SS))
        overcast = rng.random() < 0.35
        top = np.array((170, 175, 180) if overcast else (90, 140, 215), float)
        low = np.array((215, 215, 215) if overcast else (200, 220, 240), float)
        top, low = top + rng.uniform(-15, 15, 3), low + rng.uniform(-15, 15, 3)
        ground = np.array([(95, 120, 65), (130, 115, 90), (120, 120, 115)][rng.integers(3)], float)
        arr = np.empty((H, W, 3), np.float32)
        a = np.linspace(0, 1, max(hz, 1))[:, None]
        arr[:hz] = (top * (1 - a) + low * a)[:, None, :]
        g = np.linspace(0, 1, H - hz)[:, None]
        arr[hz:] = (shade(ground, 0.8) * (1 - g) + ground * (1.0 + 0.15 * g))[:, None, :]
        self.img.paste(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
        self.draw_skyline(low)
        for side in (-1, 1):
            if rng.random() < 0.75:
                self.draw_buildings(side)
        self.draw_road()
        self.draw_clutter()

    def draw_skyline(self, sky_low):
        """Hazy distant blocks and tree lines on the horizon."""
        rng, cv, cy = self.rng, self.cv, self.cam.cy
        haze = shade(sky_low, 0.75)
        for _ in range(rng.integers(4, 10 + int(6 * self.k.p_far))):
            u = rng.uniform(0, self.W)
            bw, bh = rng.uniform(3, 30), rng.uniform(1, 8)
            if rng.random() < 0.5:
                cv.rect(u, cy - bh, u + bw, cy + 1, jitter(rng, haze, 12))
            else:
                cv.ellipse(u, cy, bw / 2, bh, fill=jitter(rng, shade((70, 100, 70), 1.2), 12))

    def draw_buildings(self, side):
        rng, cam, cv = self.rng, self.cam, self.cv
        blocks, t = [], rng.uniform(4, 20)
        while t < 130:
            length = rng.uniform(8, 25)
            if rng.random() < 0.75:
                colour = jitter(rng, BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))])
                blocks.append((t, t + length, side * rng.uniform(WALK, WALK + 5),
                               rng.uniform(5, 18), colour))
            t += length + (rng.uniform(2, 10) if rng.random() < 0.3 else 0)
        for t0, t1, sb, hb, col in reversed(blocks):          # far to near
            cv.poly(cam.poly([(sb, 0, t0), (sb, hb, t0), (sb + side * 12, hb, t0),
                              (sb + side * 12, 0, t0)]), shade(col, 0.75))
            cv.poly(cam.poly([(sb, 0, t0), (sb, hb, t0), (sb, hb, t1), (sb, 0, t1)]), col)
            if t0 > 60:
                continue
            lit = rng.random() < 0.3
            for up in np.arange(1.6, hb - 1.5, 3.0):
                for tw in np.arange(t0 + 1.0, t1 - 1.5, 3.2):
                    win = (60, 70, 85) if not lit or rng.random() < 0.6 else (230, 210, 140)
                    cv.poly(cam.poly([(sb, up, tw), (sb, up + 1.4, tw), (sb, up + 1.4, tw + 1.3),
                                      (sb, up, tw + 1.3)]), win)

    def ground_quad(self, s0, s1, t0, t1, colour):
        self.cv.poly(self.cam.poly([(s0, 0, t0), (s1, 0, t0), (s1, 0, t1), (s0, 0, t1)]), colour)

    def draw_road(self):
        rng = self.rng
        walk = jitter(rng, (165, 162, 155), 12)
        for side in (-1, 1):
            self.ground_quad(side * CURB, side * WALK, 2, 2000, walk)
            self.ground_quad(side * CURB, side * (CURB + 0.15), 2, 2000, shade(walk, 1.15))
        self.ground_quad(-CURB, CURB, 2, 2000, self.road)
        for _ in range(rng.poisson(self.k.n_patches)):            # patches, stains, shadows
            t0 = rng.uniform(6, 60)
            if rng.random() < 0.5:
                s0, ds, dt = rng.uniform(-CURB, CURB - 1), rng.uniform(1, 4), rng.uniform(2, 10)
            else:                                                   # shadow across the road
                s0, ds, dt = -CURB, 2 * CURB * rng.uniform(0.3, 1), rng.uniform(0.8, 3)
            k = rng.uniform(0.45, 0.8) if rng.random() < 0.7 else 1.2     # mostly darker
            self.ground_quad(s0, min(CURB, s0 + ds), t0, t0 + dt, shade(self.road, k))
        paint = (235, 235, 225)
        for s in (-EDGE, EDGE):
            self.ground_quad(s - 0.08, s + 0.08, 2, 300, paint)
        yellow_centre = rng.random() < 0.3
        for s in (-LANE / 2, LANE / 2):
            colour = (225, 190, 60) if yellow_centre and s < 0 else paint
            t = rng.uniform(2, 9)
            while t < 90:
                self.ground_quad(s - 0.07, s + 0.07, t, t + 3, colour)
                t += 9
        if rng.random() < 0.15:                                     # zebra crossing
            t0 = rng.uniform(10, 30)
            for s in np.arange(-EDGE + 0.25, EDGE, 1.0):
                self.ground_quad(s, s + 0.5, t0, t0 + 3, paint)

    def draw_clutter(self):
        """Trees, street lamps, signs, bollards and bushes along the sidewalks, far to near."""
        rng, cam, cv = self.rng, self.cam, self.cv
        items = []
        for _ in range(rng.poisson(self.k.n_clutter)):
            side = 1 if rng.random() < 0.5 else -1
            items.append((rng.uniform(6, 90), side, rng.integers(5), rng.random()))
        for t, side, kind, u in sorted(items, reverse=True):
            s = side * (rng.uniform(9.4, 10.3) if kind in (0, 4) else rng.uniform(7.6, 8.0))
            z = cam.depth(s, t)
            if z < 1.5:
                continue
            base = cam.project(s, 0.0, t)
            px = cam.f / z                                          # pixels per metre here
            if kind == 0:                                           # tree
                top = cam.project(s, 3.0, t)
                cv.line([base, top], (90, 65, 45), 0.25 * px)
                ch = rng.uniform(3.5, 5.5)
                c = cam.project(s, ch, t)
                cv.ellipse(c[0], c[1], rng.uniform(1.2, 2.5) * px, rng.uniform(1.2, 2.2) * px,
                           fill=jitter(rng, (50, 95, 45), 20))
            elif kind == 1:                                         # street lamp
                hp = rng.uniform(5, 8)
                top = cam.project(s, hp, t)
                arm = cam.project(s - side * 1.5, hp, t)
                cv.line([base, top, arm], (70, 72, 75), 0.15 * px)
                cv.rect(arm[0] - 0.3 * px, arm[1], arm[0] + 0.3 * px, arm[1] + 0.2 * px,
                        (230, 230, 210))
            elif kind == 2:                                         # traffic sign
                top = cam.project(s, 2.3, t)
                cv.line([base, top], (120, 120, 125), 0.1 * px)
                r = 0.35 * px
                shape = int(u * 3)
                if shape == 0:
                    cv.ellipse(top[0], top[1] - r, r, r, fill=(200, 30, 30))
                    cv.ellipse(top[0], top[1] - r, 0.7 * r, 0.7 * r, fill=(240, 240, 240))
                elif shape == 1:
                    cv.rect(top[0] - r, top[1] - 2 * r, top[0] + r, top[1], (30, 70, 170))
                else:
                    cv.poly([(top[0] - r, top[1]), (top[0] + r, top[1]),
                             (top[0], top[1] - 1.8 * r)], (230, 200, 40))
            elif kind == 3:                                         # bollard / hydrant
                top = cam.project(s, rng.uniform(0.6, 1.1), t)
                colour = (60, 60, 60) if u < 0.6 else (190, 40, 30)
                cv.line([base, top], jitter(rng, colour), 0.2 * px)
            else:                                                   # bush
                cv.ellipse(base[0], base[1] - 0.4 * px, rng.uniform(0.8, 1.6) * px, 0.6 * px,
                           fill=jitter(rng, (45, 85, 40), 15))

    # ---- objects ----------------------------------------------------------------------

    def sample_depth(self) -> float:
        k, rng = self.k, self.rng
        if rng.random() < k.p_far:
            return rng.uniform(22.0, k.far_max)
        return rng.uniform(5.5, 22.0)

    def propose(self, kind: str, ref: Obj | None) -> Obj:
        """A 3-D placement for ``kind``: lane, heading and depth from KITTI-like road use."""
        rng, yaw = self.rng, self.cam.yaw
        away, toward = yaw - math.pi / 2, yaw + math.pi / 2
        crossing = (yaw, yaw + math.pi)[rng.integers(2)]
        u = rng.random()
        if kind == "Pedestrian":
            if u < 0.2:
                s, ry = rng.uniform(-EDGE, EDGE), crossing
            else:
                s = rng.choice((-1, 1)) * rng.uniform(CURB + 0.3, WALK - 0.4)
                if rng.random() < 0.7:
                    ry = (away, toward)[rng.integers(2)]
                else:
                    ry = rng.uniform(-math.pi, math.pi)
        elif kind == "Cyclist":
            if u < 0.15:
                s, ry = rng.uniform(-EDGE, EDGE), crossing
            else:
                side = rng.choice((-1, 1))
                s, ry = side * rng.uniform(EDGE - 0.6, EDGE + 0.6), away if side > 0 else toward
        else:                                                    # Car, Van, Truck
            if u < 0.45:
                s, ry = rng.choice((0.0, LANE)), away
            elif u < 0.65:
                s, ry = -LANE, toward
            elif u < 0.92 or kind == "Truck":
                side = rng.choice((-1, 1))
                s, ry = side * rng.uniform(EDGE + 0.9, CURB - 0.9), away if side > 0 else toward
                ry += rng.uniform(-0.15, 0.15)
            else:
                s, ry = rng.uniform(-EDGE, EDGE), crossing
            s += rng.uniform(-0.35, 0.35)
        t = self.sample_depth()
        if ref is not None and rng.random() < self.k.p_group:   # just behind an earlier object
            t = ref.t + rng.uniform(1.5, 9.0)
            if kind in ("Pedestrian", "Cyclist") and np.sign(s) != np.sign(ref.s):
                s = -s
        ry = wrap_angle(ry + rng.normal(0, 0.04))
        dims = tuple(float(rng.uniform(lo, hi)) for lo, hi in DIMS[kind])
        obj = Obj(kind, float(s), float(t), float(ry), dims)
        self.dress(obj)
        return obj

    def dress(self, obj: Obj):
        rng = self.rng
        obj.colour = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 14)
        obj.extra = float(rng.random())
        cloth = lambda: jitter(rng, CLOTH_COLOURS[rng.integers(len(CLOTH_COLOURS))], 15)
        skin = SKIN[rng.integers(len(SKIN))]
        if obj.kind == "Pedestrian":
            hair = jitter(rng, (40, 30, 25), 20) if rng.random() < 0.85 else (200, 180, 120)
            obj.style = (cloth(), cloth(), skin, hair, rng.uniform(0.1, 1.0), rng.random() < 0.25)
        elif obj.kind == "Cyclist":
            obj.style = (cloth(), cloth(), skin, jitter(rng, CLOTH_COLOURS[rng.integers(10)], 10))
            obj.helmet = cloth() if rng.random() < 0.6 else (40, 30, 25)

    def project_box(self, obj: Obj) -> bool:
        """Fill loc, alpha, box_full, box, truncated; False if behind the camera or too cut."""
        x, _, z = self.cam.to_cam(obj.s, 0.0, obj.t)
        obj.loc = (float(x), CAM_HEIGHT, float(z))
        corners = box_corners(obj.dims, obj.loc, obj.ry)
        if corners[2].min() < 1.0:
            return False
        u, v = self.cam.project_cam(*corners)
        obj.box_full = (float(u.min()), float(v.min()), float(u.max()), float(v.max()))
        x1, y1, x2, y2 = obj.box_full
        cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
        cx2, cy2 = min(x2, self.W - 1.0), min(y2, self.H - 1.0)
        if cx2 - cx1 < 2.0 or cy2 - cy1 < 3.0:
            return False
        obj.box = (cx1, cy1, cx2, cy2)
        obj.truncated = 1.0 - (cx2 - cx1) * (cy2 - cy1) / ((x2 - x1) * (y2 - y1))
        obj.alpha = wrap_angle(obj.ry - math.atan2(float(x), float(z)))
        return obj.truncated <= 0.6

    def place_objects(self) -> list[Obj]:
        rng, k = self.rng, self.k
        kinds = list(rng.choice(CLASSES, size=1 + rng.poisson(k.n_labelled), p=CLASS_WEIGHTS))
        kinds += list(rng.choice(DISTRACTORS, size=rng.poisson(k.n_distractors), p=(0.65, 0.35)))
        proposals: list[Obj] = []
        for kind in kinds:
            ref = proposals[rng.integers(len(proposals))] if proposals else None
            proposals.append(self.propose(str(kind), ref))
        covered = np.zeros((self.H, self.W), bool)
        accepted: list[Obj] = []
        for obj in sorted(proposals, key=lambda o: o.t):            # nearest first
            if any(self.collide(obj, o) for o in accepted) or not self.project_box(obj):
                continue
            x1, y1, x2, y2 = obj.box
            region = covered[int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))]
            visible = 1.0 - float(region.mean()) if region.size else 0.0
            if visible < 0.2 or (visible < 0.85 and rng.random() > k.p_keep_occluded):
                continue
            obj.occluded = 0 if visible >= 0.85 else 1 if visible >= 0.5 else 2
            tiny = obj.box_full[3] - obj.box_full[1] < self.min_h and obj.kind in CLASSES
            obj.label = "DontCare" if tiny else obj.kind
            if not tiny:
                region[:] = True
            accepted.append(obj)
        return accepted

    @staticmethod
    def collide(a: Obj, b: Obj) -> bool:
        """Ground footprints overlap (road-aligned extents, 0.4 m margin)?"""
        def ext(o):
            along = abs(math.sin(o.ry))          # 1 when heading along the road
            return (along * o.dims[1] + (1 - along) * o.dims[2],
                    along * o.dims[2] + (1 - along) * o.dims[1])
        (sa, ta), (sb, tb) = ext(a), ext(b)
        return abs(a.s - b.s) < (sa + sb) / 2 + 0.4 and abs(a.t - b.t) < (ta + tb) / 2 + 0.4

    def dontcare_clusters(self) -> tuple[list[Obj], list[Label]]:
        """Small far-away groups of vehicles/people, covered by one DontCare box each."""
        rng, members, labels = self.rng, [], []
        for _ in range(rng.poisson(self.k.n_dontcare)):
            t0, s0 = rng.uniform(55, 110), rng.uniform(-CURB, CURB)
            group = []
            for _ in range(rng.integers(2, 5)):
                kind = ("Car", "Car", "Pedestrian", "Van")[rng.integers(4)]
                o = Obj(kind, s0 + rng.uniform(-3, 3), t0 + rng.uniform(0, 8),
                        self.cam.yaw + (-1) ** int(rng.integers(2)) * math.pi / 2,
                        tuple(float(rng.uniform(lo, hi)) for lo, hi in DIMS[kind]))
                self.dress(o)
                if self.project_box(o):
                    group.append(o)
            if group:
                x1 = max(0.0, min(o.box[0] for o in group) - 1)
                y1 = max(0.0, min(o.box[1] for o in group) - 1)
                x2 = min(self.W - 1.0, max(o.box[2] for o in group) + 1)
                y2 = min(self.H - 1.0, max(o.box[3] for o in group) + 1)
                labels.append(Label("DontCare", (x1, y1, x2, y2)))
                members += group
        return members, labels

    def draw_object(self, obj: Obj):
        x1, y1, x2, y2 = obj.box_full
        w = x2 - x1
        self.cv.ellipse((x1 + x2) / 2, y2, 0.55 * w, max(0.4, 0.05 * (y2 - y1)),
                        fill=shade(self.road, 0.45))                  # contact shadow
        if obj.kind == "Pedestrian":
            draw_pedestrian(self.cv, obj)
        elif obj.kind == "Cyclist":
            draw_cyclist(self.cv, obj)
        else:
            draw_vehicle(self.cv, obj)

    # ---- finish -----------------------------------------------------------------------

    def finish(self) -> np.ndarray:
        """Downsample, then global lighting (brightness, contrast, colour cast) and noise."""
        rng, k = self.rng, self.k
        img = self.img.reduce(SS) if SS > 1 else self.img
        arr = np.asarray(img, dtype=np.float32)
        contrast = 1.0 + rng.uniform(-k.light, k.light)
        gain = (1.0 + rng.uniform(-k.light, k.light)) * (1.0 + rng.uniform(-k.cast, k.cast, 3))
        arr = ((arr - 128.0) * contrast + 128.0) * gain.astype(np.float32)
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(k.noise)
        return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render(seed: int, split: str, index: int, width: int = 416, height: int = 128,
           difficulty: float = 1.0) -> tuple[np.ndarray, list[Label], dict]:
    """Image (H, W, 3 uint8), its KITTI labels and its calib matrices, from (seed, split, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODE[split], index]))
    scene = Scene(rng, width, height, difficulty)
    scene.draw_background()
    objects = scene.place_objects()
    far, dc_labels = scene.dontcare_clusters()
    for obj in sorted(objects + far, key=lambda o: -o.t):            # farthest first
        scene.draw_object(obj)
    image = scene.finish()
    labels = [Label(o.label, o.box) if o.label == "DontCare" else
              Label(o.label, o.box, round(o.truncated, 2), o.occluded, o.alpha, o.dims, o.loc, o.ry)
              for o in objects]
    labels += dc_labels
    cam = scene.cam
    p2 = [cam.f, 0.0, cam.cx, 0.0, 0.0, cam.f, cam.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return image, labels, {"P2": p2}


def calib_text(calib: dict) -> str:
    p2 = " ".join(f"{v:.12e}" for v in calib["P2"])
    eye34 = " ".join(f"{v:.12e}" for v in (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0))
    eye33 = " ".join(f"{v:.12e}" for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lines = [f"P0: {p2}", f"P1: {p2}", f"P2: {p2}", f"P3: {p2}", f"R0_rect: {eye33}",
             f"Tr_velo_to_cam: {eye34}", f"Tr_imu_to_velo: {eye34}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- dataset writing

_JOB: dict = {}


def _init_worker(job: dict):
    _JOB.clear()
    _JOB.update(job)


def _write_one(task) -> dict:
    split, index, image_id = task
    j = _JOB
    image, labels, calib = render(j["seed"], split, index, j["width"], j["height"], j["difficulty"])
    root = Path(j["root"]) / "training"
    name = f"{image_id:06d}"
    Image.fromarray(image).save(root / "image_2" / f"{name}.png", format="PNG",
                                compress_level=PNG_COMPRESS)
    (root / "label_2" / f"{name}.txt").write_text("".join(lb.line() + "\n" for lb in labels))
    (root / "calib" / f"{name}.txt").write_text(calib_text(calib))
    counts: dict[str, int] = {}
    for lb in labels:
        counts[lb.type] = counts.get(lb.type, 0) + 1
    return counts


def validate(*, seed, num_train, num_val, num_test, width, height, difficulty, workers):
    """Raise ValueError with a one-line message for unusable settings."""
    checks = [
        (isinstance(seed, int) and seed >= 0, f"seed must be a non-negative integer, got {seed!r}"),
        (all(isinstance(n, int) and n >= 0 for n in (num_train, num_val, num_test)),
         f"image counts must be non-negative integers, got {num_train!r}/{num_val!r}/{num_test!r}"),
        (num_train + num_val + num_test > 0 if all(isinstance(n, int) for n in
                                                 (num_train, num_val, num_test)) else True,
         "at least one image is needed"),
        (isinstance(width, int) and 64 <= width <= 4096,
         f"width must be in [64, 4096], got {width!r}"),
        (isinstance(height, int) and 32 <= height <= 4096,
         f"height must be in [32, 4096], got {height!r}"),
        (isinstance(difficulty, (int, float)) and 0.0 <= difficulty <= 4.0,
         f"difficulty must be in [0, 4], got {difficulty!r}"),
        (isinstance(workers, int) and workers >= 1, f"workers must be >= 1, got {workers!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def generate(out_dir, *, seed: int = 0, num_train: int = 2000, num_val: int = 300,
             num_test: int = 300, width: int = 416, height: int = 128, difficulty: float = 1.0,
             workers: int = DEFAULT_WORKERS, progress: bool = True) -> Path:
    """Write the dataset to ``out_dir`` atomically (temporary sibling, then rename); return it.

    An existing ``out_dir`` is replaced only if it is an earlier synthetic dataset (it has
    ``synth_meta.json``) or empty; anything else raises ``FileExistsError``.
    """
    validate(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test, width=width,
             height=height, difficulty=difficulty, workers=workers)
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and ((out / "synth_meta.json").is_file()
                                               or not any(out.iterdir()))):
        raise FileExistsError(f"{out}: exists and is not a synthetic dataset; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("image_2", "label_2", "calib"):
            (tmp / "training" / sub).mkdir(parents=True)
        (tmp / "ImageSets").mkdir()
        tasks, image_id = [], 0
        for split, n in zip(SPLITS, (num_train, num_val, num_test)):
            ids = []
            for index in range(n):
                tasks.append((split, index, image_id))
                ids.append(f"{image_id:06d}")
                image_id += 1
            (tmp / "ImageSets" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
        job = {"root": str(tmp), "seed": seed, "width": width, "height": height,
               "difficulty": float(difficulty)}
        counts: dict[str, int] = {}
        from reproduce.core.progress import Progress
        # a bar on a terminal, a line now and then in a log file (no CR-separated updates)
        with Progress(len(tasks), "synth", unit="images", rate_unit="img", enabled=progress,
                      min_interval=5.0) as bar:
            if workers == 1:
                _init_worker(job)
                results = map(_write_one, tasks)
                for c in results:
                    _merge(counts, c)
                    bar.update()
            else:
                with multiprocessing.get_context().Pool(workers, _init_worker, (job,)) as pool:
                    for c in pool.imap_unordered(_write_one, tasks, chunksize=8):
                        _merge(counts, c)
                        bar.update()
        meta = {"generator": "reproduce.data.synth", "version": GENERATOR_VERSION, "seed": seed,
                "num_train": num_train, "num_val": num_val, "num_test": num_test,
                "width": width, "height": height, "difficulty": float(difficulty),
                "classes": list(CLASSES), "distractors": list(DISTRACTORS),
                "label_counts": dict(sorted(counts.items()))}
        (tmp / "synth_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merge(total: dict, part: dict):
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def file_digests(root) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex), for determinism checks."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def load_settings(params_path) -> dict:
    """data.synth from params.yaml over the built-in defaults (defaults if the file is absent)."""
    from reproduce.core.config import load_params
    path = Path(params_path)
    if not path.is_file():
        return dict(DEFAULTS)
    section = (load_params(path).get("data") or {}).get("synth") or {}
    return {**DEFAULTS, **section}


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m reproduce.synth",
                description="Write a seeded synthetic road-scene dataset in KITTI's native layout. "
                            "Defaults come from params.yaml (data.synth); flags override them.")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", help="dataset root (default: data.synth.out)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-val", type=int)
    p.add_argument("--num-test", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--difficulty", type=float, help="0 easy, 1 default, 2 hard")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="parallel processes (default: %(default)s); output does not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        cfg = load_settings(args.params)
    except Exception as e:   # ConfigError, YAML errors
        p.error(f"cannot read {args.params}: {e}".replace("\n", " "))
    for key in ("out", "seed", "num_train", "num_val", "num_test", "width", "height", "difficulty"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    try:
        out = generate(cfg["out"], seed=cfg["seed"], num_train=cfg["num_train"],
                       num_val=cfg["num_val"], num_test=cfg["num_test"], width=cfg["width"],
                       height=cfg["height"], difficulty=float(cfg["difficulty"]),
                       workers=args.workers, progress=not args.quiet)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    total = cfg["num_train"] + cfg["num_val"] + cfg["num_test"]
    print(f"wrote {total} images to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
