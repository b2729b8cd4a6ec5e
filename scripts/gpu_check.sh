#!/usr/bin/env bash
# The GPU check kit: every CUDA path of torchmagic run on a real GPU, in one command.
#
# On the GPU machine (Python 3.12 with a CUDA torch, pytest, psutil, numpy; no IPython, traitlets,
# ipywidgets, torchinfo; no network) it:
#   1. installs the carried wheels (gpu-wheels/, made here by scripts/gpu_wheels.sh) with
#      `pip install --no-index --no-deps --target <tmp>`: the machine's torch is never touched;
#      torchmagic itself comes from this working tree (PYTHONPATH);
#   2. checks the install plan against what the machine has (versions of what the wheels need);
#   3. runs the whole test suite with CUDA present (tests whose packages are missing there, e.g.
#      notebooks and the browser, skip with the reason), JUnit XML included;
#   4. runs the GPU tour (examples/gpu_tour.ipy: every magic on a model on cuda:0, terminal IPython);
#   5. writes figures.json: GPU, torch, pass/fail/skip counts, failures, the figures each CUDA test
#      measured, the tour's result, and every torch name torchmagic's source uses resolved against
#      the machine's torch (an older one: 2.11 when this was written), missing ones with file:line.
# Each step has its own time limit; the whole run stays under 9 minutes (typically 2-4).
#
# The one call, from the lead's session (device tool `run`; the wheels travel with `carry`):
#     run(command="bash scripts/gpu_check.sh --out $OUT", carry=["gpu-wheels"], timeout_s=600)
# First, here:  bash scripts/gpu_wheels.sh   (downloads ~10 MB into gpu-wheels/, ignored by git)
# Results come back from $OUT (6 files): gpu_check.log, pytest.log, junit.xml, tour.txt,
# figures.json and memory_snapshot.pickle (the tour's --snapshot, for pytorch.org/memory_viz).
#
# Here, on the CPU machine:  bash scripts/gpu_check.sh --dry-run [--out DIR]
#   does the same without a GPU: a stand-in for the GPU machine (a fresh venv holding only the
#   packages that machine has, linked from .venv: torch, pytest, psutil, numpy...), the same wheels
#   installed into a temp target (or, when gpu-wheels/ is empty, .venv's copies of the pinned
#   versions linked in its place), the whole suite collected, a small part of it run, the tour on
#   CPU (its CUDA-only cells skipped) and figures.json. tests/test_gpu_kit.py runs it.
#
# Options: --out DIR (default $OUT, else gpu-check-out/), --wheels DIR (default gpu-wheels/),
#          --python PY (default python3; --dry-run: the stand-in venv), --tests "ARGS" (pytest
#          arguments instead of the default selection), --dry-run.
# Exit status 0 only when the suite and the tour pass (the figures are written either way).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1

