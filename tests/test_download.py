"""reproduce.data.download against a loopback HTTP server: resume, verification, offline, layout.

The archives are built here from the real KITTI / COCO samples in ../shared/data, with the
internal layout of the official zips, and served by a tiny Range-capable server that can be
told to drop a transfer mid-file or to ignore Range. No internet is used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import threading
import time
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reproduce.data import download as dl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KITTI = SHARED / "kitti_sample"
COCO = SHARED / "coco_sample"
KITTI_IDS = ("000000", "000001", "000002")

pytestmark = pytest.mark.skipif(not KITTI.is_dir() or not COCO.is_dir(),
                                reason="../shared/data samples not present")


# --- archives built from the real samples -------------------------------------------------
def _zip(entries: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    """A zip with explicit directory entries first, like the official archives."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for d in dirs:
            zf.writestr(d, b"")
        for name, data in entries.items():
            compress = zipfile.ZIP_DEFLATED if name.endswith((".json", ".txt")) else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=compress)
    return buf.getvalue()


def _table(files: dict[str, bytes], dataset: str, md5: bool = False) -> tuple[dl.Archive, ...]:
    """The registry entries for ``dataset`` with size/checksums of the test files."""
    return tuple(
        dataclasses.replace(a, size=len(files[a.name]),
                            sha256=hashlib.sha256(files[a.name]).hexdigest(),
                            md5=hashlib.md5(files[a.name]).hexdigest() if md5 else None)
        for a in dl.REGISTRY[dataset])


def _entry(files: dict[str, bytes], dataset: str, name: str) -> dl.Archive:
    (archive,) = [a for a in _table(files, dataset) if a.name == name]
    return archive


@pytest.fixture(scope="module")
def kitti_files() -> dict[str, bytes]:
    img = KITTI / "training" / "image_2"
    lab = KITTI / "training" / "label_2"
    images = {f"training/image_2/{i}.png": (img / f"{i}.png").read_bytes() for i in KITTI_IDS}
    # the real image zip also holds the unlabelled test frames; they must not be extracted
    images["testing/image_2/000000.png"] = (img / "000000.png").read_bytes()
    labels = {f"training/label_2/{i}.txt": (lab / f"{i}.txt").read_bytes() for i in KITTI_IDS}
    return {
        "data_object_image_2.zip": _zip(images, ("training/", "training/image_2/", "testing/",
                                                 "testing/image_2/")),
        "data_object_label_2.zip": _zip(labels, ("training/", "training/label_2/")),
        "train.txt": (KITTI / "ImageSets" / "train.txt").read_bytes(),
        "val.txt": (KITTI / "ImageSets" / "val.txt").read_bytes(),
    }


@pytest.fixture(scope="module")
def coco_files() -> dict[str, bytes]:
    ann = COCO / "annotations"
    files = {"annotations_trainval2017.zip": _zip(
        {f"annotations/instances_{s}2017.json": (ann / f"instances_{s}2017.json").read_bytes()
         for s in ("train", "val")}, ("annotations/",))}
    for split in ("train2017", "val2017"):
        jpgs = sorted((COCO / "images" / split).glob("*.jpg"))[:2]
        files[f"{split}.zip"] = _zip({f"{split}/{p.name}": p.read_bytes() for p in jpgs},
                                     (f"{split}/",))
    return files


