#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project with the tested versions from constraints.txt.
# torch is installed first and pinned: a bare `torch` requirement in a fresh environment would pull a CUDA build.
#
#   bash scripts/setup.sh          CPU build of torch 2.13.0 (constraints.txt): what the README and CI use
#   bash scripts/setup.sh --cuda   CUDA build of torch 2.13.0 from PyPI (constraints-cuda.txt), on a GPU machine
#
# --cuda: PyPI's torch 2.13.0 Linux wheel is built for CUDA 13.0 (NVIDIA driver >= 580) and requires
# triton==3.7.1, so constraints-cuda.txt pins that instead of constraints.txt's 3.9.0 (see its header). The
# local 2.13.0+cpu wheel of the CPU machines is excluded. An existing CPU .venv is converted in place. It fails
# if the torch it ends with is a CPU build; it warns if no GPU is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=0
for arg in "$@"; do
  case "$arg" in
    --cuda) CUDA=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/setup.sh: unknown option '$arg' (no option: CPU build; --cuda: CUDA build)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$CUDA" = 0 ]; then
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,triton]"
  exit 0
fi
.venv/bin/python -m pip install -q -c constraints-cuda.txt "torch==2.13.0,!=2.13.0+cpu"
.venv/bin/python -m pip install -q -c constraints-cuda.txt -e ".[test,triton]"
.venv/bin/python - <<'EOF'
import re
import sys

import torch
import triton

pins = dict(re.findall(r"^(torch|triton)==([^,\s]+)", open("constraints-cuda.txt").read(), re.M))
if torch.version.cuda is None:
    sys.exit(f"scripts/setup.sh --cuda: torch {torch.__version__} is a CPU build; expected the CUDA build of "
             f"torch=={pins['torch']} from PyPI (is PyPI reachable? does a local index shadow it?)")
if torch.__version__.split("+")[0] != pins["torch"] or triton.__version__ != pins["triton"]:
    sys.exit(f"scripts/setup.sh --cuda: got torch {torch.__version__} / triton {triton.__version__}, "
             f"constraints-cuda.txt pins torch {pins['torch']} / triton {pins['triton']}")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, GPU: {gpu or 'none'}")
if gpu is None:
    print(f"warning: torch sees no usable CUDA device; this build needs an NVIDIA driver for CUDA "
          f"{torch.version.cuda} (>= 580); check nvidia-smi", file=sys.stderr)
EOF
