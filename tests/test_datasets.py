"""Dataset loading, checksums, safe unpickling, download plumbing and the batched augmentation.

Real data comes from the read-only ``data_root`` fixture (conftest); every crafted or downloaded file goes
into ``tmp_path``. Nothing here touches the network: the download path is exercised through ``file://``
URLs and a monkeypatched ``fetch_url``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes import datasets as D
from recipes import downloads as DL
from recipes.datasets import DatasetError

# ------------------------------------------------------------------------------------------------
# helpers: crafted files
# ------------------------------------------------------------------------------------------------


def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def _write_gz(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw))
    return path


def _craft_mnist(root: Path, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a tiny test split (t10k files) under root/MNIST/raw; return (images [n,28,28], labels [n])."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    raw = root / "MNIST" / "raw"
    _write_gz(raw / "t10k-images-idx3-ubyte.gz", _idx_bytes(0x803, (n, 28, 28), images.tobytes()))
    _write_gz(raw / "t10k-labels-idx1-ubyte.gz", _idx_bytes(0x801, (n,), labels.tobytes()))
    return images, labels


def _cifar_batch_bytes(
    n: int = 4, seed: int = 0, protocol: int = 2, overrides: dict | None = None
) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    obj = {b"batch_label": b"crafted", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    obj.update(overrides or {})
    return pickle.dumps(obj, protocol=protocol), data, labels


def _write_cifar_file(root: Path, name: str, payload: bytes) -> Path:
    path = root / "cifar-10-batches-py" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


# ------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------


def test_load_real_mnist(data_root: Path) -> None:
    x, y = D.load_mnist(data_root, train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y[0]) == 5 and y[:5].tolist() == [5, 0, 4, 1, 9]
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 60000 and counts.min() > 5000 and counts.max() < 7000
    assert int(x.max()) == 255 and int(x.min()) == 0
    xt, yt = D.load_mnist(data_root, train=False)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert torch.bincount(yt, minlength=10).min() > 800
    mean = x.float().mean() / 255
    assert abs(float(mean) - D.MNIST_MEAN[0]) < 1e-3


@pytest.fixture(scope="module")
def cifar(data_root: Path) -> D.DatasetSplits:
    if not (data_root / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip(f"CIFAR-10 not found under {data_root}")
    return D.get_dataset("cifar10", data_root)


def test_load_real_cifar10(cifar: D.DatasetSplits) -> None:
    assert cifar.train_images.shape == (50000, 3, 32, 32) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (10000, 3, 32, 32)
    assert cifar.train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(cifar.train_labels, minlength=10), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(cifar.test_labels, minlength=10), torch.full((10,), 1000))
    assert cifar.train_labels[:3].tolist() == [6, 9, 9]  # frog, truck, truck
    mean = cifar.train_images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(D.CIFAR10_MEAN), atol=1e-3)
    z = D.normalize(cifar.train_images[:10000], cifar.mean, cifar.std)
    assert z.dtype == torch.float32
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=0.02)


def test_checksum_tables_match_readme(data_root: Path) -> None:
    """Every md5 the data README lists is accepted for its file (the local-copy list)."""
    readme = (data_root / "README.md").read_text()
    listed = dict(re.findall(r"(data_batch_\d|test_batch|batches\.meta) ([0-9a-f]{32})", readme))
    assert len(listed) == 7
    for name, md5 in listed.items():
        assert md5 in D.CIFAR10_MD5[name]
    for short, md5 in re.findall(r"(train-images|train-labels|t10k-images|t10k-labels) ([0-9a-f]{32})", readme):
        (fname,) = [f for f in D.MNIST_MD5 if f.startswith(short)]
        assert md5 in D.MNIST_MD5[fname]
    # The official md5s are accepted as well, for real downloads.
    assert "c99cafc152244af753f735de768cd75f" in D.CIFAR10_MD5["data_batch_1"]
    assert "40351d587109b95175f43aff81a1287e" in D.CIFAR10_MD5["test_batch"]


def test_md5_accepts_either_listed_digest_and_caches(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"hello")
    good = hashlib.md5(b"hello").hexdigest()
    D.verify_md5(f, (good, "0" * 32))  # official position
    D.verify_md5(f, ("0" * 32, good))  # local-copy position
    with pytest.raises(DatasetError, match=r"md5 mismatch.*accepted 0{32}, 1{32}"):
        D.verify_md5(f, ("0" * 32, "1" * 32))
    assert any(k[0] == str(f.resolve()) for k in D._MD5_CACHE)
    # Rewriting the file (new size) invalidates the cache entry.
    f.write_bytes(b"hello!")
    with pytest.raises(DatasetError, match="md5 mismatch"):
        D.verify_md5(f, (good,))


# ------------------------------------------------------------------------------------------------
# MNIST errors
# ------------------------------------------------------------------------------------------------


def test_crafted_mnist_roundtrip(tmp_path: Path) -> None:
    images, labels = _craft_mnist(tmp_path, n=3)
    x, y = D.load_mnist(tmp_path, train=False, verify=False)
    assert x.shape == (3, 1, 28, 28)
    assert np.array_equal(x[:, 0].numpy(), images) and y.tolist() == labels.tolist()


def test_mnist_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: missing.*QMLHFL_DATA.*download=true"):
        D.load_mnist(tmp_path, train=True)


def test_mnist_md5_mismatch(tmp_path: Path) -> None:
    _craft_mnist(tmp_path)
    official = "9fb629c4189551a2d022fa330f9573f3"
    with pytest.raises(DatasetError, match=rf"t10k-images-idx3-ubyte\.gz: md5 mismatch.*accepted {official}"):
        D.load_mnist(tmp_path, train=False)


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    _craft_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"t10k-images.*not a valid gzip stream.*truncated"):
        D.load_mnist(tmp_path, train=False, verify=False)


def test_mnist_wrong_magic(tmp_path: Path) -> None:
    _craft_mnist(tmp_path)
    # A labels file where the images file should be.
    _write_gz(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", _idx_bytes(0x801, (3,), bytes(3)))
    with pytest.raises(DatasetError, match=r"t10k-images.*wrong IDX magic number 0x00000801, expected 0x00000803"):
        D.load_mnist(tmp_path, train=False, verify=False)


def test_mnist_wrong_size(tmp_path: Path) -> None:
    _craft_mnist(tmp_path)
    # Header claims 4 images, payload holds 3.
    _write_gz(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", _idx_bytes(0x803, (4, 28, 28), bytes(3 * 784)))
    with pytest.raises(DatasetError, match=r"wrong size.*\(4, 28, 28\).*3152 bytes.*2368 bytes"):
        D.load_mnist(tmp_path, train=False, verify=False)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    _craft_mnist(tmp_path, n=3)
    _write_gz(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", _idx_bytes(0x801, (2,), bytes(2)))
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        D.load_mnist(tmp_path, train=False, verify=False)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 errors and the restricted unpickler
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
def test_crafted_cifar_roundtrip_python3_pickle(tmp_path: Path, protocol: int) -> None:
    """Batches re-saved by Python 3 / numpy 2 (numpy._core names, _codecs.encode for bytes) still load."""
    payload, data, labels = _cifar_batch_bytes(n=4, protocol=protocol)
    _write_cifar_file(tmp_path, "test_batch", payload)
    x, y = D.load_cifar10(tmp_path, train=False, verify=False)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
    assert np.array_equal(x.reshape(4, -1).numpy(), data) and y.tolist() == labels
    assert x.is_contiguous() and x.numpy().flags.writeable


def test_cifar_md5_mismatch_names_both_digests(tmp_path: Path) -> None:
    _write_cifar_file(tmp_path, "test_batch", _cifar_batch_bytes()[0])
    with pytest.raises(DatasetError, match="40351d587109b95175f43aff81a1287e, 81dcfca5ee9f17a826e3916eaa0a5681"):
        D.load_cifar10(tmp_path, train=False)


def test_cifar_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data_batch_1: missing.*QMLHFL_DATA"):
        D.load_cifar10(tmp_path, train=True)


class _OsSystem:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _OpenForWrite:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["os.system", "builtins.open"])
def test_cifar_pickle_with_foreign_global_is_refused_and_not_run(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    evil = _OsSystem(f"touch {marker}") if kind == "os.system" else _OpenForWrite(str(marker))
    payload, _, _ = _cifar_batch_bytes(overrides={b"labels": evil})
    _write_cifar_file(tmp_path, "test_batch", payload)
    fn = os.system if kind == "os.system" else open
    global_name = f"{fn.__module__}.{fn.__name__}"  # posix.system / io.open, as pickle records them
    expected = rf"test_batch: pickle references the global {re.escape(global_name)}.*Allowed"
    with pytest.raises(DatasetError, match=expected):
        D.load_cifar10(tmp_path, train=False, verify=False)
    assert not marker.exists()
    if kind == "builtins.open":  # control: the payload is live under a plain unpickler
        pickle.loads(payload).get(b"labels").close()
        assert marker.exists()


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    payload, _, _ = _cifar_batch_bytes(n=8)
    _write_cifar_file(tmp_path, "test_batch", payload[: len(payload) // 2])
    with pytest.raises(DatasetError, match=r"test_batch: cannot unpickle.*truncated or corrupt"):
        D.load_cifar10(tmp_path, train=False, verify=False)


def test_cifar_wrong_content(tmp_path: Path) -> None:
    payload, _, _ = _cifar_batch_bytes(overrides={b"data": np.zeros((4, 3072), dtype=np.float32)})
    _write_cifar_file(tmp_path, "test_batch", payload)
    with pytest.raises(DatasetError, match=r"'data' must be a uint8 array \[n, 3072\], got float32"):
        D.load_cifar10(tmp_path, train=False, verify=False)
    payload, _, _ = _cifar_batch_bytes(overrides={b"labels": [1, 2, 3]})
    _write_cifar_file(tmp_path, "test_batch", payload)
    with pytest.raises(DatasetError, match=r"'labels' has shape \(3,\), expected \(4,\)"):
        D.load_cifar10(tmp_path, train=False, verify=False)


# ------------------------------------------------------------------------------------------------
# data directory, get_dataset, download
# ------------------------------------------------------------------------------------------------


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QMLHFL_DATA", str(tmp_path / "env"))
    assert D.resolve_data_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert D.resolve_data_dir(None) == tmp_path / "env"
    assert D.resolve_data_dir("") == tmp_path / "env"
    monkeypatch.delenv("QMLHFL_DATA")
    assert D.resolve_data_dir(None) == Path("data")


def test_get_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; allowed: mnist, cifar10"):
        D.get_dataset("svhn", tmp_path)
    with pytest.raises(DatasetError, match=r"mnist: missing .*train-images.*download=true"):
        D.get_dataset("mnist", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _no_fetch(url: str, dest: Path) -> None:
    raise AssertionError(f"unexpected download of {url}")


def test_download_not_attempted_when_present(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DL, "fetch_url", _no_fetch)
    d = D.get_dataset("mnist", data_root, download=True)
    assert d.train_images.shape[0] == 60000 and d.test_images.shape[0] == 10000
    assert d.mean == D.MNIST_MEAN


def test_download_refuses_read_only_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, for which chmod does not block writes: check the code's own refusal."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(D.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    monkeypatch.setattr(DL, "fetch_url", _no_fetch)
    for name in ("mnist", "cifar10"):
        with pytest.raises(DatasetError, match=r"cannot download here: .*ro is not a writable directory"):
            D.get_dataset(name, ro, download=True)
        # A not-yet-existing subfolder is judged by its nearest existing ancestor.
        with pytest.raises(DatasetError, match="not a writable directory"):
            D.get_dataset(name, ro / "a" / "b", download=True)
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_download_refuses_chmod_read_only_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setattr(DL, "fetch_url", _no_fetch)
    try:
        with pytest.raises(DatasetError, match="not a writable directory"):
            D.get_dataset("mnist", ro, download=True)
    finally:
        ro.chmod(0o755)


def test_download_mnist_via_file_url(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real urllib fetch, pointed at the local copy through a file:// mirror."""
    monkeypatch.setattr(DL, "MNIST_MIRROR", (data_root / "MNIST" / "raw").resolve().as_uri() + "/")
    root = tmp_path / "fresh" / "data"
    d = D.get_dataset("mnist", root, download=True)
    assert d.train_labels[0] == 5 and d.test_images.shape == (10000, 1, 28, 28)
    files = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    assert files == sorted(D.MNIST_FILES.values())  # no .part leftovers


