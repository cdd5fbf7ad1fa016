#!/usr/bin/env bash
# The GPU checks in one offline run of at most GPU_CHECK_BUDGET_S seconds (default 480) on one NVIDIA GPU.
# Nothing is downloaded: missing Python packages come from a wheel folder, the data from a data folder.
#
#   bash bench/gpu_check.sh [options]             run the steps below
#   bash bench/gpu_check.sh --dry-run [options]   check that every command, wheel, file and option is in place and
#                                                 that the carried tree fits; run nothing on a GPU
#   bash bench/gpu_check.sh --versions [options]  print the environment report of the first step and exit
#
# Options:
#   --python PY     the interpreter (default $QMLHFL_PYTHON, else .venv/bin/python); the project is imported from
#                   this checkout (PYTHONPATH), never installed
#   --wheels DIR    wheels of what PY's environment lacks, installed with pip --no-index --target into a temporary
#                   folder put on PYTHONPATH (bench/gpu/prepare.py fills .gpu/wheels for the H200 image)
#   --data DIR      MNIST (DIR/MNIST/raw) and CIFAR-10: DIR/cifar-10-batches-py if there, else the excerpt
#                   DIR/cifar10_excerpt.npz (bench/gpu/cifar_excerpt.py); default $QMLHFL_DATA, else ../shared/data
#   --out DIR       where every output goes (default $OUT, else ./gpu_out)
#   --bundle FILE   after every step, pack DIR (without checkpoints) into FILE (.tar.gz), so that a run cut off by a
#                   time limit still hands back what finished (the device tool returns at most 8 files)
#   --steps LIST    run only these steps, in this order (comma-separated names from the list below; for reruns)
#   --engine-configs LIST   the engine step's configurations (default: the list below, in that order)
#   --timeouts LIST  per-step timeouts in seconds replacing the defaults, e.g. engine=200,tests=60
#
# Steps, in priority order, each under its own `timeout` and capped by what is left of the budget:
#   versions         nvidia-smi, python, torch, CUDA, triton, lightning, numba; pip freeze
#   wheels           pip install --no-index of --wheels (only with --wheels)
#   tests            tests/test_kernels.py + tests/test_engine.py on CUDA with compiled Triton (pytest-xdist if there)
#   kernels_*        bench/kernels.py --device cuda, both layouts, 100 x 1M and 1000 x 159k: fp32 (QSGD, Identity,
#                    with and without EF), bf16 (QSGD), buckets of 512 (QSGD, ScaledSign); kernels_blocks: QSGD
#                    fp32 with 256 and 4096 columns per program (the default is 1024)
#   engine           bench/engine.py --device cuda: vmap and loop against the naive per-client loop, LeNet x 1000
#                    first; MLP x 100 / 1000, LeNet x 100, the CIFAR CNN x 64; JSON lines in engine.jsonl
#   main_job         python -m recipes.mnist trainer.accelerator=gpu (the README's main job), timed
#   cifar_job        python -m recipes.cifar trainer.accelerator=gpu rounds=3, timed
# DIR/steps.tsv: step, exit code (124: timed out; "skipped": no time left), seconds, timeout, log, command (written
# as each step ends). DIR/wall_times.txt: the two jobs' wall times. DIR/<step>.log: each step's output.
# Exit status: 0 if every step (or check) succeeded, 1 otherwise, 2 for a bad option.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
die_usage() { echo "bench/gpu_check.sh: $1" >&2; exit 2; }

DRY=0
VERSIONS=0
PY="${QMLHFL_PYTHON:-.venv/bin/python}"
WHEELS=""
DATA="${QMLHFL_DATA:-$(cd .. && pwd)/shared/data}"
OUT_DIR="${OUT:-./gpu_out}"
BUNDLE=""
ONLY=""
ENGINE_CONFIGS=""
STEP_TIMEOUTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --versions) VERSIONS=1 ;;
    --python|--wheels|--data|--out|--bundle|--steps|--engine-configs|--timeouts)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"
      case "$1" in
        --python) PY="$2" ;; --wheels) WHEELS="$2" ;; --data) DATA="$2" ;; --out) OUT_DIR="$2" ;;
        --bundle) BUNDLE="$2" ;; --steps) ONLY="$2" ;; --engine-configs) ENGINE_CONFIGS="$2" ;;
        --timeouts) STEP_TIMEOUTS="$2" ;;
      esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown option '$1' (options: --python PY, --wheels DIR, --data DIR, --out DIR, --bundle FILE, --steps LIST, --engine-configs LIST, --timeouts LIST, --dry-run, --versions, --help)" ;;
  esac
  shift
