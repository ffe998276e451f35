"""Fetch, verify and unpack the official KITTI / COCO 2017 archives.

    python -m reproduce.download kitti            # -> data/raw/kitti
    python -m reproduce.download coco             # -> data/raw/coco
    python -m reproduce.download kitti --list     # file names, URLs, sizes, checksums

Why this exists rather than a few ``wget`` lines: the archives are large (COCO train2017
is 19 GB), links drop, and a silently truncated or corrupted zip would only surface much
later as a puzzling loader error. So every transfer is resumable (HTTP ``Range``), every
archive is checked against a size and checksum published by a third party before it is
used, and extraction is done so that an interrupted run never leaves a tree that looks
complete. Machines without internet access are a first-class case: the error says which
files to put where by hand, and the same command then works from those files offline.
An extracted tree the user already has (copied to the root) is used as it is, and a file
the user placed is never deleted or overwritten, even when it fails verification.

After extraction the layout is what ``reproduce.data.prepare`` reads:

* KITTI: ``<root>/training/image_2/*.png``, ``<root>/training/label_2/*.txt``,
  ``<root>/ImageSets/{train,val,trainval}.txt``
* COCO: ``<root>/train2017/*.jpg``, ``<root>/val2017/*.jpg``,
  ``<root>/annotations/instances_{train,val}2017.json``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from reproduce.core.progress import Progress



@dataclass(frozen=True)
class Archive:
    """One downloadable file and where its content ends up under the dataset root.

    ``name`` is both the file name in the archives directory and the last URL component
    appended to a ``--base-url`` mirror. ``kind`` is ``"zip"`` (extracted into the root,
    keeping the archive's own top-level folders) or ``"file"`` (copied to ``dest``).
    ``members`` restricts a zip to member paths under these prefixes, ``provides`` lists
    paths that must exist after installation (a wrong archive is caught here, not later).
    A checksum of ``None`` means "not known from a source we trust": it is skipped, never
    guessed. At least the size or one checksum should be known for every entry.
    ``required_in_tree`` is False for content ``reproduce.data.prepare`` can do without (KITTI's
    ImageSets: it falls back to a seeded split), so an extracted tree lacking it still counts.
    """

    name: str
    url: str
    size: int | None
    sha256: str | None
    md5: str | None = None
    kind: str = "zip"
    dest: str = "."
    members: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    required_in_tree: bool = True


# --- Registry -----------------------------------------------------------------------------
# KITTI object benchmark (Geiger et al., CVPR 2012; CC BY-NC-SA 3.0). URLs are the mirror the
# KITTI site links to. Sizes and SHA-256 are from TensorFlow Datasets' download registry,
# tensorflow/datasets@aea700188ee3e48a35c998940f00251db5435a3f
# tensorflow_datasets/datasets/kitti/checksums.tsv (TFDS verifies them on every download);
# the same values appear independently in other public download scripts. No MD5 is published.
KITTI_BASE = "https://s3.eu-central-1.amazonaws.com/avg-kitti/"
# The standard 3712/3769 train/val split of the 7481 labelled frames (Chen et al., 3DOP),
# as committed in OpenPCDet. Pinned to the commit that added the files
# (405730dde6fc1df6a71fb41630071fda2b1f4449); they are byte-identical at master
# 8cacccec11db6f59bf6934600c9a175dae254806. Size and SHA-256 computed here from that git
# blob (3712 / 3769 ids, no newline after the last id).
OPENPCDET_SPLITS = ("https://raw.githubusercontent.com/open-mmlab/OpenPCDet/"
                    "405730dde6fc1df6a71fb41630071fda2b1f4449/data/kitti/ImageSets/")

# COCO 2017 (Lin et al., ECCV 2014; annotations CC BY 4.0, images under Flickr terms).
# Sizes and SHA-256 from tensorflow/datasets tensorflow_datasets/url_checksums/coco2017.txt
# (@2282548bab4888cabcdca563e3ed01370e7a9bdc, same values in url_checksums/coco.txt).
# MD5s are the widely used ones (e.g. PaddleDetection's reader test, intel/neural-compressor
# and NVIDIA's MaskRCNN download scripts, the R torchvision port); checking both costs nothing
# extra since the file is hashed once.
COCO_IMAGES = "http://images.cocodataset.org/zips/"
COCO_ANNOTATIONS = "http://images.cocodataset.org/annotations/"

REGISTRY: dict[str, tuple[Archive, ...]] = {
    "kitti": (
        Archive("data_object_image_2.zip", KITTI_BASE + "data_object_image_2.zip",
                size=12_569_945_557,
                sha256="351c5a2aa0cd9238b50174a3a62b846bc5855da256b82a196431d60ff8d43617",
                # the 7518 unlabelled testing/ frames (about half the zip) are not needed
                members=("training/",), provides=("training/image_2",)),
        Archive("data_object_label_2.zip", KITTI_BASE + "data_object_label_2.zip",
                size=5_601_213,
                sha256="4efc76220d867e1c31bb980bbf8cbc02599f02a9cb4350effa98dbb04aaed880",
                members=("training/",), provides=("training/label_2",)),
        Archive("train.txt", OPENPCDET_SPLITS + "train.txt", size=25_983,
                sha256="b6417a1d9b18c8fdb085128e633d28ff321b7674a6d1b3841b8f43d865b281cb",
                kind="file", dest="ImageSets/train.txt", provides=("ImageSets/train.txt",),
                required_in_tree=False),
        Archive("val.txt", OPENPCDET_SPLITS + "val.txt", size=26_382,
                sha256="657ac4bcc1e156e5b106a4ca18e1f88e012787ea1d2b5d0adeea97fee903fa86",
                kind="file", dest="ImageSets/val.txt", provides=("ImageSets/val.txt",),
                required_in_tree=False),
    ),
    "coco": (
        Archive("annotations_trainval2017.zip", COCO_ANNOTATIONS + "annotations_trainval2017.zip",
                size=252_907_541,
                sha256="113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
                md5="f4bbac642086de4f52a3fdda2de5fa2c",
                # captions / keypoints (~0.3 GB unpacked) are not used by detection
                members=("annotations/instances_",),
                provides=("annotations/instances_train2017.json",
                          "annotations/instances_val2017.json")),
        Archive("val2017.zip", COCO_IMAGES + "val2017.zip", size=815_585_330,
                sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
                md5="442b8da7639aecaf257c1dceb8ba8c80", provides=("val2017",)),
        Archive("train2017.zip", COCO_IMAGES + "train2017.zip", size=19_336_861_798,
                sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
                md5="cced6f7f71b7629ddf16f17bbcfab6b2", provides=("train2017",)),
    ),
}

BASE_URL_ENV = "CLOCK_DOWNLOAD_BASE_URL"
DEFAULT_ROOT = "data/raw/{}"           # what params.yaml data.<dataset>.raw points at
DEFAULT_ARCHIVES = "data/archives/{}"
CONNECT_TIMEOUT_S = 10.0   # also the per-read stall limit: a stalled read is retried/resumed
RETRIES = 3                # automatic resumes of a dropped transfer within one run
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Anything that stops a dataset from being fetched; the message is one line."""


class OfflineError(DownloadError):
    """The server could not be reached at all (no network, DNS failure, refused)."""


class IncompleteTransfer(DownloadError):
    """The connection dropped mid-file; the ``.part`` file is kept for resuming."""


class ChecksumError(DownloadError):
    """A file does not match its recorded size or checksum.

    Our own download (``.part``) is deleted; a file under the final name is left untouched.
    """


class UnsafeArchiveError(DownloadError):
    """A zip member would be written outside the extraction directory."""


# --- Download -----------------------------------------------------------------------------
def archive_url(archive: Archive, base_url: str | None) -> str:
    """The official URL, or ``<base_url>/<name>`` for a mirror (tests use a loopback one)."""
    if not base_url:
        return archive.url
    return base_url.rstrip("/") + "/" + urllib.parse.quote(archive.name)


def file_digests(path: Path) -> dict[str, str]:
    """SHA-256 and MD5 of a file in one pass (reading a 19 GB zip twice would be wasteful)."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f, Progress(path.stat().st_size, f"verify {path.name}", unit="B",
                                        min_interval=30.0) as bar:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
            bar.update(len(block))
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def expected_text(archive: Archive) -> str:
    """``"25983 bytes with SHA-256 b641..."``: what the official file is, for error lines."""
    size = f"{archive.size} bytes" if archive.size is not None else ""
    sums = " and ".join(f"{label} {value}" for label, value in
                        (("SHA-256", archive.sha256), ("MD5", archive.md5)) if value)
    return " with ".join(part for part in (size, sums) if part)


def verify(path: Path, archive: Archive, *, ours: bool = False) -> None:
    """Check size and every known checksum; raise ChecksumError on any mismatch.

    ``ours``: ``path`` is a download this module wrote (a ``.part``); it is deleted on a
    mismatch, so that a bad transfer is not trusted or resumed next time. Anything else (a
    file placed by hand, or one an earlier run verified and someone changed since) is never
    deleted: it may be the user's only copy of a 12 GB file. The error then names the file,
    what it is and what the official one is, and leaves deciding to the user.
    """
    actual_size = path.stat().st_size
    if archive.size is not None and actual_size != archive.size:
        _mismatch(path, archive, ours, f"{actual_size} bytes", f"size {actual_size} bytes, "
                                                               f"expected {archive.size}")
    if archive.sha256 is None and archive.md5 is None:
        return
    digests = file_digests(path)
    for algo, label in (("sha256", "SHA-256"), ("md5", "MD5")):
        expected = getattr(archive, algo)
        if expected is not None and digests[algo] != expected.lower():
            _mismatch(path, archive, ours, f"{actual_size} bytes with {label} {digests[algo]}",
                      f"{algo} mismatch, expected {expected}, got {digests[algo]}")


def _mismatch(path: Path, archive: Archive, ours: bool, actual: str, detail: str) -> None:
    """Raise the one-line error for a file that failed verification (deleting only ours)."""
    if ours:
        path.unlink()
        raise ChecksumError(f"{path}: {detail}; the download was deleted, re-run to fetch "
                            "it again")
    raise ChecksumError(
        f"{path}: {actual}, but the official {archive.name} is {expected_text(archive)}; "
        "left untouched. Replace it with the official file, or move it away to have it "
        "downloaded")


def _open(url: str, offset: int, timeout: float):
    """Open ``url`` asking for bytes from ``offset``; map "cannot connect" to OfflineError."""
    headers = {"User-Agent": "clockdistill-replication/0.1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError:
        raise  # the server answered: not an offline case
    except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, unreachable
        reason = getattr(exc, "reason", exc)
        raise OfflineError(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from exc


def _transfer(url: str, part: Path, timeout: float, expected_size: int | None) -> None:
    """One HTTP request appending to ``part`` (resuming from its size where possible).

    206 -> append; 200 -> the server ignored Range, restart from zero; 416 -> nothing left
    to send, the caller verifies what is there. A short body raises IncompleteTransfer.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start is not None and start != offset:
                raise DownloadError(f"{url}: asked for bytes from {offset}, server sent "
                                    f"from {start}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else expected_size
        _check_disk_space(part.parent, remaining)
        received = 0
        with part.open(mode) as out, Progress(total or 0, part.name[:-5], unit="B", initial=offset,
                                              min_interval=30.0) as bar:
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, ValueError) as exc:  # reset, stall (timeout), closed socket
                raise IncompleteTransfer(f"{part.name}: transfer interrupted after "
                                         f"{offset + received} bytes ({exc}); re-run to "
                                         "resume") from exc
    if remaining is not None and received < remaining:
        raise IncompleteTransfer(f"{part.name}: connection closed after {offset + received} "
                                 f"of {offset + remaining} bytes; re-run to resume")


def _content_range_start(header: str | None) -> int | None:
    """First byte position of a ``Content-Range: bytes a-b/n`` header, if parseable."""
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[6:].split("-", 1)[0])
    except ValueError:
        return None