def test_download_md5_mismatch_removes_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def corrupt_fetch(url: str, dest: Path) -> None:
        seen.append(dest)
        dest.write_bytes(b"<html>404</html>")

    monkeypatch.setattr(DL, "fetch_url", corrupt_fetch)
    expected = r"raw/\S+-ubyte\.gz: md5 mismatch.*accepted [0-9a-f]{32}; the download .* removed"
    with pytest.raises(DatasetError, match=expected):
        D.get_dataset("mnist", tmp_path, download=True)
    assert seen and seen[0].name.endswith(".part")
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []

    def failing_fetch(url: str, dest: Path) -> None:
        dest.write_bytes(b"half")
        raise ConnectionResetError("peer went away")

    monkeypatch.setattr(DL, "fetch_url", failing_fetch)
    with pytest.raises(DatasetError, match=r"download from https://.*failed \(ConnectionResetError"):
        D.get_dataset("mnist", tmp_path, download=True)
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_download_cifar_with_crafted_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crafted tiny batches stand in for the 170 MB archive; the md5 tables are patched to match them."""
    batches = {name: _cifar_batch_bytes(n=2, seed=i) for i, name in enumerate(D.CIFAR10_TRAIN_FILES + ("test_batch",))}
    meta = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    server = tmp_path / "server"
    server.mkdir()
    archive = server / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, (payload, _, _) in batches.items():
            _tar_add(tar, f"cifar-10-batches-py/{name}", payload)
        _tar_add(tar, "cifar-10-batches-py/batches.meta", meta)
        _tar_add(tar, "cifar-10-batches-py/readme.html", b"<html/>")
        _tar_add(tar, "../escape", b"outside")  # never extracted
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")  # a link under a wanted name: skipped
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    md5 = {name: (hashlib.md5(p).hexdigest(),) for name, (p, _, _) in batches.items()}
    md5["batches.meta"] = (hashlib.md5(meta).hexdigest(),)
    monkeypatch.setattr(D, "CIFAR10_MD5", md5)
    monkeypatch.setattr(DL, "CIFAR10_ARCHIVE_MD5", (hashlib.md5(archive.read_bytes()).hexdigest(),))
    urls: list[str] = []

    def local_fetch(url: str, dest: Path) -> None:
        urls.append(url)
        shutil.copyfile(archive, dest)

    monkeypatch.setattr(DL, "fetch_url", local_fetch)
    root = tmp_path / "data"
    d = D.get_dataset("cifar10", root, download=True)
    assert urls == [DL.CIFAR10_URL]
    assert d.train_images.shape == (10, 3, 32, 32) and d.test_images.shape == (2, 3, 32, 32)
    assert np.array_equal(d.test_images.reshape(2, -1).numpy(), batches["test_batch"][1])
    extracted = sorted(p.name for p in (root / "cifar-10-batches-py").iterdir())
    assert extracted == sorted(md5)  # no readme, no .part files
    assert not (root / "cifar-10-python.tar.gz").exists()  # archive removed after extraction
    assert not (tmp_path / "escape").exists() and not (root / "escape").exists()
    assert not (root / "cifar-10-batches-py" / "data_batch_1").is_symlink()

    # A corrupt archive is rejected and its partial download removed.
    monkeypatch.setattr(DL, "fetch_url", lambda url, dest: dest.write_bytes(b"garbage"))
    root2 = tmp_path / "data2"
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: md5 mismatch"):
        D.get_dataset("cifar10", root2, download=True)
    assert list(root2.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# normalize, crop/flip
# ------------------------------------------------------------------------------------------------


def test_normalize_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    out = D.normalize(x, D.CIFAR10_MEAN, D.CIFAR10_STD)
    ref = torch.stack([(x[:, c].double() / 255 - D.CIFAR10_MEAN[c]) / D.CIFAR10_STD[c] for c in range(3)], 1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    # Leading device dimension.
    torch.testing.assert_close(D.normalize(x.view(1, 5, 3, 8, 8), D.CIFAR10_MEAN, D.CIFAR10_STD)[0], out)
    with pytest.raises(TypeError, match="uint8"):
        D.normalize(x.float(), D.CIFAR10_MEAN, D.CIFAR10_STD)
    with pytest.raises(ValueError, match="3 channels"):
        D.normalize(x, D.MNIST_MEAN, D.MNIST_STD)


def _crop_flip_reference(x, oy, ox, flips, padding, mode):
    """Per-sample loop: pad one image, slice the window, maybe mirror it."""
    h, w = x.shape[-2:]
    out = []
    for b in range(x.shape[0]):
        img = x[b : b + 1]
        if padding:
            img = F.pad(img, (padding,) * 4, mode="constant" if mode == "zeros" else "reflect")
        win = img[0, :, int(oy[b]) : int(oy[b]) + h, int(ox[b]) : int(ox[b]) + w]
        out.append(win.flip(-1) if bool(flips[b]) else win)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("padding", [0, 2, 4])
def test_crop_flip_matches_per_sample_reference(mode: str, padding: int) -> None:
    g = torch.Generator().manual_seed(padding)
    x = torch.randn(16, 3, 10, 12, generator=g)
    oy = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    got = D.crop_flip(x, oy, ox, flips, padding=padding, padding_mode=mode)
    assert torch.equal(got, _crop_flip_reference(x, oy, ox, flips, padding, mode))
    # Centre offsets, no flips: identity.
    centre = torch.full((16,), padding)
    assert torch.equal(D.crop_flip(x, centre, centre, torch.zeros(16, dtype=torch.bool), padding, mode), x)


def test_random_crop_flip_uses_generator_and_leading_dims() -> None:
    x = torch.randn(2, 8, 3, 32, 32)  # [D, B, C, H, W]
    out = D.random_crop_flip(x, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, D.random_crop_flip(x, generator=torch.Generator().manual_seed(7)))
    # Same draws as documented: offsets (2, n) then flips (n), over the flattened [D * B] batch.
    g = torch.Generator().manual_seed(7)
    offsets = torch.randint(0, 9, (2, 16), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    ref = _crop_flip_reference(x.reshape(16, 3, 32, 32), offsets[0], offsets[1], flips, 4, "reflect")
    assert torch.equal(out, ref.view_as(x))
    assert not torch.equal(out, D.random_crop_flip(x, generator=torch.Generator().manual_seed(8)))


def _offset_from_row(row: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop offset of unflipped windows of the values 1..W zero-padded: [n, W] -> [n]."""
    leading_zeros = (row.cumsum(1) == 0).sum(1)
    return torch.where(row[:, 0] == 0, padding - leading_zeros, row[:, 0].long() + padding - 1)


