#!/usr/bin/env bash
# The GPU checks in one run, at most 7 minutes on one NVIDIA H200; every output goes under $OUT (default ./gpu_out).
#
#   bash bench/gpu_check.sh             run the steps below
#   bash bench/gpu_check.sh --dry-run   check that every command, file and option is in place; run nothing on a GPU
#   bash bench/gpu_check.sh --setup     first `bash scripts/setup.sh --cuda` (the CUDA build of torch), then run
#   bash bench/gpu_check.sh --versions  print the environment report of step 1 and exit
#
# Steps, each under its own `timeout`, each run whatever the previous ones returned:
#   1 versions       nvidia-smi, python, torch, torch.version.cuda, triton, lightning  -> versions.txt
#   2 tests          tests/test_kernels.py + tests/test_engine.py on CUDA with compiled Triton
#   3 kernels_*      bench/kernels.py --device cuda --layout both: fp32, bf16, QSGD buckets of 512
#   4 engine         bench/engine.py --device cuda: vmap and loop against naive; MLP, LeNet, CIFAR CNN; 100 and
#                    1000 devices; one timed round each; JSON lines in engine.jsonl
#   5 main_job       python -m recipes.mnist on the GPU (the README's main job), timed
#     cifar_job      python -m recipes.cifar on the GPU, its defaults for 3 rounds, timed
# $OUT/steps.tsv: step, exit code (124: timed out; "skipped": no time left), seconds, timeout, log, command.
# $OUT/wall_times.txt: the two jobs' wall times. $OUT/<step>.log: each step's stdout and stderr.
# The step timeouts add up to 399 s; a step never gets more than what is left of GPU_CHECK_BUDGET_S (default
# 405 s, counted from the first step), so the steps end within 7 minutes. --setup runs before that clock starts
# (its own timeout, GPU_CHECK_SETUP_TIMEOUT_S, default 1200 s: it downloads several GB).
# Environment: QMLHFL_DATA (default ../shared/data beside the checkout), QMLHFL_PYTHON (default .venv/bin/python).
# Exit status: 0 if every step (or check) succeeded, 1 otherwise, 2 for a bad option.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
SETUP=0
VERSIONS=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --setup) SETUP=1 ;;
    --versions) VERSIONS=1 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown option '$arg' (options: --dry-run, --setup, --versions, --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT" || { echo "bench/gpu_check.sh: cannot create OUT=$OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
PY="${QMLHFL_PYTHON:-.venv/bin/python}"
export QMLHFL_DATA="${QMLHFL_DATA:-$(cd .. && pwd)/shared/data}"
export WANDB_MODE=disabled WANDB_SILENT=true HYDRA_FULL_ERROR=1
BUDGET_S="${GPU_CHECK_BUDGET_S:-405}"
SETUP_TIMEOUT_S="${GPU_CHECK_SETUP_TIMEOUT_S:-1200}"
Q_OUT="$(printf %q "$OUT")"
Q_PY="$(printf %q "$PY")"

versions() {
  echo "# bench/gpu_check.sh environment, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
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
for name in ("triton", "lightning", "numba", "numpy"):
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
  "$PY" -m pip freeze > "$OUT/pip_freeze.txt" 2>&1 || true
  return $rc
}

if [ "$VERSIONS" = 1 ]; then
  versions
  exit $?
fi

# ------------------------------------------------------------------------------------------------- the steps
TEST_ARGS="-m pytest -q -rs --durations=15 --junitxml=$Q_OUT/tests.xml tests/test_kernels.py tests/test_engine.py"
KERNEL_ARGS="--device cuda --layout both --rep-ms 100"
ENGINE_CONFIGS="mlp100:naive,mlp100:vmap,mlp100:loop,lenet100:naive,lenet100:vmap,lenet100:loop"
ENGINE_CONFIGS+=",cifar100:naive,cifar100:vmap,cifar100:loop,mlp1000:vmap,lenet1000:vmap,cifar1000:vmap"
ENGINE_CONFIGS+=",mlp1000:naive,mlp1000:loop,lenet1000:naive,lenet1000:loop,cifar1000:naive,cifar1000:loop"
# (in this order: when the budget runs out, the slow 1000-device naive and loop runs are the ones left out)
# @BUDGET@: the step's timeout minus 30 s, so that the engine stops starting configurations and prints its table
ENGINE_ARGS="--device cuda --in-process --rounds 1 --configs $ENGINE_CONFIGS --jsonl $Q_OUT/engine.jsonl --budget-s @BUDGET@"
MNIST_ARGS="trainer.accelerator=gpu trainer.progress_bar=false hydra.run.dir=$Q_OUT/main_job"
CIFAR_ARGS="trainer.accelerator=gpu trainer.rounds=3 trainer.progress_bar=false hydra.run.dir=$Q_OUT/cifar_job"

NAMES=()
TIMEOUTS=()
CMDS=()
add() { NAMES+=("$1"); TIMEOUTS+=("$2"); CMDS+=("$3"); }
add versions 20 "bash bench/gpu_check.sh --versions > $Q_OUT/versions.txt"
add tests 65 "TRITON_INTERPRET=0 QMLHFL_TEST_DEVICE=cuda $Q_PY $TEST_ARGS"
add kernels_fp32 33 "$Q_PY bench/kernels.py $KERNEL_ARGS"
add kernels_bf16 33 "$Q_PY bench/kernels.py $KERNEL_ARGS --dtype bfloat16"
add kernels_bucket512 33 "$Q_PY bench/kernels.py $KERNEL_ARGS --bucket 512"
add engine 105 "$Q_PY bench/engine.py $ENGINE_ARGS"
add main_job 70 "$Q_PY -m recipes.mnist $MNIST_ARGS"
add cifar_job 40 "$Q_PY -m recipes.cifar $CIFAR_ARGS"

engine_budget() { echo $(($1 > 40 ? $1 - 30 : 10)); }

# ------------------------------------------------------------------------------------------------- --dry-run
if [ "$DRY" = 1 ]; then
  CHECK="$OUT/dry_run"
  mkdir -p "$CHECK"
  FAIL=0
  ok() { printf '  ok       %s\n' "$1"; }
  bad() { printf '  MISSING  %s\n' "$1"; FAIL=1; }
  echo "bench/gpu_check.sh --dry-run (OUT=$OUT, budget ${BUDGET_S} s)"
  echo "would run:"
  [ "$SETUP" = 1 ] && printf '  %-18s timeout %4ss  bash scripts/setup.sh --cuda\n' setup "$SETUP_TIMEOUT_S"
  total=0
  for i in "${!NAMES[@]}"; do
    cmd="${CMDS[$i]//@BUDGET@/$(engine_budget "${TIMEOUTS[$i]}")}"
    printf '  %-18s timeout %4ss  %s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "$cmd"
    total=$((total + TIMEOUTS[i]))
  done
  echo "  (step timeouts add up to ${total} s; each is capped by what is left of the ${BUDGET_S} s budget)"
  if [ "$total" -gt 420 ] || [ "$BUDGET_S" -gt 415 ]; then bad "a time plan within 7 minutes (timeouts ${total} s, budget ${BUDGET_S} s)"; fi
  echo "checks:"
  for c in bash timeout date hostname uname nproc sed; do
    if command -v "$c" >/dev/null 2>&1; then ok "command $c"; else bad "command $c"; fi
  done
  if command -v nvidia-smi >/dev/null 2>&1; then ok "command nvidia-smi"
  else echo "  note     nvidia-smi not found (expected on a machine without a GPU; step 1 records its absence)"; fi
  if [ -x "$PY" ]; then ok "python $PY"; else bad "python $PY (bash scripts/setup.sh --cuda creates it)"; fi
  for f in bench/engine.py bench/kernels.py bench/gpu_check.sh tests/test_kernels.py tests/test_engine.py \
           recipes/mnist.py recipes/cifar.py scripts/setup.sh constraints.txt constraints-cuda.txt; do
    if [ -f "$f" ]; then ok "file $f"; else bad "file $f"; fi
  done
  for d in "$QMLHFL_DATA/MNIST/raw" "$QMLHFL_DATA/cifar-10-batches-py"; do
    if [ -d "$d" ]; then ok "data $d"; else bad "data $d (set QMLHFL_DATA)"; fi
  done
  if bash -n scripts/setup.sh && bash scripts/setup.sh --help > "$CHECK/setup_help.log" 2>&1; then
    ok "scripts/setup.sh parses (--help)"
  else bad "scripts/setup.sh parses (--help; see $CHECK/setup_help.log)"; fi
  if [ ! -x "$PY" ]; then
    echo "bench/gpu_check.sh --dry-run: FAILED (no python at $PY)"
    exit 1
  fi
  # constraints-cuda.txt: the pins of constraints.txt apart from torch/triton, plus CUDA (nvidia-*/cuda-*) extras
  if "$PY" - > "$CHECK/constraints.log" 2>&1 <<'EOF'
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

  # The python entry points, with the very arguments of the run, side by side (each ~2-12 s).
  cat > "$CHECK/kernels_options.py" <<'EOF'
"""Parse bench/kernels.py's options exactly as the three kernels_* steps pass them (argv: the common options)."""
import sys

sys.path.insert(0, "bench")
import kernels  # noqa: E402

for extra in ([], ["--dtype", "bfloat16"], ["--bucket", "512"]):
    print(kernels.parse_args(sys.argv[1:] + extra))
EOF
  CHECK_NAMES=(versions tests_collect kernels_options engine_options main_job_config cifar_job_config)
  CHECK_CMDS=(
    "bash bench/gpu_check.sh --versions"
    "TRITON_INTERPRET=0 $Q_PY -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py"
    "$Q_PY $(printf %q "$CHECK/kernels_options.py") $KERNEL_ARGS && $Q_PY bench/kernels.py --help > /dev/null"
    "$Q_PY bench/engine.py ${ENGINE_ARGS//@BUDGET@/75} --dry-run"
    "$Q_PY -m recipes.mnist --cfg job $MNIST_ARGS"
    "$Q_PY -m recipes.cifar --cfg job $CIFAR_ARGS"
  )
  PIDS=()
  for i in "${!CHECK_NAMES[@]}"; do
    OUT="$OUT" timeout -k 2 120 bash -c "${CHECK_CMDS[$i]}" > "$CHECK/${CHECK_NAMES[$i]}.log" 2>&1 &
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
STEPS="$OUT/steps.tsv"
printf 'step\texit_code\tseconds\ttimeout_s\tlog\tcommand\n' > "$STEPS"
: > "$OUT/wall_times.txt"
FAILED=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME TIMEOUT_S COMMAND: run COMMAND under `timeout`, log it, record its exit code and wall time
run_step() {
  local name="$1" limit="$2" cmd="$3" log="$OUT/$1.log" t0 t1 rc secs
  if [ -n "${T0:-}" ]; then
    cmd="${cmd//@BUDGET@/$(engine_budget "$limit")}"  # nominal, for the record if skipped
    local left=$((BUDGET_S - (SECONDS - T0)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
      printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$log" "$cmd" >> "$STEPS"
      echo "== $name: skipped (no time left of the ${BUDGET_S} s budget)"
      FAILED=1
      return
    fi
  fi
  cmd="${3//@BUDGET@/$(engine_budget "$limit")}"
  echo "== $name (timeout ${limit} s): $cmd"
  t0=$(now)
  OUT="$OUT" timeout -k 2 "$limit" bash -c "$cmd" > "$log" 2>&1
  rc=$?
  t1=$(now)
  secs=$(elapsed "$t0" "$t1")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$log" "$cmd" >> "$STEPS"
  echo "   exit $rc after $secs s ($( [ "$rc" = 124 ] && echo "timed out; " )log: $log)"
  [ "$rc" = 0 ] || FAILED=1
  LAST_SECS=$secs
  LAST_RC=$rc
}

echo "bench/gpu_check.sh: OUT=$OUT, QMLHFL_DATA=$QMLHFL_DATA, budget ${BUDGET_S} s"
if [ "$SETUP" = 1 ]; then
  run_step setup "$SETUP_TIMEOUT_S" "bash scripts/setup.sh --cuda"
fi
T0=$SECONDS
for i in "${!NAMES[@]}"; do
  LAST_SECS=""
  LAST_RC=""
  run_step "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${CMDS[$i]}"
  case "${NAMES[$i]}" in
    main_job|cifar_job)
      if [ -n "$LAST_SECS" ]; then
        echo "${NAMES[$i]}: ${LAST_SECS} s wall clock, exit ${LAST_RC}: ${CMDS[$i]}" >> "$OUT/wall_times.txt"
      else
        echo "${NAMES[$i]}: not run (no time left): ${CMDS[$i]}" >> "$OUT/wall_times.txt"
      fi ;;
  esac
done
echo "== done in $((SECONDS - T0)) s (steps after any --setup); $STEPS:"
column -t -s $'\t' "$STEPS" 2>/dev/null | cut -c1-160 || cat "$STEPS"
cat "$OUT/wall_times.txt"
exit "$FAILED"