def _check_disk_space(directory: Path, needed: int | None) -> None:
    """Fail before a multi-GB transfer rather than at 95 % with a full disk."""
    if needed and shutil.disk_usage(directory).free < needed:
        raise DownloadError(f"{directory}: {needed} bytes needed, only "
                            f"{shutil.disk_usage(directory).free} free")


def fetch(archive: Archive, archives_dir: Path, *, base_url: str | None = None,
          timeout: float = CONNECT_TIMEOUT_S, retries: int = RETRIES) -> Path:
    """Return ``archives_dir/<name>``, verified; download (resuming a ``.part``) if needed.

    The final name only ever holds a verified file: bytes go to ``<name>.part`` and are
    renamed with ``os.replace`` after the size/checksum check. A file already under the
    final name (an earlier run, or placed by hand) is verified and used without network; if
    it fails, it is reported and kept, never replaced (see :func:`verify`).
    """
    archives_dir.mkdir(parents=True, exist_ok=True)
    final = archives_dir / archive.name
    if final.exists():
        verify(final, archive, ours=False)
        return final
    part = archives_dir / (archive.name + ".part")
    if part.exists() and archive.size is not None and part.stat().st_size > archive.size:
        part.unlink()  # cannot be a prefix of the right file
    url = archive_url(archive, base_url)
    attempt = 0
    while not (part.exists() and archive.size is not None
               and part.stat().st_size == archive.size):
        try:
            _transfer(url, part, timeout, archive.size)
            break
        except IncompleteTransfer:
            attempt += 1
            if attempt > retries:
                raise
            time.sleep(min(2.0 * attempt, 10.0))
    if not part.exists():
        raise DownloadError(f"{url}: server returned nothing")
    verify(part, archive, ours=True)
    os.replace(part, final)
    return final


