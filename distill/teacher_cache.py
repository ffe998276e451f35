"""Frozen-teacher outputs computed once and read by every KD run: ``TeacherCache``.

The teacher never changes during distillation and runs in eval mode, so its output for an image
is a function of that image's exact input tensors (pixels, padding, and the query groups the
method feeds it). The cache stores each image's slice of the teacher's DetectorOutput under a
hash of exactly those inputs (the encoder side once per image, the decoder side once per set
of query groups). A lookup therefore hits only when the live teacher would have
been given the same inputs, whatever the augmentation, method or seed; anything else (a random
crop, KD-DETR's per-step random points) misses and runs the live teacher. It is a memo, never
an approximation of the inputs.

It is not bitwise equal to the live teacher: a batch of other images (or another number of
padding slots in a query group) makes the CPU kernels round differently, by ~1e-6 (measured
on the mini teacher: up to 4.6e-6 between batch 1 and batch 8, 7e-7 between group sizes 4 and
9, 0 between two batches of 8 with different companions). tests/test_teacher_cache.py states
the tolerance of a short KD run from the cache against the live teacher.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from models.outputs import DetectorOutput, GroupOutput, QueryGroup

FORMAT = 1
#: per-query tensors of a DetectorOutput ([L,B,Q,...]: batch on dim 1)
LAYER_FIELDS = ("layer_logits", "layer_boxes", "layer_states", "layer_references")
#: per-image tensors with batch on dim 0
IMAGE_FIELDS = ("memory", "memory_pos", "memory_padding_mask", "valid_ratios")
OPTIONAL_FIELDS = ("enc_logits", "enc_boxes")


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run: another format, or built from another teacher."""