DRY=0; OUTDIR="${OUT:-}"; WHEELS="gpu-wheels"; PY="${PYTHON:-python3}"; TESTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --tests) TESTS="$2"; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-$ROOT/gpu-check-out}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
MODE=$([ $DRY = 1 ] && echo dry-run || echo gpu)
# Budgets in seconds (whole run < 9 min); --dry-run runs a small part, so it needs less.
T_INSTALL=60; T_TESTS=290; T_TOUR=120; T_REPORT=60
if [ $DRY = 1 ]; then T_TESTS=240; T_TOUR=180; fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUTDIR/gpu_check.log"
rm -f "$OUTDIR"/{gpu_check.log,pytest.log,junit.xml,tour.txt,figures.json,memory_snapshot.pickle,.plan.json}
: > "$LOG"
say() { echo "[gpu_check] $*" | tee -a "$LOG"; }
now() { date +%s%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
limit() {  # limit SECONDS CMD...: stop CMD with SIGINT (pytest writes its reports), then KILL
  local t="$1"; shift
  if command -v timeout >/dev/null 2>&1; then timeout -s INT -k 20 "$t" "$@"; else "$@"; fi
}
PHASES=(); RCS=()
START=$(now)
say "mode $MODE, results in $OUTDIR, started $(date '+%Y-%m-%d %H:%M:%S')"

# -- the Python that plays the GPU machine --------------------------------------------------------
HOST_PY="${GPU_CHECK_HOST_PYTHON:-}"
if [ -z "$HOST_PY" ]; then
  if [ -x .venv/bin/python ]; then HOST_PY=.venv/bin/python; else HOST_PY=python3; fi
fi
if [ $DRY = 1 ]; then
  t=$(now)
  if ! "$HOST_PY" scripts/gpu_kit.py bare-python "$WORK/bare" > "$WORK/bare.json" 2>>"$LOG"; then
    say "FAILED: could not build the stand-in Python (see $LOG)"; exit 1
  fi
  PY="$WORK/bare/bin/python"
  if "$PY" -c "import IPython" 2>/dev/null; then
    say "FAILED: the stand-in Python already has IPython: it would not test the install"; exit 1
  fi
  say "stand-in for the GPU machine: $PY ($(grep -c '==' "$WORK/bare.json") packages linked from $HOST_PY; no IPython, traitlets, ipywidgets, torchinfo)"
  PHASES+=("standin=$(since "$t")")
fi
"$PY" -c "import sys, torch, pytest; print('[gpu_check] python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none', '| pytest', pytest.__version__)" 2>&1 | tee -a "$LOG"
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "WARNING: torch sees no CUDA device here: the CUDA tests will skip (use --dry-run on a CPU machine)"
fi

# -- 1. install the carried wheels into a temp target -------------------------------------------------
t=$(now)
SITE="$WORK/site"
mkdir -p "$SITE"
shopt -s nullglob
whls=("$WHEELS"/*.whl)
if [ ${#whls[@]} -gt 0 ]; then
  say "installing ${#whls[@]} wheels from $WHEELS into $SITE (--no-index --no-deps; the machine's packages untouched)"
  if ! limit $T_INSTALL "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target "$SITE" "${whls[@]}" >>"$LOG" 2>&1; then
    say "FAILED: pip install of the wheels (see $LOG)"; exit 1
  fi
  "$PY" scripts/gpu_kit.py plan --wheels "$WHEELS" --machine --json "$OUTDIR/.plan.json" >/dev/null 2>>"$LOG"
  PLAN_RC=$?
elif [ $DRY = 1 ]; then
  say "no wheels in $WHEELS (bash scripts/gpu_wheels.sh downloads them): linking .venv's copies of the pinned versions instead of pip"
  if ! "$HOST_PY" scripts/gpu_kit.py link-carried "$SITE" --json "$OUTDIR/.plan.json" >>"$LOG" 2>&1; then
    say "FAILED: $HOST_PY lacks a package pinned in scripts/gpu_wheels.txt (see $LOG)"; exit 1
  fi
  PLAN_RC=0
else
  say "FAILED: no wheels in $WHEELS: run 'bash scripts/gpu_wheels.sh' where pip has the index, and carry gpu-wheels"
  exit 1
fi
shopt -u nullglob
PHASES+=("install=$(since "$t")")
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHMAGIC_GPU_CHECK=1 GPU_CHECK_OUT="$OUTDIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -f "$OUTDIR/.plan.json" ]; then
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); [print('[gpu_check] plan:', k, m) for k in ('problems','warnings') for m in r[k]]" "$OUTDIR/.plan.json" | tee -a "$LOG"
fi
if ! "$PY" -c "import IPython, traitlets, ipywidgets, torchinfo, torchmagic; from IPython.terminal.interactiveshell import TerminalInteractiveShell; import torchmagic.magics.summary" >>"$LOG" 2>&1; then
  say "FAILED: IPython / ipywidgets / torchinfo / torchmagic do not import after the install (see $LOG)"; exit 1
fi
say "imports ok: IPython $("$PY" -c 'import IPython; print(IPython.__version__)'), torchmagic from $ROOT"

# -- 2. the test suite ----------------------------------------------------------------------------
t=$(now)
PYTEST_ARGS=(-p no:cacheprovider -q -rfEs --junitxml="$OUTDIR/junit.xml" --durations=15)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=150); fi
if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2206
  SELECT=($TESTS)
elif [ $DRY = 1 ]; then
  say "collecting the whole suite (every file must import or skip with a reason)"
  limit 120 "$PY" -m pytest -p no:cacheprovider -q -rs --collect-only tests > "$WORK/collect.txt" 2>&1
  rc=$?
  grep -E "^(SKIPPED|ERROR)|collected|Interrupted" "$WORK/collect.txt" | tail -n 12 | tee -a "$LOG"
  RCS+=("collect=$rc")
  if [ $rc -ne 0 ]; then cat "$WORK/collect.txt" >> "$LOG"; say "FAILED: the suite does not collect"; fi
  SELECT=(tests/test_params.py)
  for f in tests/test_cuda_*.py; do SELECT+=("$f"); done
else
  SELECT=(tests)
fi
say "pytest ${SELECT[*]} (limit ${T_TESTS} s)"
limit $T_TESTS "$PY" -m pytest "${PYTEST_ARGS[@]}" "${SELECT[@]}" 2>&1 | tee "$OUTDIR/pytest.log" | tail -n 40 | tee -a "$LOG"
TEST_RC=${PIPESTATUS[0]}
RCS+=("pytest=$TEST_RC")
PHASES+=("tests=$(since "$t")")

# -- 3. the GPU tour ------------------------------------------------------------------------------
t=$(now)
say "GPU tour: examples/gpu_tour.ipy (limit ${T_TOUR} s)"
limit $T_TOUR "$PY" scripts/gpu_kit.py tour examples/gpu_tour.ipy > "$OUTDIR/tour.txt" 2>&1
TOUR_RC=$?
tail -n 3 "$OUTDIR/tour.txt" | tee -a "$LOG"
RCS+=("tour=$TOUR_RC")
PHASES+=("tour=$(since "$t")")

# -- 4. the figures (and the torch names torchmagic uses, checked against this torch) -------------------------------------------------------------------------------
PHASES+=("total=$(since "$START")")
args=(--out "$OUTDIR/figures.json" --mode "$MODE" --junit "$OUTDIR/junit.xml" --tour "$OUTDIR/tour.txt"
      --audit-source torchmagic)
[ -f "$OUTDIR/.plan.json" ] && args+=(--plan "$OUTDIR/.plan.json")
for p in "${PHASES[@]}"; do args+=(--phase "$p"); done
for r in "${RCS[@]}"; do args+=(--rc "$r"); done
limit $T_REPORT "$PY" scripts/gpu_kit.py report "${args[@]}" 2>&1 | tee -a "$LOG"
rm -f "$OUTDIR/.plan.json"  # merged into figures.json (at most 8 files come back)

status=0
for r in "${RCS[@]}"; do [ "${r#*=}" = 0 ] || status=1; done
[ "$PLAN_RC" = 0 ] || say "note: the install plan has problems (figures.json: plan.problems)"
say "done in $(since "$START") s: $([ $status = 0 ] && echo OK || echo 'FAILURES (see above)'); files in $OUTDIR: $(find "$OUTDIR" -maxdepth 1 -type f -printf '%f ')"
exit $status