# --- Extraction ---------------------------------------------------------------------------
def marker_path(root: Path, archive: Archive) -> Path:
    """Written last, after every file is in place: its presence means "installed"."""
    return root / f".extracted-{archive.name}"


def is_installed(root: Path, archive: Archive) -> bool:
    return marker_path(root, archive).exists()


def safe_members(zf: zipfile.ZipFile, prefixes: Sequence[str] = ()) -> list[zipfile.ZipInfo]:
    """The members to extract; raise if any name is absolute or climbs out with ``..``.

    The whole archive is checked before anything is written, so a hostile or broken zip
    leaves no trace (``zipfile`` sanitises names itself, but silently rewriting a path is
    not what we want for a dataset whose layout matters).
    """
    chosen = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise UnsafeArchiveError(f"{zf.filename}: unsafe member path {info.filename!r}")
        if info.is_dir() or (prefixes and not name.startswith(tuple(prefixes))):
            continue
        chosen.append(info)
    return chosen


def _move_tree(src: Path, dst: Path) -> None:
    """Move every file of ``src`` to the same relative place under ``dst`` (merging folders).

    Several archives share top-level folders (KITTI's image and label zips both hold
    ``training/``), so whole directories cannot simply be renamed. Each ``os.replace`` is
    atomic on the same file system, hence the temp dir lives inside the root. A file that
    already exists under ``dst`` is kept, not replaced: it is either one an interrupted
    earlier run moved there (same content) or one the user put in a partial tree.
    """
    for dirpath, _dirs, files in os.walk(src):
        target_dir = dst / Path(dirpath).relative_to(src)
        target_dir.mkdir(parents=True, exist_ok=True)
        for fname in files:
            if not (target_dir / fname).exists():
                os.replace(Path(dirpath) / fname, target_dir / fname)