# --- loopback server ----------------------------------------------------------------------
class Server:
    """Serves ``files`` by name; records (name, Range header) of every request.

    ``cut[name] = n`` makes the next response for ``name`` stop after ``n`` body bytes and
    close the connection (an interrupted transfer); ``ignore_range`` answers 200 to ranges.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                name = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.close_connection = True

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(files: dict[str, bytes]) -> Server:
        servers.append(Server(files))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mirror"


def _no_debris(*dirs: Path) -> None:
    for d in dirs:
        assert not list(d.rglob("*.part")) and not list(d.glob(".tmp-*"))


# --- tests --------------------------------------------------------------------------------
def test_kitti_complete_download_extracts_expected_layout(tmp_path, serve, kitti_files):
    server = serve(kitti_files)
    root, arch = tmp_path / "raw" / "kitti", tmp_path / "archives"
    dl.download_dataset("kitti", root, arch, archives=_table(kitti_files, "kitti"),
                        base_url=server.url, retries=0)

    assert sorted(p.stem for p in (root / "training/image_2").glob("*.png")) == list(KITTI_IDS)
    assert sorted(p.stem for p in (root / "training/label_2").glob("*.txt")) == list(KITTI_IDS)
    assert not (root / "testing").exists()
    for split in ("train", "val"):
        assert (root / f"ImageSets/{split}.txt").read_bytes() == kitti_files[f"{split}.txt"]
    trainval = (root / "ImageSets/trainval.txt").read_text().split()
    assert trainval == (KITTI / "ImageSets/trainval.txt").read_text().split()
    assert all((root / f".extracted-{name}").exists() for name in kitti_files)
    assert all((arch / name).read_bytes() == data for name, data in kitti_files.items())
    _no_debris(root, arch)

    n_requests = len(server.requests)
    dl.download_dataset("kitti", root, arch, archives=_table(kitti_files, "kitti"),
                        base_url=server.url, retries=0)
    assert len(server.requests) == n_requests  # re-running is a no-op


def test_coco_via_cli_with_env_base_url(tmp_path, serve, coco_files, monkeypatch, capsys):
    server = serve(coco_files)
    monkeypatch.setitem(dl.REGISTRY, "coco", _table(coco_files, "coco", md5=True))
    monkeypatch.setenv(dl.BASE_URL_ENV, server.url)
    root, arch = tmp_path / "coco", tmp_path / "arch"
    assert dl.main(["coco", "--root", str(root), "--archives", str(arch)]) == 0

    for split in ("train2017", "val2017"):
        assert len(list((root / split).glob("*.jpg"))) == 2
        assert (root / f"annotations/instances_{split}.json").is_file()
    assert {name for name, _ in server.requests} == set(coco_files)
    _no_debris(root, arch)
    assert "ready" in capsys.readouterr().out


def test_interrupted_transfer_resumes_with_range(tmp_path, serve, coco_files):
    name = "val2017.zip"
    data = coco_files[name]
    server = serve({name: data})
    cut = len(data) // 3
    server.cut[name] = cut
    archive = _entry(coco_files, "coco", name)

    with pytest.raises(dl.IncompleteTransfer, match="resume"):
        dl.fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert (tmp_path / f"{name}.part").stat().st_size == cut
    assert not (tmp_path / name).exists()

    path = dl.fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert server.requests[-1] == (name, f"bytes={cut}-")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == archive.sha256
    assert not (tmp_path / f"{name}.part").exists()


def test_dropped_transfer_is_resumed_automatically(tmp_path, serve, kitti_files, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    name = "data_object_label_2.zip"
    server = serve(kitti_files)
    server.cut[name] = 1000
    archive = _entry(kitti_files, "kitti", name)
    dl.fetch(archive, tmp_path, base_url=server.url, retries=1)
    assert [r for n, r in server.requests if n == name] == [None, "bytes=1000-"]
    assert (tmp_path / name).read_bytes() == kitti_files[name]


def test_server_ignoring_range_restarts_from_zero(tmp_path, serve, kitti_files):
    name = "data_object_label_2.zip"
    server = serve(kitti_files)
    server.ignore_range = True
    archive = _entry(kitti_files, "kitti", name)
    (tmp_path / f"{name}.part").write_bytes(b"stale bytes from elsewhere")  # wrong prefix
    dl.fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert server.requests[-1][1] is not None  # it asked for a range, got 200
    assert (tmp_path / name).read_bytes() == kitti_files[name]


def test_complete_part_of_unknown_size_gets_416_and_is_verified(tmp_path, serve, kitti_files):
    name = "train.txt"
    server = serve(kitti_files)
    archive = dataclasses.replace(_entry(kitti_files, "kitti", name), size=None)
    (tmp_path / f"{name}.part").write_bytes(kitti_files[name])
    dl.fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert server.requests == [(name, f"bytes={len(kitti_files[name])}-")]
    assert (tmp_path / name).read_bytes() == kitti_files[name]


def test_corrupted_archive_is_rejected(tmp_path, serve, coco_files):
    name = "annotations_trainval2017.zip"
    good = coco_files[name]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, different bytes
    server = serve({**coco_files, name: bytes(bad)})
    root, arch = tmp_path / "coco", tmp_path / "arch"
    with pytest.raises(dl.ChecksumError) as err:
        dl.download_dataset("coco", root, arch, archives=_table(coco_files, "coco"),
                            base_url=server.url, retries=0)
    msg = str(err.value)
    assert name in msg and hashlib.sha256(good).hexdigest() in msg
    assert hashlib.sha256(bad).hexdigest() in msg
    assert not (arch / name).exists() and not (arch / f"{name}.part").exists()
    assert not (root / f".extracted-{name}").exists()


def test_offline_fails_fast_then_works_from_hand_placed_archives(tmp_path, kitti_files,
                                                                 monkeypatch, capsys):
    monkeypatch.setitem(dl.REGISTRY, "kitti", _table(kitti_files, "kitti"))
    root, arch = tmp_path / "kitti", tmp_path / "arch"
    args = ["kitti", "--root", str(root), "--archives", str(arch),
            "--base-url", _closed_port_url()]
    t0 = time.monotonic()
    assert dl.main(args) == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(arch) in err and all(name in err for name in kitti_files)
    assert not root.exists() or not list(root.glob(".extracted-*"))

    arch.mkdir(exist_ok=True)
    for name, data in kitti_files.items():  # the user copies the archives in by hand
        (arch / name).write_bytes(data)
    assert dl.main(args) == 0
    assert len(list((root / "training/image_2").glob("*.png"))) == len(KITTI_IDS)
    assert (root / "ImageSets/val.txt").is_file()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "training/../../evil.txt",
                                    "C:/evil.txt"])
def test_zip_path_traversal_is_rejected(tmp_path, member):
    path = tmp_path / "arch" / "bad.zip"
    path.parent.mkdir()
    path.write_bytes(_zip({"training/label_2/000000.txt": b"ok", member: b"pwned"}))
    archive = dl.Archive("bad.zip", "http://unused/bad.zip", size=None, sha256=None)
    root = tmp_path / "data" / "root"
    with pytest.raises(dl.UnsafeArchiveError, match="unsafe member"):
        dl.install(archive, path, root)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (root / "training").exists() and not (root / ".extracted-bad.zip").exists()
    _no_debris(root)


def test_interrupted_extraction_is_redone(tmp_path, kitti_files, monkeypatch):
    name = "data_object_label_2.zip"
    archive = _entry(kitti_files, "kitti", name)
    (tmp_path / name).write_bytes(kitti_files[name])
    root = tmp_path / "root"

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_move_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        dl.install(archive, tmp_path / name, root)
    assert not dl.is_installed(root, archive)
    monkeypatch.undo()
    dl.install(archive, tmp_path / name, root)
    assert dl.is_installed(root, archive)
    assert len(list((root / "training/label_2").glob("*.txt"))) == len(KITTI_IDS)


# --- files the user placed are never deleted -----------------------------------------------
def _flip_one_byte(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    return bytes(bad)


@pytest.mark.parametrize("case", ["wrong size", "right size, wrong bytes"])
def test_placed_archive_failing_its_check_is_kept(tmp_path, kitti_files, monkeypatch, capsys,
                                                  case):
    """A hand-placed file may be the user's only copy: report it in one line, never delete it.

    It is checked before anything is downloaded, so the line comes even without network.
    """
    monkeypatch.setitem(dl.REGISTRY, "kitti", _table(kitti_files, "kitti"))
    name = "val.txt"
    good = kitti_files[name]
    placed = good[:-7] if case == "wrong size" else _flip_one_byte(good)
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / name).write_bytes(placed)

    rc = dl.main(["kitti", "--root", str(tmp_path / "kitti"), "--archives", str(arch),
                  "--base-url", _closed_port_url()])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert (arch / name).read_bytes() == placed
    assert not (arch / f"{name}.part").exists()
    assert str(arch / name) in err and "left untouched" in err
    assert f"{len(placed)} bytes" in err
    assert f"{len(good)} bytes with SHA-256 {hashlib.sha256(good).hexdigest()}" in err
    if case != "wrong size":
        assert hashlib.sha256(placed).hexdigest() in err


def test_extraction_keeps_files_already_in_the_root(tmp_path, kitti_files):
    """Archives completing a partial tree of the user's add files, never replace them."""
    name = "data_object_label_2.zip"
    (tmp_path / name).write_bytes(kitti_files[name])
    root = tmp_path / "root"
    own = root / "training" / "label_2" / "000000.txt"
    own.parent.mkdir(parents=True)
    own.write_text("the user's own label file\n")
    dl.install(_entry(kitti_files, "kitti", name), tmp_path / name, root)
    assert own.read_text() == "the user's own label file\n"
    assert len(list(own.parent.glob("*.txt"))) == len(KITTI_IDS)
    _no_debris(root)


