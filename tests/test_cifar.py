"""The CIFAR-10 loader on small archives built here in the official format (never the network):
same member names, batches pickled the way the official Python 2 files are, a few images per batch."""
import hashlib
import io
import os
import pickle
import pickletools
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

N_PER_BATCH = 4
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def py2_pickle(obj) -> bytes:
    """Pickle obj the way Python 2's cPickle (protocol 2) wrote the official batches: strings and bytes
    as BINSTRING opcodes (Python 3 writes BINUNICODE/BINBYTES), numpy under its Python 2 module name
    numpy.core.multiarray. The opcodes share their length-prefix layout, so a byte swap suffices."""
    raw = bytearray(pickle.dumps(obj, protocol=3))
    swap = {"BINUNICODE": b"T", "BINBYTES": b"T", "SHORT_BINBYTES": b"U"}
    for op, _, pos in pickletools.genops(bytes(raw)):
        if op.name in swap:
            raw[pos:pos + 1] = swap[op.name]
    raw[1] = 2  # PROTO 2
    out = bytes(raw).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert not any(op.name in swap for op, _, _ in pickletools.genops(out))
    assert b"numpy._core" not in out
    return out


def make_batch(seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8)
    labels = [int(i) for i in rng.integers(0, 10, N_PER_BATCH)]
    return data, labels


def build_archive(path: Path, replace: dict = None, extra: list = None) -> str:
    """Write an official-layout cifar-10-python.tar.gz; `replace` maps batch name -> raw bytes to store
    instead, `extra` holds additional TarInfo members. Returns the archive's MD5."""
    replace, extra = replace or {}, extra or []
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data: bytes):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        add("batches.meta", py2_pickle({"num_cases_per_batch": N_PER_BATCH, "num_vis": 3072,
                                        "label_names": C.CIFAR10_CLASSES}))
        for i, name in enumerate(BATCHES):
            data, labels = make_batch(i)
            add(name, replace.get(name) or py2_pickle({
                "batch_label": f"training batch {i + 1} of 5", "labels": labels, "data": data,
                "filenames": [f"img_{i}_{j}.png" for j in range(N_PER_BATCH)]}))
        add("readme.html", b"<html>CIFAR-10</html>")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def expected(names):
    xs, ys = zip(*[make_batch(BATCHES.index(n)) for n in names])
    return torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32)), torch.tensor(sum(ys, []))


def test_reads_official_layout(tmp_path, monkeypatch):
    md5 = build_archive(tmp_path / C.CIFAR10_ARCHIVE)
    train = C.load_cifar10(tmp_path, train=True, download=False, md5=md5)
    x, y = expected(BATCHES[:5])
    assert train.images.dtype == torch.uint8 and train.images.shape == (5 * N_PER_BATCH, 3, 32, 32)
    assert torch.equal(train.images, x) and torch.equal(train.labels, y)
    assert train.num_classes == 10 and train.class_names[0] == "airplane"
    test = C.load_cifar10(tmp_path, train=False, download=False, md5=md5)
    assert torch.equal(test.images, expected(["test_batch"])[0])
    # the row layout: the first 1024 values are the red plane of the first image, row by row
    assert torch.equal(train.images[0, 0].flatten(), torch.from_numpy(make_batch(0)[0][0, :1024]))
    # through load_dataset (which uses the module constant), and a damaged extracted file is healed
    monkeypatch.setattr(C, "CIFAR10_MD5", md5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    data = C.load_dataset("cifar10", root=tmp_path, download=False)
    assert torch.equal(data.images, x)
    assert C.load_dataset("cifar10", root=tmp_path, image_size=16, download=False).images.shape[-1] == 16


def test_download_when_missing_uses_url_then_verifies(tmp_path):
    src = tmp_path / "mirror" / C.CIFAR10_ARCHIVE
    src.parent.mkdir()
    md5 = build_archive(src)
    root = tmp_path / "data"
    with pytest.raises(C.DataError, match="not found.*download file://"):
        C.load_cifar10(root, download=False, md5=md5, url=src.as_uri())
    data = C.load_cifar10(root, download=True, md5=md5, url=src.as_uri())  # file:// - no network
    assert len(data.images) == 5 * N_PER_BATCH and (root / C.CIFAR10_ARCHIVE).is_file()
    with pytest.raises(C.DataError, match="could not download"):
        C.load_cifar10(tmp_path / "other", download=True, md5=md5, url=(tmp_path / "missing.tgz").as_uri())
    assert not list((tmp_path / "other").glob("*"))  # no partial file left


def test_bad_checksum_refused_before_use(tmp_path):
    md5 = build_archive(tmp_path / C.CIFAR10_ARCHIVE)
    with pytest.raises(C.DataError, match="MD5 .*expected 0{32}.*Delete it"):
        C.load_cifar10(tmp_path, download=False, md5="0" * 32)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing was extracted
    with pytest.raises(C.DataError, match=C.CIFAR10_MD5):  # the real constant is checked by default
        C.load_dataset("cifar10", root=tmp_path, download=False)
    assert md5 != C.CIFAR10_MD5


def _member(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("info, data, why", [
    (_member("../evil.txt", tarfile.REGTYPE), b"x", "unsafe member path"),
    (_member("cifar-10-batches-py/../../evil.txt", tarfile.REGTYPE), b"x", "unsafe member path"),
    (_member("/tmp/evil.txt", tarfile.REGTYPE), b"x", "unsafe member path"),
    (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), None, "is a link"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"), None, "is a link"),
    (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), None, "device"),
    (_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), None, "device"),
])
def test_unsafe_members_refused(tmp_path, info, data, why):
    if data is not None:
        info.size = len(data)
    root = tmp_path / "data"
    root.mkdir()
    md5 = build_archive(root / C.CIFAR10_ARCHIVE, extra=[(info, data)])
    with pytest.raises(C.DataError, match=why):
        C.load_cifar10(root, download=False, md5=md5)
    assert not (tmp_path / "evil.txt").exists() and not (root / "cifar-10-batches-py").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_pickle_that_runs_code_refused(tmp_path, payload):
    Exploit.marker = tmp_path / "pwned"
    if payload == "system":
        evil = pickle.dumps({"data": Exploit(), "labels": []}, protocol=2)
    else:  # a hand-written stream: builtins.eval("...")
        evil = b"\x80\x02cbuiltins\neval\nX\x1a\x00\x00\x00__import__('os').getpid()\x85R."
    md5 = build_archive(tmp_path / C.CIFAR10_ARCHIVE, replace={"data_batch_2": evil})
    with pytest.raises(C.DataError, match="refused to unpickle.*not allowed"):
        C.load_cifar10(tmp_path, download=False, md5=md5)
    assert not Exploit.marker.exists()


def test_wrong_content_refused(tmp_path):
    bad = py2_pickle({"data": np.zeros((2, 10), np.float32), "labels": [0, 1]})
    md5 = build_archive(tmp_path / C.CIFAR10_ARCHIVE, replace={"data_batch_1": bad})
    with pytest.raises(C.DataError, match="not a CIFAR-10 batch"):
        C.load_cifar10(tmp_path, download=False, md5=md5)
    (tmp_path / C.CIFAR10_ARCHIVE).write_bytes(b"not a tarball")
    with pytest.raises(C.DataError, match="not a readable tar"):
        C.load_cifar10(tmp_path / ".", download=False, md5=hashlib.md5(b"not a tarball").hexdigest())
