"""Fill ``.gpu/`` here (where PyPI is reachable) with what bench/gpu_check.sh needs on the offline GPU machine.

    python bench/gpu/prepare.py                     # .gpu/wheels + .gpu/data from $QMLHFL_DATA (or ../shared/data)
    python bench/gpu/prepare.py --data-src DIR --out .gpu --cifar-train 10000 --cifar-test 2000

- ``.gpu/wheels``: one wheel per distribution the project needs and the image lacks (bench/gpu/carry.py computes
  the closure), for CPython 3.12 on Linux x86_64, at the version pinned in constraints.txt, else the version
  installed in this environment (the one the tests ran with). A distribution published only as source
  (antlr4-python3-runtime, which omegaconf needs) is built here with ``pip wheel --no-deps``, and only accepted when
  the result is pure Python (a ``py3-none-any`` wheel runs on any CPython 3).
- ``.gpu/data/MNIST/raw``: the four MNIST files (md5-checked copies; 11.6 MB).
- ``.gpu/data/cifar10_excerpt.npz``: real CIFAR-10 images too few to be the dataset (bench/gpu/cifar_excerpt.py):
  CIFAR-10 is 178 MB, the device tool carries 64 MiB in all.

Nothing here runs on the GPU machine; ``.gpu/`` is git-ignored and travels with ``carry=[".gpu"]``. Finally the
carried size and the wheel closure are checked (``carry.py size`` / ``carry.py wheels``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from bench.gpu import carry  # noqa: E402
from bench.gpu.cifar_excerpt import write_excerpt  # noqa: E402
from recipes.datasets import MNIST_MD5, MNIST_SUBDIR, verify_md5  # noqa: E402

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pinned_version(name: str) -> str:
    """constraints.txt's ``==`` pin of ``name``, else the version installed here; an error if neither exists."""
    for line in (carry.REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s,#]+)", line)
        if m and carry.canonicalize_name(m[1]) == name:
            return m[2]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"prepare: {name} is neither pinned in constraints.txt nor installed here; pin it in "
                         f"constraints.txt") from None


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch_wheel(name: str, version: str, dest: Path) -> Path:
    """Download the CPython 3.12 / Linux x86_64 wheel of name==version into dest, or build it here if the
    distribution is published as source only and is pure Python."""
    before = set(dest.glob("*.whl"))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    got = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *plat, "-d", str(dest), f"{name}=={version}")
    if got.returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            built = _pip("wheel", "-q", "--no-deps", "--no-binary", name, "-w", tmp, f"{name}=={version}")
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode != 0 or len(wheels) != 1:
                raise SystemExit(f"prepare: no wheel of {name}=={version} for CPython 3.12 on Linux x86_64 and the "
                                 f"source does not build here:\n{got.stderr[-1500:]}\n{built.stderr[-1500:]}")
            if not wheels[0].name.endswith("-py3-none-any.whl") and "-py2.py3-none-any" not in wheels[0].name:
                raise SystemExit(f"prepare: {name}=={version} has no CPython 3.12 wheel and builds to "
                                 f"{wheels[0].name}, which is not pure Python: it would not run there")
            shutil.copy2(wheels[0], dest / wheels[0].name)
    new = set(dest.glob("*.whl")) - before
    if len(new) != 1:
        raise SystemExit(f"prepare: expected one new wheel for {name}=={version}, got {sorted(p.name for p in new)}")
    return new.pop()


def prepare_wheels(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for _ in range(20):  # each pass adds the wheels the previous ones require
        _, _, missing = carry.check_wheels(dest)
        if not missing:
            return done
        for name in sorted(missing):
            version = pinned_version(name)
            w = fetch_wheel(name, version, dest)
            done.append(w.name)
            print(f"  wheel {w.name}")
    raise SystemExit("prepare: the requirements did not close after 20 passes")


def prepare_mnist(src: Path, dest: Path) -> None:
    out = dest / MNIST_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    for name, accepted in MNIST_MD5.items():
        s = src / MNIST_SUBDIR / name
        verify_md5(s, accepted)
        target = out / name
        if not target.is_file() or target.stat().st_size != s.stat().st_size:
            shutil.copyfile(s, target)
            os.chmod(target, 0o644)
        verify_md5(target, accepted)
    print(f"  MNIST: {len(MNIST_MD5)} files in {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=carry.REPO / ".gpu", help="the carried folder (default .gpu)")
    default_src = os.environ.get("QMLHFL_DATA") or str(carry.REPO.parent / "shared" / "data")
    ap.add_argument("--data-src", type=Path, default=Path(default_src), help="MNIST and CIFAR-10 to take from")
    ap.add_argument("--cifar-train", type=int, default=10_000, help="CIFAR-10 training images in the excerpt")
    ap.add_argument("--cifar-test", type=int, default=2_000, help="CIFAR-10 test images in the excerpt")
    ap.add_argument("--no-cifar", action="store_true", help="no CIFAR-10 excerpt (the cifar_job step then fails)")
    args = ap.parse_args(argv)
    print(f"prepare: {args.out}")
    prepare_wheels(args.out / "wheels")
    prepare_mnist(args.data_src, args.out / "data")
    if not args.no_cifar:
        info = write_excerpt(args.data_src, args.out / "data" / "cifar10_excerpt.npz", args.cifar_train,
                             args.cifar_test)
        print(f"  CIFAR-10 excerpt: {info['train']} training + {info['test']} test images, "
              f"{info['bytes'] / 1e6:.1f} MB")
    rc = carry.main(["wheels", "--wheels", str(args.out / "wheels")])
    rc |= carry.main(["size", "--carry", str(args.out)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