# --- extracted trees ----------------------------------------------------------------------
def kitti_tree(root: Path, image_sets: bool = True) -> Path:
    """The sample as a user would copy an extracted KITTI tree (label/image folders linked)."""
    (root / "training").mkdir(parents=True)
    for sub in ("image_2", "label_2"):
        (root / "training" / sub).symlink_to(KITTI / "training" / sub, target_is_directory=True)
    if image_sets:
        (root / "ImageSets").mkdir()
        for split in ("train", "val"):
            (root / "ImageSets" / f"{split}.txt").write_bytes(
                (KITTI / "ImageSets" / f"{split}.txt").read_bytes())
    return root


def test_complete_extracted_tree_is_used_without_network(tmp_path, capsys):
    root, arch = kitti_tree(tmp_path / "kitti"), tmp_path / "arch"
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    rc = dl.main(["kitti", "--root", str(root), "--archives", str(arch),
                  "--base-url", _closed_port_url()])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{root}: using the extracted tree already there (101 files in training/image_2, " \
           "101 files in training/label_2); nothing downloaded" in out
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert not arch.exists()


def test_incomplete_tree_offline_names_what_is_missing(tmp_path, capsys):
    root, arch = tmp_path / "kitti", tmp_path / "arch"
    (root / "training").mkdir(parents=True)
    (root / "training" / "image_2").symlink_to(KITTI / "training" / "image_2")
    (root / "training" / "label_2").mkdir()  # empty: no labels yet
    rc = dl.main(["kitti", "--root", str(root), "--archives", str(arch),
                  "--base-url", _closed_port_url()])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"either put the extracted tree in {root}/ (training/image_2/, training/label_2/; " \
           "optional: ImageSets/train.txt, ImageSets/val.txt; " \
           f"{root} now lacks training/label_2)" in err
    assert f"data_object_label_2.zip, train.txt, val.txt in {arch}/" in err


def test_a_root_we_began_installing_is_not_taken_as_a_users_tree(tmp_path, kitti_files):
    """Markers mean this module extracts there: a half-done install may look complete."""
    root = kitti_tree(tmp_path / "kitti")
    (root / ".extracted-data_object_label_2.zip").write_text("{}\n")
    assert dl.placed_tree_note(_table(kitti_files, "kitti"), root) is None
