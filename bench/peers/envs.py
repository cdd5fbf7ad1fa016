"""The peers' virtual environments: built on first use under bench/peers/.envs/<name>[-cuda]/, with pinned versions.

The peers are not dependencies of the project: each gets its own venv (Python from ``--python``, default the
``python3`` on PATH) holding torch 2.13.0, numpy and the framework, nothing else of this project. torch is
installed first, pinned, so that pip never pulls another build (a bare ``torch`` would pull a multi-GB CUDA build on
a CPU machine; on a GPU machine the CUDA venvs exclude the ``+cpu`` build, as ``scripts/setup.sh --cuda`` does).

A venv is complete when its marker ``.peers-env.json`` exists (written last, with the versions that installed); a
folder without it is a broken build and is rebuilt from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENVS = HERE / ".envs"
MARKER = ".peers-env.json"

TORCH = "torch==2.13.0"
TORCH_CUDA = "torch==2.13.0,!=2.13.0+cpu"
# name -> (pinned requirements after torch, the distributions whose versions the marker records)
SPECS: dict[str, tuple[list[str], list[str]]] = {
    "flower": (["flwr[simulation]==1.42.0", "ray==2.55.1", "numpy==2.4.6"],
               ["flwr", "ray", "torch", "numpy", "grpcio", "protobuf"]),
    "pfl": (["pfl[pytorch]==0.6.0", "numpy==2.4.6"], ["pfl", "torch", "numpy"]),
}


def env_dir(name: str, cuda: bool, root: Path = ENVS) -> Path:
    return root / (f"{name}-cuda" if cuda else name)


def env_python(name: str, cuda: bool, root: Path = ENVS) -> Path:
    return env_dir(name, cuda, root) / "bin" / "python"


def env_info(name: str, cuda: bool, root: Path = ENVS) -> dict | None:
    """The marker of a complete venv (versions, build time), or None."""
    marker = env_dir(name, cuda, root) / MARKER
    if not marker.exists() or not env_python(name, cuda, root).exists():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def build(name: str, cuda: bool, python: str = "python3", root: Path = ENVS, log=sys.stderr,
          timeout: float = 3600) -> dict:
    """Build the venv (from scratch) and return its marker; raises RuntimeError with the pip output's tail."""
    if name not in SPECS:
        raise ValueError(f"unknown peer {name!r}; allowed: {', '.join(SPECS)}")
    d = env_dir(name, cuda, root)
    if d.exists():
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    reqs, tracked = SPECS[name]
    t0 = time.time()
    steps = [
        [python, "-m", "venv", str(d)],
        [str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(d / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_CUDA if cuda else TORCH],
        [str(d / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_CUDA if cuda else TORCH, *reqs],
    ]
    for cmd in steps:
        print(f"[peers] {name}: {' '.join(cmd)}", file=log, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"building the {name} venv failed at `{' '.join(cmd[-3:])}` (rc {out.returncode}):\n"
                               f"{tail}")
    probe = ("import json, sys; from importlib.metadata import version; "
             f"print(json.dumps({{n: version(n) for n in {tracked!r}}})); import torch; "
             "sys.exit(0 if (torch.version.cuda is not None) == (sys.argv[1] == 'cuda') else 3)")
    out = subprocess.run([str(d / "bin" / "python"), "-c", probe, "cuda" if cuda else "cpu"], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the {name} venv does not work (rc {out.returncode}; 3 = torch is "
                           f"{'a CPU' if cuda else 'a CUDA'} build): {out.stdout[-500:]}{out.stderr[-1500:]}")
    pyver = subprocess.run([str(d / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
                           capture_output=True, text=True).stdout.strip()
    info = {"name": name, "cuda": cuda, "versions": json.loads(out.stdout.strip().splitlines()[-1]), "python": pyver,
            "requirements": [TORCH_CUDA if cuda else TORCH, *reqs], "build_s": round(time.time() - t0, 1),
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    (d / MARKER).write_text(json.dumps(info, indent=1))
    return info


def ensure(name: str, cuda: bool, allow_build: bool, python: str = "python3", root: Path = ENVS,
           log=sys.stderr) -> tuple[dict | None, str | None]:
    """(marker, None) when the venv is there or was built now; (None, reason) when it is not usable."""
    info = env_info(name, cuda, root)
    if info is not None:
        return info, None
    if not allow_build:
        return None, (f"no {name} venv at {env_dir(name, cuda, root)} (building disabled: run "
                      f"`python bench/peers/run.py --build-only{' --device cuda' if cuda else ''}`)")
    try:
        return build(name, cuda, python, root, log), None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not build the {name} venv: {e}"