def test_random_crop_flip_draw_statistics() -> None:
    """Offsets are uniform over 0..2p in both axes and about half the images are flipped (seeded)."""
    n, p = 4500, 4
    cols = torch.arange(1, 33, dtype=torch.float32).expand(n, 1, 32, 32)
    rows = cols.transpose(-1, -2)
    x = torch.cat([cols, rows], 1).contiguous()  # channel 0: column index + 1, channel 1: row index + 1
    out = D.random_crop_flip(x, padding=p, generator=torch.Generator().manual_seed(0), padding_mode="zeros")
    col_row = out[:, 0].amax(1)  # max over rows: padding rows are 0, so this is the column pattern
    nonzero = col_row[:, 14:18]  # always inside the image
    flipped = nonzero[:, 0] > nonzero[:, -1]
    unflipped_cols = torch.where(flipped.view(n, 1), col_row.flip(-1), col_row)
    ox = _offset_from_row(unflipped_cols, p)
    oy = _offset_from_row(out[:, 1].amax(2), p)
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # ~4 sigma
    for offsets in (ox, oy):
        freq = torch.bincount(offsets, minlength=2 * p + 1).float() / n
        assert freq.numel() == 2 * p + 1 and (freq - 1 / (2 * p + 1)).abs().max() < 0.02  # ~4 sigma