def install(archive: Archive, path: Path, root: Path) -> None:
    """Unpack (or copy) a verified archive into ``root`` and write its marker.

    Content is first written to ``root/.tmp-<name>``, then moved into place file by file,
    then checked against ``provides``; only then is the marker written. An interrupted run
    leaves no marker, so the next run redoes this step from scratch.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted earlier run
    tmp.mkdir()
    try:
        if archive.kind == "zip":
            _extract_zip(path, tmp, archive.members)
        elif archive.kind == "file":
            (tmp / archive.dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / archive.dest)
        else:
            raise DownloadError(f"{archive.name}: unknown kind {archive.kind!r}")
        _move_tree(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing = [p for p in archive.provides if not (root / p).exists()]
    if missing:
        raise DownloadError(f"{archive.name}: unexpected layout, missing {', '.join(missing)} "
                            f"under {root}")
    marker_path(root, archive).write_text(json.dumps(
        {"archive": archive.name, "size": path.stat().st_size, "sha256": archive.sha256,
         "md5": archive.md5}) + "\n")


def _extract_zip(path: Path, dest: Path, prefixes: Sequence[str]) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            members = safe_members(zf, prefixes)
            with Progress(len(members), f"extract {path.name}", unit="files", rate_unit="file",
                          min_interval=30.0) as bar:
                for info in members:
                    zf.extract(info, dest)
                    bar.update()
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{path}: not a valid zip ({exc})") from exc


def write_kitti_trainval(root: Path) -> None:
    """``ImageSets/trainval.txt`` = sorted union of train and val (all 7481 labelled ids)."""
    sets = root / "ImageSets"
    target = sets / "trainval.txt"
    if target.exists() or not (sets / "train.txt").exists() or not (sets / "val.txt").exists():
        return
    ids = set()
    for split in ("train", "val"):
        ids.update(line.strip() for line in (sets / f"{split}.txt").read_text().splitlines()
                   if line.strip())
    tmp = sets / ".trainval.txt.tmp"
    tmp.write_text("\n".join(sorted(ids)) + "\n")
    os.replace(tmp, target)


POST_INSTALL: dict[str, Callable[[Path], None]] = {"kitti": write_kitti_trainval}


# --- Extracted trees placed by the user -------------------------------------------------
def made_here(root: Path) -> bool:
    """Has this module installed (or begun installing) archives into ``root``?

    Such a root is finished through the markers, never taken as a user's tree: a half-done
    extraction can look complete while a marker is still missing.
    """
    return any(root.glob(".extracted-*")) or any(root.glob(".tmp-*"))


def _present(path: Path) -> bool:
    """A file, or a folder with at least one entry (an empty image folder is no data)."""
    if path.is_dir():
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    return path.is_file()


def tree_missing(archives: Sequence[Archive], root: Path) -> list[str]:
    """Paths an extracted tree needs for ``reproduce.data.prepare`` and ``root`` lacks.

    The paths are the archives' ``provides`` (what an installation from the archives
    leaves), less the optional ones (``required_in_tree=False``).
    """
    return [p for a in archives if a.required_in_tree for p in a.provides
            if not _present(root / p)]


def tree_layout(archives: Sequence[Archive]) -> str:
    """``"training/image_2/, training/label_2/; optional: ImageSets/train.txt, ..."``."""
    required = [_shown(p) for a in archives if a.required_in_tree for p in a.provides]
    optional = [_shown(p) for a in archives if not a.required_in_tree for p in a.provides]
    return ", ".join(required) + (f"; optional: {', '.join(optional)}" if optional else "")


def _shown(path: str) -> str:
    """A folder gets a trailing slash (in ``provides`` files have a suffix, folders none)."""
    return path if PurePosixPath(path).suffix else path + "/"


def placed_tree_note(archives: Sequence[Archive], root: Path) -> str | None:
    """The line to print when ``root`` holds a complete tree the user put there, else None."""
    if not root.is_dir() or made_here(root) or tree_missing(archives, root):
        return None
    counts = ", ".join(f"{_count(root / p)} files in {p}" for a in archives
                       if a.required_in_tree for p in a.provides if (root / p).is_dir())
    absent = [p for a in archives if not a.required_in_tree for p in a.provides
              if not (root / p).exists()]
    note = f"{root}: using the extracted tree already there ({counts}); nothing downloaded"
    if absent:  # only KITTI's split lists are optional
        note += (f"; no {', '.join(absent)}, so prepare makes a seeded split "
                 "(params data.kitti.val_fraction, split_seed)")
    return note


def _count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for _ in entries)


# --- Orchestration ------------------------------------------------------------------------
def fetch_dataset(archives: Sequence[Archive], root: Path, archives_dir: Path, *,
                  base_url: str | None = None, extract: bool = True,
                  timeout: float = CONNECT_TIMEOUT_S, retries: int = RETRIES,
                  dataset: str = "<dataset>") -> list[Path]:
    """Fetch every archive not yet installed, then install them. Re-running is a no-op.

    All downloads happen before any extraction so that a network problem shows up within
    seconds, not after an hour of unzipping. When the server is unreachable the error names
    the exact files to place in ``archives_dir`` by hand (or the tree to place in ``root``).
    """
    root, archives_dir = Path(root), Path(archives_dir)
    todo = [a for a in archives if not (extract and is_installed(root, a))]
    # Files already there first: a wrong one placed by hand is reported in seconds, not after
    # hours of downloading the others (and also when there is no network at all).
    placed_first = sorted(todo, key=lambda a: not (archives_dir / a.name).exists())
    fetched = {}
    for archive in placed_first:
        try:
            fetched[archive.name] = fetch(archive, archives_dir, base_url=base_url,
                                          timeout=timeout, retries=retries)
        except OfflineError as exc:
            needed = [a.name for a in todo if not (archives_dir / a.name).exists()]
            raise OfflineError(offline_message(str(exc), archives, needed, root, archives_dir,
                                               dataset, offer_tree=extract)) from exc
    paths = [fetched[a.name] for a in todo]
    if extract:
        for archive, path in zip(todo, paths):
            install(archive, path, root)
    return paths


def offline_message(reason: str, archives: Sequence[Archive], needed: Sequence[str],
                    root: Path, archives_dir: Path, dataset: str, offer_tree: bool) -> str:
    """One line: why nothing could be fetched and the two ways to supply the data by hand."""
    by_hand = (f"put {', '.join(needed)} in {archives_dir}/ (URLs, sizes, SHA-256: "
               f"python -m reproduce.download {dataset} --list)")
    if offer_tree and not made_here(root):
        missing = tree_missing(archives, root) if root.is_dir() else []
        lacks = f"; {root} now lacks {', '.join(missing)}" if missing else ""
        by_hand = (f"either put the extracted tree in {root}/ ({tree_layout(archives)}{lacks}) "
                   f"or {by_hand}")
    return f"{reason}. Without network, {by_hand}, and re-run"


def download_dataset(dataset: str, root: Path | None = None,
                     archives_dir: Path | None = None, *,
                     archives: Sequence[Archive] | None = None, base_url: str | None = None,
                     extract: bool = True, timeout: float = CONNECT_TIMEOUT_S,
                     retries: int = RETRIES) -> Path:
    """Everything ``python -m reproduce.download <dataset>`` does; returns the root.

    A complete extracted tree the user put in ``root`` is used as it is (one line says so).
    ``archives`` replaces the registry entry (tests pass their own sizes and checksums);
    ``base_url`` falls back to ``$CLOCK_DOWNLOAD_BASE_URL``, then to the official URLs.
    """
    root = Path(root if root is not None else DEFAULT_ROOT.format(dataset))
    archives_dir = Path(archives_dir if archives_dir is not None
                        else DEFAULT_ARCHIVES.format(dataset))
    archives = REGISTRY[dataset] if archives is None else archives
    if extract and (note := placed_tree_note(archives, root)):
        print(note)
        return root
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    fetch_dataset(archives, root, archives_dir, base_url=base_url, extract=extract,
                  timeout=timeout, retries=retries, dataset=dataset)
    if extract and dataset in POST_INSTALL:
        POST_INSTALL[dataset](root)
    return root


def describe(archives: Sequence[Archive]) -> str:
    """The table printed by ``--list``: what to download by hand and how to check it."""
    rows = []
    for a in archives:
        rows.append(f"{a.name}\n  url:    {a.url}\n  size:   {a.size}\n"
                    f"  sha256: {a.sha256}\n  md5:    {a.md5}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduce.download",
        description="Download, verify (size + SHA-256/MD5) and extract the official KITTI "
                    "object or COCO 2017 archives. Resumes partial downloads; without "
                    "network, place the archives in --archives by hand and re-run.")
    parser.add_argument("dataset", choices=sorted(REGISTRY), help="which benchmark to fetch")
    parser.add_argument("--root", type=Path, help="extract here (default data/raw/<dataset>)")
    parser.add_argument("--archives", type=Path,
                        help="where archives are downloaded / placed by hand "
                             "(default data/archives/<dataset>)")
    parser.add_argument("--no-extract", action="store_true",
                        help="only download and verify the archives")
    parser.add_argument("--base-url", default=None,
                        help=f"mirror to fetch <base-url>/<file name> from "
                             f"(default: official URLs, or ${BASE_URL_ENV} if set)")
    parser.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S,
                        help="connect / read-stall timeout in seconds (default %(default)s)")
    parser.add_argument("--list", action="store_true",
                        help="print file names, URLs, sizes and checksums, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    archives = REGISTRY[args.dataset]
    if args.list:
        print(describe(archives))
        root = args.root or DEFAULT_ROOT.format(args.dataset)
        print(f"\nor, instead of the archives, the extracted tree in {root}/: "
              f"{tree_layout(archives)}")
        return 0
    try:
        root = download_dataset(args.dataset, args.root, args.archives,
                                base_url=args.base_url, extract=not args.no_extract,
                                timeout=args.timeout)
    except (DownloadError, OSError) as exc:
        print(f"download {args.dataset}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"download {args.dataset}: interrupted; re-run to resume", file=sys.stderr)
        return 130
    if args.no_extract:
        print(f"{args.dataset}: archives verified in "
              f"{args.archives or DEFAULT_ARCHIVES.format(args.dataset)}")
    else:
        print(f"{args.dataset}: ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