done

mkdir -p "$OUT_DIR" || { echo "bench/gpu_check.sh: cannot create the output folder $OUT_DIR" >&2; exit 1; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[ -d "$DATA" ] && DATA="$(cd "$DATA" && pwd)"
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then WHEELS="$(cd "$WHEELS" && pwd)"; fi
if [ -n "$BUNDLE" ]; then
  mkdir -p "$(dirname "$BUNDLE")" && BUNDLE="$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")" ||
    { echo "bench/gpu_check.sh: cannot create the folder of --bundle $BUNDLE" >&2; exit 1; }
fi
command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || PY_MISSING=1
export QMLHFL_DATA="$DATA" WANDB_MODE=disabled WANDB_SILENT=true HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
Q_OUT="$(printf %q "$OUT_DIR")"
Q_PY="$(printf %q "$PY")"
Q_DATA="$(printf %q "$DATA")"

# The CIFAR job's data: the real CIFAR-10 if the data folder has it, else the excerpt through its datamodule.
if [ -d "$DATA/cifar-10-batches-py" ]; then
  CIFAR_DATA="" ; CIFAR_WHAT="CIFAR-10 from $DATA/cifar-10-batches-py"
else
  CIFAR_DATA="datamodule._target_=bench.gpu.cifar_excerpt.CifarExcerpt +datamodule.path=$Q_DATA/cifar10_excerpt.npz +datamodule.augment=true"
  CIFAR_WHAT="the CIFAR-10 excerpt $DATA/cifar10_excerpt.npz (bench/gpu/cifar_excerpt.py)"
fi