def _digest(h, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    h.update(tensor.numpy().tobytes() if tensor.dtype != torch.bool else tensor.to(torch.uint8).numpy().tobytes())


def _valid(group: QueryGroup, b: int) -> Tensor:
    if group.valid is None:
        return torch.ones(group.num_queries, dtype=torch.bool, device=group.content.device)
    return group.valid[b]


def image_key(images: Tensor, pad_mask: Tensor, b: int) -> str:
    """Hash of image ``b``'s pixels and padding: what the encoder reads."""
    h = hashlib.sha1()
    _digest(h, images[b])
    _digest(h, pad_mask[b])
    return h.hexdigest()


def input_key(images: Tensor, pad_mask: Tensor, groups: list[QueryGroup] | None, b: int) -> str:
    """Hash of everything the teacher reads for image ``b``: its pixels and padding (which also
    fix the padded batch size), and for each group its valid queries and their mask."""
    h = hashlib.sha1(image_key(images, pad_mask, b).encode())
    for group in groups or []:
        v = _valid(group, b)
        h.update(f"{group.name}|{group.see_detection_queries}".encode())
        _digest(h, group.content[b][v])
        _digest(h, group.boxes[b][v])
        if group.self_attn_mask is not None:
            _digest(h, group.self_attn_mask[v][:, v])
    return h.hexdigest()


def image_part(out: DetectorOutput, b: int) -> dict:
    """Image ``b``'s encoder-side outputs (the same whatever queries the decoder gets), cloned so
    that saving stores only this slice."""
    part = {name: getattr(out, name)[b].clone() for name in IMAGE_FIELDS}
    part.update({name: getattr(out, name)[b].clone() for name in OPTIONAL_FIELDS if getattr(out, name) is not None})
    part["features"] = [f[b].clone() for f in out.features]
    part["spatial_shapes"] = [list(s) for s in out.spatial_shapes]
    part["level_start_index"] = list(out.level_start_index)
    return part


def decoder_part(out: DetectorOutput, groups: list[QueryGroup] | None, b: int) -> dict:
    """Image ``b``'s decoder outputs: the detection queries' and each group's valid slots."""
    part = {name: getattr(out, name)[:, b].clone() for name in LAYER_FIELDS}
    part["groups"] = {}
    for group in groups or []:
        v = _valid(group, b)
        g = out.groups[group.name]
        part["groups"][group.name] = {name: getattr(g, name)[:, b][:, v].clone() for name in LAYER_FIELDS}
    return part


def assemble(image_parts: list[dict], decoder_parts: list[dict], groups: list[QueryGroup] | None,
             device: torch.device) -> DetectorOutput:
    """The batched DetectorOutput of per-image parts; group padding slots are zeros (every
    method reads a group's valid slots only)."""
    shapes = [tuple(s) for s in image_parts[0]["spatial_shapes"]]
    if any([tuple(s) for s in e["spatial_shapes"]] != shapes for e in image_parts):
        raise ValueError("teacher cache: images of one batch have different memory shapes")
    fields = {name: torch.stack([e[name] for e in decoder_parts], 1).to(device) for name in LAYER_FIELDS}
    fields.update({name: torch.stack([e[name] for e in image_parts]).to(device) for name in IMAGE_FIELDS})
    for name in OPTIONAL_FIELDS:
        fields[name] = torch.stack([e[name] for e in image_parts]).to(device) if name in image_parts[0] else None
    fields["features"] = [torch.stack([e["features"][i] for e in image_parts]).to(device)
                          for i in range(len(image_parts[0]["features"]))]
    outputs = {}
    for group in groups or []:
        per_image = [e["groups"][group.name] for e in decoder_parts]
        tensors = {}
        for name in LAYER_FIELDS:
            first = per_image[0][name]
            full = first.new_zeros(first.shape[0], len(per_image), group.num_queries, first.shape[-1])
            for b, slots in enumerate(per_image):
                full[:, b, _valid(group, b).cpu()] = slots[name]
            tensors[name] = full.to(device)
        outputs[group.name] = GroupOutput(group=group, **tensors)
    return DetectorOutput(spatial_shapes=shapes, level_start_index=list(image_parts[0]["level_start_index"]),
                          groups=outputs, **fields)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TeacherCache:
    """Per-image teacher outputs for one teacher checkpoint: encoder-side parts keyed by
    :func:`image_key` (shared by every method that feeds the teacher the same image) and
    decoder parts keyed by :func:`input_key`.

    ``record=True`` stores every live teacher output it sees (the cache builder); a reading run
    uses ``record=False`` and counts hits and misses, which the run's summary reports.
    """

    def __init__(self, teacher_sha256: str, images: dict | None = None, entries: dict | None = None,
                 record: bool = False, note: dict | None = None):
        self.teacher_sha256 = teacher_sha256
        self.note = note if note is not None else {}   # what the builder says: methods served, why empty
        self.images: dict[str, dict] = images if images is not None else {}
        self.entries: dict[str, dict] = entries if entries is not None else {}
        self.record = record
        self.hits = self.misses = 0

    def lookup(self, images: Tensor, pad_mask: Tensor, groups: list[QueryGroup] | None) -> DetectorOutput | None:
        found = []
        for b in range(images.shape[0]):
            entry = self.entries.get(input_key(images, pad_mask, groups, b))
            if entry is None:
                self.misses += 1
                return None
            found.append(entry)
        self.hits += 1
        return assemble([self.images[e["image"]] for e in found], found, groups, images.device)

    def store(self, images: Tensor, pad_mask: Tensor, groups: list[QueryGroup] | None, out: DetectorOutput) -> int:
        """Add the images of a live teacher pass not yet cached; returns how many were new."""
        new = 0
        for b in range(images.shape[0]):
            key = input_key(images, pad_mask, groups, b)
            if key in self.entries:
                continue
            ikey = image_key(images, pad_mask, b)
            if ikey not in self.images:
                self.images[ikey] = _to_cpu(image_part(out, b))
            self.entries[key] = {"image": ikey, **_to_cpu(decoder_part(out, groups, b))}
            new += 1
        return new

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"format": FORMAT, "teacher_sha256": self.teacher_sha256, "note": self.note,
                    "images": self.images, "entries": self.entries}, tmp)
        tmp.replace(path)             # a crash while saving never leaves a truncated cache

    @classmethod
    def load(cls, path: str | Path, teacher_path: str | Path | None = None) -> "TeacherCache":
        """A saved cache; with ``teacher_path`` it must have been built from that very file."""
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if data.get("format") != FORMAT:
            raise TeacherCacheError(f"{path}: teacher cache format {data.get('format')}, expected {FORMAT}; rebuild it")
        if teacher_path is not None and data["teacher_sha256"] != file_sha256(teacher_path):
            raise TeacherCacheError(f"{path} was built from another teacher than {teacher_path}; rebuild it "
                             "(python -m reproduce.teacher_cache)")
        return cls(data["teacher_sha256"], data["images"], data["entries"], note=data.get("note"))

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"images": len(self.images), "entries": len(self.entries), "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / total if total else None}


def _to_cpu(value):
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
