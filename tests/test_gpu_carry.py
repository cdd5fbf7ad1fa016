"""What travels to the GPU machine (bench/gpu/): the wheel-closure and size checks, and the CIFAR-10 excerpt with
its datamodule, against the recipes' own datamodule on the same images."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gpu import carry
from bench.gpu.cifar_excerpt import CifarExcerpt, read_excerpt, write_excerpt
from recipes.datamodules import ImageDataModule
from recipes.datasets import DatasetError


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    """A wheel holding only its metadata (installable by pip, imports nothing)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    wheel = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", wheel)
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


# the project's needs that the image lacks (bench/gpu/image_packages.txt), with their own requirements
CLOSURE = [("hydra-core", "1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging",
                                    'importlib-resources; python_version < "3.9"']),
           ("omegaconf", "2.3.1", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
           ("antlr4-python3-runtime", "4.9.3", ['typing; python_version < "3.5"']),
           ("dp-accounting", "0.6.0", ["absl-py<3,>=1.0", "attrs<24,>=22", "dm-tree~=0.1.8", "mpmath~=1.2",
                                       "numpy<3.0,>=1.21", "scipy~=1.7"]),
           ("dm-tree", "0.1.10", ["absl-py>=0.6.1", "attrs>=18.2.0", "numpy>=1.21", "wrapt>=1.11.2"])]


def test_wheel_closure_complete(tmp_path: Path) -> None:
    for name, version, reqs in CLOSURE:
        fake_wheel(tmp_path, name, version, reqs)
    lines, problems, missing = carry.check_wheels(tmp_path)
    assert problems == [] and missing == set()
    text = "\n".join(lines)
    assert "antlr4-python3-runtime==4.9.*: wheel antlr4_python3_runtime-4.9.3-py3-none-any.whl (for hydra-core)" in text
    assert "pyyaml>=5.1.0: on the image (for omegaconf)" in text
    assert "wandb: not carried" in text and "importlib-resources" not in text  # marker false on 3.12


def test_wheel_closure_problems(tmp_path: Path) -> None:
    fake_wheel(tmp_path, "hydra-core", "1.3.8", CLOSURE[0][2])
    fake_wheel(tmp_path, "omegaconf", "2.5.0", CLOSURE[1][2])  # outside hydra's <2.4
    fake_wheel(tmp_path, "antlr4-python3-runtime", "4.9.3", tag="cp311-cp311-manylinux_2_17_x86_64")
    fake_wheel(tmp_path, "antlr4-python3-runtime", "4.9.2")
    _, problems, missing = carry.check_wheels(tmp_path)
    text = "\n".join(problems)
    assert "omegaconf-2.5.0-py3-none-any.whl: version 2.5.0 does not satisfy omegaconf<2.4,>=2.2" in text
    assert "antlr4-python3-runtime: 2 wheels" in text
    assert "cp311-cp311-manylinux_2_17_x86_64.whl: not installable by CPython 3.12" in text
    _, problems, missing = carry.check_wheels(tmp_path / "empty")
    assert missing == {"hydra-core", "dp-accounting"}
    assert any("hydra-core>=1.3: required by lightning-qmlhfl" in p for p in problems)


def test_wheel_tags() -> None:
    from packaging.tags import parse_tag

    assert carry.installable(parse_tag("cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64"))
    assert carry.installable(parse_tag("cp39-abi3-manylinux_2_28_x86_64"))
    assert not carry.installable(parse_tag("cp312-cp312-manylinux_2_17_aarch64"))
    assert not carry.installable(parse_tag("cp313-cp313-manylinux_2_17_x86_64"))
    assert not carry.installable(parse_tag("cp312-cp312-win_amd64"))


def test_carried_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tree, carried, problems = carry.tree_bytes([Path("tests")])
    assert problems == [] and tree > carried > 0
    _, _, problems = carry.tree_bytes([tmp_path])
    assert "outside the checkout" in problems[0]
    _, _, problems = carry.tree_bytes([Path("no-such-folder")])
    assert "does not exist" in problems[0]
    monkeypatch.setattr(carry, "LIMIT_BYTES", tree + carried - 1)
    assert carry.main(["size", "--carry", "tests"]) == 1
    assert "OVER the 0 MiB limit" in capsys.readouterr().out.replace(f"{(tree + carried - 1) / 2**20:.0f}", "0")


def test_excerpt_trains_on_the_same_tensors_as_the_recipes_datamodule(tmp_path: Path, data_root: Path) -> None:
    info = write_excerpt(data_root, tmp_path / "x.npz", train=600, test=150)
    assert info["train"] == 600 and info["bytes"] > 750 * 3072
    got = CifarExcerpt(tmp_path / "x.npz", val_fraction=0.1, augment=True, batch_size=16)
    ref = ImageDataModule("cifar10", data_root, download=False, val_fraction=0.1, augment=True, batch_size=16,
                          train_subset=600, test_subset=150)
    assert got.sizes() == ref.sizes() == {"train": 540, "val": 60, "test": 150}
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(got, split).tensors, getattr(ref, split).tensors):
            assert torch.equal(a, b), split
    assert got.train_transform is ref.train_transform is not None
    assert got.train_dataloader().batch_size == 16


def test_excerpt_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no CIFAR-10 excerpt there"):
        read_excerpt(tmp_path / "none.npz")
    ok = dict(train_images=np.zeros((2, 3, 32, 32), np.uint8), train_labels=np.zeros(2, np.int64),
              test_images=np.zeros((1, 3, 32, 32), np.uint8), test_labels=np.zeros(1, np.int64))
    np.savez(tmp_path / "a.npz", **{k: v for k, v in ok.items() if k != "test_labels"})
    with pytest.raises(DatasetError, match=r"missing arrays \['test_labels'\]"):
        read_excerpt(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", **{**ok, "train_images": ok["train_images"].astype(np.float32)})
    with pytest.raises(DatasetError, match="train_images must be uint8 of rank 4, got float32"):
        read_excerpt(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", **{**ok, "test_labels": np.array([12])})
    with pytest.raises(DatasetError, match="test labels out of range"):
        read_excerpt(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", **{**ok, "train_labels": np.array([{"x": 1}, None], dtype=object)})
    with pytest.raises(DatasetError, match="train_labels holds pickled objects, which are never loaded"):
        read_excerpt(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="CifarExcerpt holds CIFAR-10, got name='mnist'"):
        CifarExcerpt(tmp_path / "a.npz", name="mnist")