# install_wheels TARGET: pip install --no-index the wheel folder into TARGET and put it on PYTHONPATH
install_wheels() {
  local target="$1"
  [ -n "$WHEELS" ] || return 0
  compgen -G "$WHEELS/*.whl" >/dev/null || { echo "no wheels in $WHEELS"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --upgrade --target "$target" "$WHEELS"/*.whl || return 1
  export PYTHONPATH="$PYTHONPATH:$target"
}

versions() {
  echo "# bench/gpu_check.sh environment, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  echo "kernel: $(uname -srm); CPUs: $(nproc)"
  "$PY" - <<'EOF'
import platform
import sys

print("python", platform.python_version(), sys.executable)
import torch

cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| cudnn", cudnn)
for name in ("triton", "lightning", "pytorch_lightning", "torchmetrics", "numba", "numpy", "hydra", "omegaconf"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # report and go on: this is an inventory
        print(name, "not importable:", type(e).__name__, e)
print("torch.cuda.is_available()", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
  local rc=$?
  "$PY" -m pip freeze > "$OUT_DIR/pip_freeze.txt" 2>&1 || true
  return $rc
}

if [ "$VERSIONS" = 1 ]; then
  [ -z "${PY_MISSING:-}" ] || { echo "bench/gpu_check.sh: no python at $PY" >&2; exit 1; }
  versions
  exit $?
fi

# ------------------------------------------------------------------------------------------------- the steps
XDIST=""  # decided at run time: pytest-xdist spreads the Triton compilations over the CPU cores; pytest-timeout
TEST_ARGS="-m pytest -v -rs --durations=15 -p no:cacheprovider --junitxml=$Q_OUT/tests.xml tests/test_kernels.py tests/test_engine.py"
KERNEL_ARGS="--device cuda --layout both --rep-ms 100 --pairs 100x1000000 1000x159010"
if [ -z "$ENGINE_CONFIGS" ]; then
  ENGINE_CONFIGS="lenet1000:vmap,lenet1000:naive,lenet1000:loop,mlp100:naive,mlp100:vmap,mlp100:loop"
  ENGINE_CONFIGS+=",lenet100:naive,lenet100:vmap,lenet100:loop,cifar64:naive,cifar64:vmap,cifar64:loop"
  ENGINE_CONFIGS+=",mlp1000:vmap,mlp1000:naive,mlp1000:loop,mlp1000:vmap+bf16,cifar1000:vmap"
fi
# (in this order: when the budget runs out, the configurations at the end are the ones left out)
# @BUDGET@: the step's timeout minus 25 s, so that the engine stops starting configurations and prints its table
ENGINE_ARGS="--device cuda --in-process --rounds 1 --configs $ENGINE_CONFIGS --jsonl $Q_OUT/engine.jsonl --budget-s @BUDGET@"
MNIST_ARGS="trainer.accelerator=gpu trainer.enable_progress_bar=false hydra.run.dir=$Q_OUT/main_job"
CIFAR_ARGS="trainer.accelerator=gpu rounds=3 trainer.enable_progress_bar=false hydra.run.dir=$Q_OUT/cifar_job $CIFAR_DATA"

NAMES=()
TIMEOUTS=()
CMDS=()
add() { NAMES+=("$1"); TIMEOUTS+=("$2"); CMDS+=("$3"); }
add versions 40 "bash bench/gpu_check.sh --versions --python $Q_PY --out $Q_OUT > $Q_OUT/versions.txt"
add tests 110 "TRITON_INTERPRET=0 QMLHFL_TEST_DEVICE=cuda $Q_PY $TEST_ARGS @XDIST@"
add kernels_fp32 35 "$Q_PY bench/kernels.py $KERNEL_ARGS --compressor qsgd identity --ef none ef"
add kernels_bf16 25 "$Q_PY bench/kernels.py $KERNEL_ARGS --dtype bfloat16"
add kernels_bucket512 25 "$Q_PY bench/kernels.py $KERNEL_ARGS --bucket 512 --compressor qsgd sign"
BLOCK_ARGS="--device cuda --layout segments --no-torch --rep-ms 100 --pairs 100x1000000 1000x159010"
add kernels_blocks 30 "$Q_PY bench/kernels.py $BLOCK_ARGS --block 256; $Q_PY bench/kernels.py $BLOCK_ARGS --block 4096"
add engine 130 "$Q_PY bench/engine.py $ENGINE_ARGS"
add main_job 90 "$Q_PY -m recipes.mnist $MNIST_ARGS"
add cifar_job 45 "$Q_PY -m recipes.cifar $CIFAR_ARGS"

if [ -n "$ONLY" ]; then  # --steps: keep the named steps, in the order given
  SEL_N=(); SEL_T=(); SEL_C=()
  IFS=',' read -ra WANT <<< "$ONLY"
  for w in "${WANT[@]}"; do
    found=0
    for i in "${!NAMES[@]}"; do
      if [ "${NAMES[$i]}" = "$w" ]; then SEL_N+=("$w"); SEL_T+=("${TIMEOUTS[$i]}"); SEL_C+=("${CMDS[$i]}"); found=1; fi
    done
    [ "$found" = 1 ] || die_usage "--steps: unknown step '$w' (steps: ${NAMES[*]})"
  done
  NAMES=("${SEL_N[@]}"); TIMEOUTS=("${SEL_T[@]}"); CMDS=("${SEL_C[@]}")
fi

if [ -n "$STEP_TIMEOUTS" ]; then  # --timeouts name=seconds,...
  IFS=',' read -ra PAIRS <<< "$STEP_TIMEOUTS"
  for pair in "${PAIRS[@]}"; do
    name="${pair%%=*}"; secs="${pair#*=}"
    [[ "$pair" == *=* && "$secs" =~ ^[0-9]+$ && "$secs" -ge 1 ]] ||
      die_usage "--timeouts: expected NAME=SECONDS with SECONDS >= 1, got '$pair'"
    found=0
    for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$name" ] && TIMEOUTS[$i]="$secs" && found=1; done
    [ "$found" = 1 ] || die_usage "--timeouts: no step '$name' in this run (steps: ${NAMES[*]})"
  done
fi

engine_budget() { echo $(($1 > 40 ? $1 - 25 : 10)); }
expand() { local c="${1//@BUDGET@/$(engine_budget "$2")}"; echo "${c//@XDIST@/$XDIST}"; }

# ------------------------------------------------------------------------------------------------- --dry-run
if [ "$DRY" = 1 ]; then
  CHECK="$OUT_DIR/dry_run"
  mkdir -p "$CHECK"
  FAIL=0
  ok() { printf '  ok       %s\n' "$1"; }
  bad() { printf '  MISSING  %s\n' "$1"; FAIL=1; }
  echo "bench/gpu_check.sh --dry-run (out $OUT_DIR, budget ${BUDGET_S} s, python $PY, wheels ${WHEELS:-none}, data $DATA)"
  echo "would run:"
  total=0
  [ -n "$WHEELS" ] && printf '  %-18s timeout %4ss  pip install --no-index --no-deps --target TMP %s/*.whl\n' wheels 20 "$WHEELS"
  for i in "${!NAMES[@]}"; do
    printf '  %-18s timeout %4ss  %s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "$(expand "${CMDS[$i]}" "${TIMEOUTS[$i]}")"
    total=$((total + TIMEOUTS[i]))
  done
  echo "  (step timeouts add up to ${total} s; each is capped by what is left of the ${BUDGET_S} s budget)"
  echo "  CIFAR job data: $CIFAR_WHAT"
  if [ "$BUDGET_S" -gt 480 ]; then bad "a budget within 8 minutes (GPU_CHECK_BUDGET_S=${BUDGET_S})"; fi
  echo "checks:"
  for c in bash timeout date hostname uname nproc sed tar git; do
    if command -v "$c" >/dev/null 2>&1; then ok "command $c"; else bad "command $c"; fi
  done
  if command -v nvidia-smi >/dev/null 2>&1; then ok "command nvidia-smi"
  else echo "  note     nvidia-smi not found (expected on a machine without a GPU; the versions step records its absence)"; fi
  for f in bench/engine.py bench/workloads.py bench/machine_info.py bench/naive_hierfl.py bench/kernels.py \
           bench/gpu/carry.py bench/gpu/cifar_excerpt.py tests/test_kernels.py tests/test_engine.py recipes/mnist.py \
           recipes/cifar.py constraints.txt constraints-cuda.txt; do
    if [ -f "$f" ]; then ok "file $f"; else bad "file $f"; fi
  done
  if [ -d "$DATA/MNIST/raw" ]; then ok "data $DATA/MNIST/raw"; else bad "data $DATA/MNIST/raw (--data DIR)"; fi
  if [ -d "$DATA/cifar-10-batches-py" ] || [ -f "$DATA/cifar10_excerpt.npz" ]; then ok "data: $CIFAR_WHAT"
  else bad "data $DATA/cifar-10-batches-py or $DATA/cifar10_excerpt.npz (python bench/gpu/prepare.py writes the excerpt)"; fi
  if [ -n "${PY_MISSING:-}" ]; then
    bad "python $PY (give --python; the GPU image's is python3)"
    echo "bench/gpu_check.sh --dry-run: FAILED (no python at $PY)"
    exit 1
  fi
  ok "python $PY ($("$PY" -c 'import platform; print(platform.python_version())' 2>&1))"
  # the wheels: the closure of the project's requirements against the image, then a real offline install
  CARRY_PY=".venv/bin/python"; [ -x "$CARRY_PY" ] || CARRY_PY="$PY"
  if [ -n "$WHEELS" ]; then
    if "$CARRY_PY" bench/gpu/carry.py wheels --wheels "$WHEELS" > "$CHECK/wheels.log" 2>&1; then
      ok "wheels for Python 3.12: $(tail -1 "$CHECK/wheels.log")"
    else
      bad "wheels for Python 3.12 (see $CHECK/wheels.log):"; grep PROBLEM "$CHECK/wheels.log" | sed 's/^/           | /'
    fi
    SITE="$(mktemp -d)"
    trap 'rm -rf "$SITE"' EXIT
    if install_wheels "$SITE" > "$CHECK/install.log" 2>&1; then ok "offline install of $WHEELS with $PY"
    else bad "offline install of $WHEELS with $PY (see $CHECK/install.log)"; tail -3 "$CHECK/install.log" | sed 's/^/           | /'; fi
  else
    echo "  note     no --wheels: the interpreter's environment must hold everything (the GPU image lacks hydra-core)"
  fi
  # what travels: the tree as git sees it plus the wheel and data folders when they are inside the checkout
  CARRIED=()
  for d in "$WHEELS" "$DATA"; do
    [ -n "$d" ] && [ -e "$d" ] && case "$d/" in "$REPO"/*) CARRIED+=("${d#"$REPO"/}") ;; esac
  done
  if "$CARRY_PY" bench/gpu/carry.py size --carry "${CARRIED[@]}" > "$CHECK/size.log" 2>&1; then
    ok "carried size: $(tail -1 "$CHECK/size.log")"
  else bad "carried size: $(cat "$CHECK/size.log")"; fi
  if "$CARRY_PY" - > "$CHECK/constraints.log" 2>&1 <<'EOF'
import re
import sys


def pins(path):
    out = {}
    for number, raw in enumerate(open(path), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:==|!=)[^\s,]+(?:\s*,\s*(?:==|!=)[^\s,]+)*)", line)
        if not m:
            sys.exit(f"{path}:{number}: not a pin (NAME==VERSION[,!=VERSION...]): {raw.strip()!r}")
        name = re.sub(r"[-_.]+", "-", m[1]).lower()
        if name in out:
            sys.exit(f"{path}:{number}: {name} pinned twice")
        out[name] = [c.strip() for c in m[2].split(",")]
    return out


cpu, cuda = pins("constraints.txt"), pins("constraints-cuda.txt")
problems = []
for name, spec in cpu.items():
    if name not in ("torch", "triton") and cuda.get(name) != spec:
        problems.append(f"{name}: constraints.txt {','.join(spec)}, constraints-cuda.txt "
                        f"{','.join(cuda[name]) if name in cuda else 'missing'}")
extra = sorted(n for n in cuda if n not in cpu)
for name in extra:
    if not re.match(r"(nvidia|cuda)-", name):
        problems.append(f"{name}: pinned only in constraints-cuda.txt (only nvidia-*/cuda-* may be added)")
for name in ("torch", "triton"):
    if name not in cuda or not cuda[name][0].startswith("=="):
        problems.append(f"{name}: constraints-cuda.txt must pin it with ==")
if not problems:
    if cuda["torch"][0] != cpu["torch"][0]:
        problems.append(f"torch: constraints-cuda.txt {cuda['torch'][0]}, constraints.txt {cpu['torch'][0]} "
                        f"(the same torch version is meant)")
    for clause in cuda["torch"][1:]:
        if not re.fullmatch(r"!=[^+]+\+\S+", clause):
            problems.append(f"torch: {clause!r} in constraints-cuda.txt: only exclusions of local builds "
                            f"(!=VERSION+LOCAL) may be added")
if problems:
    print("constraints-cuda.txt is not consistent with constraints.txt:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"{len(cpu) - 2} shared pins equal; torch {','.join(cuda['torch'])}; triton {cuda['triton'][0]} "
      f"(constraints.txt {cpu['triton'][0]}); CUDA extras: {', '.join(extra) or 'none'}")
EOF
  then ok "constraints-cuda.txt consistent with constraints.txt: $(tail -1 "$CHECK/constraints.log")"
  else bad "constraints-cuda.txt consistent with constraints.txt: $(cat "$CHECK/constraints.log")"; fi

  # The python entry points with the very arguments of the run, side by side (each ~2-12 s), with the wheels.
  cat > "$CHECK/kernels_options.py" <<'EOF'
"""Parse bench/kernels.py's options exactly as the kernels_* steps pass them (argv: one step's options)."""
import sys

sys.path.insert(0, "bench")
import kernels  # noqa: E402

print(kernels.parse_args(sys.argv[1:]))
EOF
  cat > "$CHECK/cifar_data.py" <<'EOF'
"""Load the CIFAR job's data as the run will (argv: real|excerpt, the data folder) and print the split sizes."""
import sys

from bench.gpu.cifar_excerpt import CifarExcerpt
from recipes.datamodules import ImageDataModule

kind, data = sys.argv[1:3]
dm = ImageDataModule("cifar10", data, download=False) if kind == "real" else CifarExcerpt(f"{data}/cifar10_excerpt.npz")
print(kind, dm.sizes())
EOF
  kcmds=""
  for i in "${!NAMES[@]}"; do
    case "${NAMES[$i]}" in
      kernels_*) kcmds+="${kcmds:+ && }${CMDS[$i]//bench\/kernels.py/$(printf %q "$CHECK/kernels_options.py")}" ;;
    esac
  done
  CHECK_NAMES=(versions tests_collect kernels_options engine_options main_job_config cifar_job_config cifar_data)
  CHECK_CMDS=(
    "bash bench/gpu_check.sh --versions --python $Q_PY --out $(printf %q "$CHECK")"
    "TRITON_INTERPRET=0 $Q_PY -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py"
    "$kcmds"
    "$Q_PY bench/engine.py ${ENGINE_ARGS//@BUDGET@/105} --dry-run"
    "$Q_PY -m recipes.mnist --cfg job $MNIST_ARGS"
    "$Q_PY -m recipes.cifar --cfg job $CIFAR_ARGS"
    "$Q_PY $(printf %q "$CHECK/cifar_data.py") $( [ -z "$CIFAR_DATA" ] && echo real || echo excerpt) $Q_DATA"
  )
  PIDS=()
  for i in "${!CHECK_NAMES[@]}"; do
    timeout -k 2 150 bash -c "${CHECK_CMDS[$i]}" > "$CHECK/${CHECK_NAMES[$i]}.log" 2>&1 &
    PIDS+=($!)
  done
  for i in "${!CHECK_NAMES[@]}"; do
    if wait "${PIDS[$i]}"; then ok "${CHECK_NAMES[$i]}: ${CHECK_CMDS[$i]}"
    else
      bad "${CHECK_NAMES[$i]} (exit $?, see $CHECK/${CHECK_NAMES[$i]}.log): ${CHECK_CMDS[$i]}"
      tail -5 "$CHECK/${CHECK_NAMES[$i]}.log" | sed 's/^/           | /'
    fi
  done
  if [ "$FAIL" = 0 ]; then echo "bench/gpu_check.sh --dry-run: all checks passed"; exit 0; fi
  echo "bench/gpu_check.sh --dry-run: FAILED (see the MISSING lines)"
  exit 1
