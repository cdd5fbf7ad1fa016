"""Checkpoints: a crafted sharded metadata file cannot run code, damaged checkpoints fail with one clear error
(never advising ``weights_only=False``), a full disk is named as such."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.utils.data import DataLoader, TensorDataset

from lightning_qmlhfl import CorruptCheckpointError, Hierarchy, QMLHFLStrategy
from lightning_qmlhfl.strategy.checkpoints import load_sharded
from lightning_qmlhfl.strategy.integrity import CHECKSUM_KEY, SafeFileSystemReader, payload_checksum

from helpers.user_modules import TinyNet


# ---------------------------------------------------------------- sharded metadata
class _RunsCode:
    """A pickle payload that, unpickled with plain pickle, creates a file (a stand-in for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_sharded_metadata_does_not_run(tmp_path):
    directory = tmp_path / "ckpt.shards"
    dcp.save({"rank0/0": torch.ones(2, 3)}, checkpoint_id=str(directory))
    marker = tmp_path / "ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CorruptCheckpointError, match=r"unreadable sharded metadata: .*posix\.system|"
                                                     r"unreadable sharded metadata: .*os\.system"):
        SafeFileSystemReader(str(directory)).read_metadata()
    skeleton = {"sharded": {"world": 1, "cut": 0, "dir": directory.name}}
    with pytest.raises(CorruptCheckpointError):
        load_sharded(skeleton, tmp_path / "ckpt", (2,))
    assert not marker.exists()
    # the same payload does run under plain pickle (so the test above would have caught a plain reader)
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_safe_reader_reads_what_dcp_writes(tmp_path):
    tensors = {"rank0/0": torch.randn(3, 4), "rank0/rows/0": torch.arange(3), "rank0/1": torch.ones(2).bfloat16()}
    dcp.save(tensors, checkpoint_id=str(tmp_path / "d"))
    md = SafeFileSystemReader(str(tmp_path / "d")).read_metadata()
    assert set(md.state_dict_metadata) == set(tensors)
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    dcp.load(flat, storage_reader=SafeFileSystemReader(str(tmp_path / "d")))
    for k, v in tensors.items():
        assert torch.equal(flat[k], v)


# ---------------------------------------------------------------- Lightning checkpoints
def _data(n=64, features=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, 4, (n,), generator=g))


def _strategy():
    return QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[2, 1], compressors=None, seed=0)


def _trainer(root, **kw):
    return L.Trainer(strategy=_strategy(), accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root), **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    t = _trainer(root, max_steps=4, enable_checkpointing=False)
    t.fit(TinyNet(), DataLoader(_data(), batch_size=8))
    path = root / "run.ckpt"
    t.save_checkpoint(path)
    return path


def _resume(root, path):
    torch.manual_seed(0)
    t = _trainer(root, max_steps=6, enable_checkpointing=False)
    t.fit(TinyNet(), DataLoader(_data(), batch_size=8), ckpt_path=str(path))
    return t


def test_checkpoints_carry_a_checksum_and_resume(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt[CHECKSUM_KEY] == payload_checksum(ckpt)
    assert _resume(tmp_path, checkpoint).global_step == 6


def test_flipped_tensor_bytes_are_caught(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    weight = ckpt["state_dict"]["net.0.weight"]
    data = bytearray(checkpoint.read_bytes())
    needle = weight.contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = data.find(needle)
    assert at > 0
    for i in range(at, at + 64):
        data[i] ^= 0xFF
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    torch.load(bad, weights_only=True)  # loads without error: only the checksum can tell
    with pytest.raises(CorruptCheckpointError, match=r"flipped\.ckpt is corrupt or incomplete \(its tensors do not "
                                                     r"match the checksum"):
        _resume(tmp_path, bad)


@pytest.mark.parametrize("damage", ["truncated", "empty", "header", "random"])
def test_unreadable_checkpoints_fail_with_one_clear_error(checkpoint, tmp_path, damage):
    data = checkpoint.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "header":
        bad.write_bytes(b"\x00" * 64 + data[64:])
    else:
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CorruptCheckpointError) as info:
        _resume(tmp_path, bad)
    message = str(info.value)
    assert message.startswith(f"checkpoint {bad} is corrupt or incomplete (")
    assert "weights_only" not in message and "\n" not in message
    if damage == "empty":
        assert "the file is empty" in message


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    t = _trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    t.fit(TinyNet(), DataLoader(_data(), batch_size=8))

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200") from e

    monkeypatch.setattr(t.strategy.checkpoint_io, "save_checkpoint", full)
    target = tmp_path / "x.ckpt"
    with pytest.raises(OSError) as info:
        t.save_checkpoint(target)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"[Errno {errno.ENOSPC}] no space left on device: could not write checkpoint {target}"
