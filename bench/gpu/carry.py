"""What travels to the GPU machine, checked here: the wheels its image lacks, and the size of the carried tree.

The GPU machine (bench/gpu_check.sh) runs the project from the checkout with the image's own Python 3.12 and
packages; it reaches no network. Whatever the project needs and the image lacks must travel as wheels built for
CPython 3.12 on Linux x86_64 (``.gpu/wheels``, filled by ``bench/gpu/prepare.py``), and the working tree plus the
carried folders must stay under the device tool's 64 MiB.

    python bench/gpu/carry.py wheels --wheels .gpu/wheels      # closure of the requirements against the image
    python bench/gpu/carry.py size --carry .gpu                 # tree (git's view) + carried folders <= 64 MiB
    python bench/gpu/carry.py missing                           # requirement names the image lacks (for prepare)

Requirements: the project's ``dependencies`` and its ``test`` and ``triton`` extras (pyproject.toml), then the
``Requires-Dist`` of every wheel in the folder, markers evaluated for CPython 3.12 on Linux x86_64. A requirement
is met when the image has the distribution (bench/gpu/image_packages.txt: names, from the device documentation) or
when exactly one wheel of it is in the folder, with a version the specifier admits and a tag CPython 3.12 on
manylinux x86_64 can install. :data:`NOT_CARRIED` names the requirements the GPU steps never import.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from email.parser import Parser
from functools import lru_cache
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
IMAGE_LIST = Path(__file__).with_name("image_packages.txt")
LIMIT_BYTES = 64 * 2**20  # the device tool's limit on the working tree plus carried paths
EXTRAS = ("test", "triton")
# Project requirements that do not travel, with the reason (printed in the report).
NOT_CARRIED = {"wandb": "imported only by logger=wandb; the GPU steps log to CSV (logger=csv)"}
TARGET_ENV = {**default_environment(), "implementation_name": "cpython", "platform_machine": "x86_64",
              "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix", "python_version": "3.12",
              "python_full_version": "3.12.3", "platform_python_implementation": "CPython",
              "implementation_version": "3.12.3"}
# the platforms of a glibc Linux x86_64 machine (manylinux up to glibc 2.39), newest first
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SystemExit("bench/gpu/carry.py reads pyproject.toml with tomllib: run it with Python >= 3.11") from None
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return reqs


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({**TARGET_ENV, "extra": ""})


@lru_cache(maxsize=1)
def supported_tags() -> frozenset:
    """The wheel tags CPython 3.12 on glibc Linux x86_64 installs (packaging's own enumeration: cp312, abi3 of
    older CPythons, pure Python)."""
    from packaging import tags

    return frozenset(tags.cpython_tags((3, 12), platforms=PLATFORMS)) | frozenset(
        tags.compatible_tags((3, 12), "cp312", platforms=PLATFORMS))


def installable(wheel_tags) -> bool:
    """A wheel CPython 3.12 on Linux x86_64 can install (any of its tags)."""
    return not supported_tags().isdisjoint(wheel_tags)


def wheel_requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def check_wheels(wheel_dir: Path | None, image: set[str] | None = None) -> tuple[list[str], list[str], set[str]]:
    """(report lines, problems, names of requirements neither on the image nor in the folder)."""
    image = image_packages() if image is None else image
    wheels: dict[str, list[tuple[Path, object, frozenset]]] = {}
    for w in sorted(wheel_dir.glob("*.whl")) if wheel_dir is not None and wheel_dir.is_dir() else []:
        name, version, _build, tags = parse_wheel_filename(w.name)
        wheels.setdefault(name, []).append((w, version, tags))
    lines, problems, missing = [], [], set()
    for name, found in sorted(wheels.items()):
        if len(found) > 1:
            problems.append(f"{name}: {len(found)} wheels ({', '.join(f[0].name for f in found)}); keep one")
        for w, _v, tags in found:
            if not installable(tags):
                problems.append(f"{w.name}: not installable by CPython 3.12 on Linux x86_64")
    queue = [(r, "lightning-qmlhfl") for r in project_requirements()]
    seen: set[tuple[str, str]] = set()
    while queue:
        req, who = queue.pop(0)
        name = canonicalize_name(req.name)
        if not _applies(req) or (name, str(req.specifier)) in seen:
            continue
        seen.add((name, str(req.specifier)))
        if name in NOT_CARRIED:
            lines.append(f"{name}: not carried ({NOT_CARRIED[name]})")
            continue
        if name in wheels:
            w, version, _ = wheels[name][0]
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{w.name}: version {version} does not satisfy {req} (required by {who})")
            lines.append(f"{name}{req.specifier}: wheel {w.name} (for {who})")
            queue += [(r, name) for r in wheel_requirements(w)]
        elif name in image:
            lines.append(f"{name}{req.specifier}: on the image (for {who})")
        else:
            missing.add(name)
            problems.append(f"{name}{req.specifier}: required by {who}, not on the image and no wheel in "
                            f"{wheel_dir} (bench/gpu/prepare.py downloads it)")
    return lines, problems, missing


def tree_bytes(carry: list[Path]) -> tuple[int, int, list[str]]:
    """(bytes of the working tree as it travels, bytes of the carried paths, problems): the tree is every file git
    tracks or would track (tracked, and untracked but not ignored); carried paths are added whole."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    tree = 0
    for rel in filter(None, out.decode().split("\0")):
        p = REPO / rel
        if p.is_file() and not p.is_symlink():
            tree += p.stat().st_size
    carried, problems = 0, []
    for c in carry:
        p = c if c.is_absolute() else REPO / c
        if not p.exists():
            problems.append(f"carried path {c} does not exist")
            continue
        try:
            p.resolve().relative_to(REPO)
        except ValueError:
            problems.append(f"carried path {c} is outside the checkout ({REPO}); only paths inside it travel")
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
        carried += sum(f.stat().st_size for f in files)
    return tree, carried, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="check the requirements' closure against the image and the wheel folder")
    w.add_argument("--wheels", type=Path, required=True)
    s = sub.add_parser("size", help="check the carried tree against the 64 MiB limit")
    s.add_argument("--carry", type=Path, nargs="*", default=[])
    sub.add_parser("missing", help="print the requirement names the image lacks (one per line)")
    args = ap.parse_args(argv)
    if args.cmd == "missing":
        _, _, missing = check_wheels(None)
        print("\n".join(sorted(missing)))
        return 0
    if args.cmd == "wheels":
        lines, problems, _ = check_wheels(args.wheels)
        for line in lines:
            print(f"  {line}")
        for p in problems:
            print(f"  PROBLEM {p}")
        n = len(list(args.wheels.glob("*.whl"))) if args.wheels.is_dir() else 0
        print(f"{n} wheels in {args.wheels}: " + ("closure complete for CPython 3.12 on Linux x86_64" if not problems
                                                  else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    tree, carried, problems = tree_bytes(args.carry)
    total = tree + carried
    for p in problems:
        print(f"  PROBLEM {p}")
    ok = total <= LIMIT_BYTES and not problems
    print(f"tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
          f"({'within' if ok else 'OVER'} the {LIMIT_BYTES / 2**20:.0f} MiB limit"
          f"{'' if total <= LIMIT_BYTES else f' by {(total - LIMIT_BYTES) / 2**20:.1f} MiB'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