fi

# ------------------------------------------------------------------------------------------------- the run
[ -z "${PY_MISSING:-}" ] || { echo "bench/gpu_check.sh: no python at $PY (give --python)" >&2; exit 1; }
STEPS="$OUT_DIR/steps.tsv"
printf 'step\texit_code\tseconds\ttimeout_s\tlog\tcommand\n' > "$STEPS"
: > "$OUT_DIR/wall_times.txt"
FAILED=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

bundle() {
  [ -n "$BUNDLE" ] || return 0
  tar -C "$(dirname "$OUT_DIR")" --exclude='*.ckpt' --exclude='*.shards' -czf "$BUNDLE.tmp" "$(basename "$OUT_DIR")" &&
    mv -f "$BUNDLE.tmp" "$BUNDLE"
}

# run_step NAME TIMEOUT_S COMMAND: run COMMAND under `timeout` (capped by the budget), log it, record it
run_step() {
  local name="$1" limit="$2" log="$OUT_DIR/$1.log" t0 t1 rc secs cmd
  local left=$((BUDGET_S - (SECONDS - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  cmd="$(expand "$3" "$limit")"
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$log" "$cmd" >> "$STEPS"
    echo "== $name: skipped (no time left of the ${BUDGET_S} s budget)"
    FAILED=1
    LAST_SECS=""
    return
  fi
  echo "== $name (timeout ${limit} s): $cmd"
  t0=$(now)
  timeout -k 2 "$limit" bash -c "$cmd" > "$log" 2>&1
  rc=$?
  t1=$(now)
  secs=$(elapsed "$t0" "$t1")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$log" "$cmd" >> "$STEPS"
  echo "   exit $rc after $secs s ($( [ "$rc" = 124 ] && echo "timed out; " )log: $log)"
  [ "$rc" = 0 ] || { FAILED=1; tail -4 "$log" | sed 's/^/   | /'; }
  LAST_SECS=$secs
  LAST_RC=$rc
  bundle
}

echo "bench/gpu_check.sh: out $OUT_DIR, python $PY, wheels ${WHEELS:-none}, data $DATA, budget ${BUDGET_S} s"
T0=$SECONDS
SITE="$(mktemp -d)"
if [ -n "$WHEELS" ]; then
  t0=$(now)
  install_wheels "$SITE" > "$OUT_DIR/wheels.log" 2>&1
  rc=$?
  printf 'wheels\t%s\t%s\t-\t%s\tpip install --no-index --no-deps --target %s %s/*.whl\n' "$rc" "$(elapsed "$t0" "$(now)")" \
    "$OUT_DIR/wheels.log" "$SITE" "$WHEELS" >> "$STEPS"
  echo "== wheels: exit $rc"
  [ "$rc" = 0 ] || FAILED=1
fi
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then XDIST+=" --timeout 90"; fi
for i in "${!NAMES[@]}"; do
  LAST_SECS=""
  LAST_RC=""
  run_step "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${CMDS[$i]}"
  case "${NAMES[$i]}" in
    main_job|cifar_job)
      if [ -n "$LAST_SECS" ]; then
        echo "${NAMES[$i]}: ${LAST_SECS} s wall clock, exit ${LAST_RC}: $(expand "${CMDS[$i]}" 0)" >> "$OUT_DIR/wall_times.txt"
      else
        echo "${NAMES[$i]}: not run (no time left)" >> "$OUT_DIR/wall_times.txt"
      fi ;;
  esac
done
bundle
echo "== done in $((SECONDS - T0)) s; $STEPS:"
column -t -s $'\t' "$STEPS" 2>/dev/null | cut -c1-140 || cat "$STEPS"
cat "$OUT_DIR/wall_times.txt"
exit "$FAILED"