def test_crop_flip_errors() -> None:
    x = torch.zeros(2, 1, 8, 8)
    idx = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros' or 'reflect', got 'circular'"):
        D.crop_flip(x, idx, idx, idx.bool(), padding_mode="circular")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"offsets_x must have shape \(2,\)"):
        D.crop_flip(x, idx, idx[:1], idx.bool())
    with pytest.raises(ValueError, match="reflect padding 8 must be smaller"):
        D.crop_flip(x, idx, idx, idx.bool(), padding=8)


# ------------------------------------------------------------------------------------------------
# downloads over HTTP from a local server (127.0.0.1 only: nothing reaches the outside network)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path: Path):
    """A directory served over HTTP on 127.0.0.1 by a thread; yields (directory, base URL)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _fake_mnist_files(directory: Path, n_train: int = 40, n_test: int = 10) -> dict[str, tuple[str, ...]]:
    """Tiny IDX gz files under the official names in ``directory``; returns an md5 table for them."""
    rng = np.random.default_rng(0)
    md5 = {}
    for train, n in ((True, n_train), (False, n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, raw in (("images", _idx_bytes(0x803, (n, 28, 28), images.tobytes())),
                          ("labels", _idx_bytes(0x801, (n,), labels.tobytes()))):
            name = D.MNIST_FILES[(train, kind)]
            data = gzip.compress(raw, mtime=0)
            (directory / name).write_bytes(data)
            md5[name] = (hashlib.md5(data).hexdigest(),)
    return md5


def test_download_mnist_over_http_from_a_configured_mirror(http_dir, tmp_path, monkeypatch) -> None:
    served, url = http_dir
    monkeypatch.setattr(D, "MNIST_MD5", _fake_mnist_files(served))
    root = tmp_path / "data"
    d = D.get_dataset("mnist", root, download=True, mirror=url)
    assert d.train_images.shape == (40, 1, 28, 28) and d.test_labels.tolist() == list(range(10))
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(D.MNIST_FILES.values())  # no temporary leftovers
    assert all((raw / n).read_bytes() == (served / n).read_bytes() for n in D.MNIST_FILES.values())
    # the environment variable names the mirror when the config does not
    monkeypatch.setenv("QMLHFL_MNIST_MIRROR", url)
    assert DL.mirror_urls("mnist") == [url]
    assert D.get_dataset("mnist", tmp_path / "data2", download=True).train_images.shape[0] == 40
    monkeypatch.delenv("QMLHFL_MNIST_MIRROR")
    assert DL.mirror_urls("mnist")[0] == DL.MNIST_MIRROR and DL.mirror_urls("cifar10") == [DL.CIFAR10_URL]
    assert DL.mirror_urls("cifar10", "http://m/x/") == ["http://m/x/cifar-10-python.tar.gz"]


def test_the_recipes_datamodule_downloads_by_default(http_dir, tmp_path, monkeypatch) -> None:
    from recipes.datamodules import ImageDataModule

    served, url = http_dir
    monkeypatch.setattr(D, "MNIST_MD5", _fake_mnist_files(served, n_train=100))
    dm = ImageDataModule("mnist", data_dir=tmp_path / "fresh", mirror=url, val_fraction=0.1)  # download=True
    assert dm.sizes() == {"train": 90, "val": 10, "test": 10}


def test_a_download_with_the_wrong_md5_leaves_nothing_that_looks_complete(http_dir, tmp_path, monkeypatch) -> None:
    served, url = http_dir
    md5 = _fake_mnist_files(served)
    monkeypatch.setattr(D, "MNIST_MD5", {**md5, "train-labels-idx1-ubyte.gz": ("0" * 32,)})
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: md5 mismatch.*was removed"):
        D.get_dataset("mnist", root, download=True, mirror=url)
    left = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    assert left == ["train-images-idx3-ubyte.gz"]  # the verified file before it; no partial, no temporary file
    # a server that breaks off in the middle of a file: nothing under the final name either
    (served / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DatasetError, match="md5 mismatch"):
        D.get_dataset("mnist", root, download=True, mirror=url)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_offline_the_message_names_the_settings_and_the_exact_paths(tmp_path) -> None:
    import socket

    with socket.socket() as s:  # a local port with nothing listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        D.get_dataset("mnist", root, download=True, mirror=dead)
    msg = str(info.value)
    for needle in ("dataset.download", "data_dir=", "QMLHFL_DATA", "dataset.mirror", "QMLHFL_MNIST_MIRROR",
                   str(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"),
                   str(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"), "failed (URLError"):
        assert needle in msg, (needle, msg)
    assert [p.name for p in (root / "MNIST" / "raw").iterdir()] == []
    with pytest.raises(DatasetError) as info:  # download forbidden: the same advice, nothing attempted
        D.get_dataset("cifar10", root, download=False)
    msg = str(info.value)
    for needle in ("dataset.download=true", "data_dir=", "QMLHFL_DATA", str(root / "cifar-10-batches-py" / "data_batch_1")):
        assert needle in msg, (needle, msg)


def test_a_read_only_data_directory_is_never_written(tmp_path, monkeypatch, http_dir) -> None:
    served, url = http_dir
    monkeypatch.setattr(D, "MNIST_MD5", _fake_mnist_files(served))
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(D.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(DatasetError) as info:
        D.get_dataset("mnist", ro, download=True, mirror=url)
    msg = str(info.value)
    assert "is not a writable directory" in msg and "QMLHFL_DATA" in msg and "data_dir=" in msg
    assert "dataset.download=false" in msg and str(ro / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz") in msg
    assert list(ro.iterdir()) == []


def test_download_cifar_over_http(http_dir, tmp_path, monkeypatch) -> None:
    served, url = http_dir
    batches = {name: _cifar_batch_bytes(n=2, seed=i)[0] for i, name in enumerate(D.CIFAR10_TRAIN_FILES + ("test_batch",))}
    with tarfile.open(served / DL.CIFAR10_ARCHIVE, "w:gz") as tar:
        for name, payload in batches.items():
            _tar_add(tar, f"cifar-10-batches-py/{name}", payload)
    monkeypatch.setattr(D, "CIFAR10_MD5", {n: (hashlib.md5(p).hexdigest(),) for n, p in batches.items()})
    monkeypatch.setattr(DL, "CIFAR10_ARCHIVE_MD5", (hashlib.md5((served / DL.CIFAR10_ARCHIVE).read_bytes()).hexdigest(),))
    root = tmp_path / "data"
    d = D.get_dataset("cifar10", root, download=True, mirror=url)  # a directory URL: the archive name is appended
    assert d.train_images.shape == (10, 3, 32, 32)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # the archive and temporaries gone
