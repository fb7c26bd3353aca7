#!/usr/bin/env bash
# The checklist for a lent GPU: one command, well inside a 10-minute run, most valuable
# step first, each with its own time budget so that a slow step cannot eat the rest:
#
#   0. setup: install carried wheels (open_clip, Inf-CL), name the card and the versions
#   1. palmtree verify on the card: every backend and precision against float64
#   2. the tests marked gpu (the fused kernels at training sizes)
#   3. the benchmark at B = 32768 and 65536: fused, chunked, open_clip, Inf-CL, then the
#      reference on its own (O(B^2) memory)
#   4. chunked+compile (chunked's loss under torch.compile) at the same two sizes, bf16
#      operands (fp32 results), beside chunked and open_clip in bf16
#   5. B = 131072 (fused, chunked, open_clip, Inf-CL; fewer repeats), then one global
#      batch of 1,048,576 pairs (fused, bf16)
#
# Everything to keep lands in $OUT, five files: summary.md (short, for the notes), log.txt
# (every step's output), and the benchmark's <name>.csv/.md/.png, named after the card
# (cuda-nvidia-h200). Peers that are not installed or cannot run, and cases that run out of
# memory, are rows of the CSV (status skip/oom), not failures.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (DEVELOPERS.md: how)
#   SMOKE=1 bash benchmarks/gpu_check.sh      # dry run on a CPU at tiny sizes (CI runs it)
#
# Environment: OUT (default runs/gpu-check), PY (python3), WHEELS (default .whl: wheels
# installed first into a private folder; `make gpu-wheels` fetches open_clip's and
# Inf-CL's), TOTAL_BUDGET (seconds for all steps, default 540). Exit status 0 when every
# step passed and no benchmark case of palmtree's raised, else 1 (the summary says what).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check}
WHEELS=${WHEELS:-.whl}
TOTAL=${TOTAL_BUDGET:-540}
RESERVE=15 # seconds kept for the summary
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
# src first; the carried wheels are installed into $STATE/site by the setup step.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}:$STATE/site"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
START=$SECONDS

if [ -n "${SMOKE:-}" ]; then
    # The same commands at tiny sizes; the fused kernels run in Triton's interpreter.
    # verify checks fused on CUDA only: the test suite covers it in the interpreter.
    export TRITON_INTERPRET=1
    VERIFY=("$PY" -m palmtree verify --nproc 1 --batch 120 --dim 24
        --backends reference,chunked)
    BENCH=("$PY" -m palmtree bench --device cpu --dims 32 --isolate none --repeats 1 --warmup 0)
    SIZES=(64 128 192 256) # stand-ins for 32768 65536 131072 1048576
    COMPILED_SIZES=(64)    # one compilation only: Inductor builds C++ here, tens of seconds
else
    # --targets none: the labels and negatives rows' float64 truths at 20011 pairs would
    # not fit the step's 120 s; those rows run at verify's default size in CI.
    VERIFY=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m palmtree verify
        --batch 20011 --dim 512 --backends reference,chunked,fused --losses clip,siglip
        --targets none)
    BENCH=("$PY" -m palmtree bench --device cuda --dims 512)
    SIZES=(32768 65536 131072 1048576)
    COMPILED_SIZES=("${SIZES[0]}" "${SIZES[1]}")
fi
PEERS=(--peers open_clip inf_cl)
# The gpu tests compile many kernel variants: with pytest-xdist, in 4 processes.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)

# step NAME BUDGET COMMAND...: runs COMMAND (its own process group, killed with it) for
# at most BUDGET seconds, fewer when the total budget runs short; appends its output to
# the log and records "name, budget, seconds taken, result" for the summary.
step() {
    local name=$1 budget=$2 left rc t0 result=ok
    shift 2
    left=$((TOTAL - RESERVE - (SECONDS - START)))
    ((budget > left)) && budget=$left
    printf '\n== %s (budget %s s): %s\n' "$name" "$budget" "$*" | tee -a "$LOG"
    if ((budget < 10)); then
        printf '%s\t%s\t0\tnot run: no time left\n' "$name" "$budget" >>"$STATE/steps.tsv"
        return 1
    fi
    t0=$SECONDS
    timeout -k 10 "$budget" "$@" 2>&1 | tee -a "$LOG" "$STATE/$name.log"
    rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && result="timeout"
    ((rc != 0 && rc != 124 && rc != 137)) && result="failed (exit $rc)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$((SECONDS - t0))" "$result" >>"$STATE/steps.tsv"
    [ "$result" = ok ]
}

status=0
step setup 60 "$PY" - "$WHEELS" "$STATE/site" <<'EOF' || status=1
import glob, importlib.metadata as md, platform, shutil, subprocess, sys

wheels = sorted(glob.glob(f"{sys.argv[1]}/*.whl"))
if wheels:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--no-cache-dir", "--target", sys.argv[2], *wheels]
    subprocess.run(pip, check=True)
if shutil.which("nvidia-smi"):
    query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    subprocess.run(["nvidia-smi", *query])
import torch

card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU dry run)"
print(f"card: {card} | python {platform.python_version()} | torch {torch.__version__}"
      f" | CUDA {torch.version.cuda}")
for name in ("triton", "numpy", "open-clip-torch", "inf-cl"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
step verify 130 "${VERIFY[@]}" --timeout 120 || status=1
step gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${XDIST[@]}" tests ||
    status=1
t3=$SECONDS # step 3 shares 130 s, smaller B first
for b in "${SIZES[0]}" "${SIZES[1]}"; do
    step "bench-$b" $((130 - (SECONDS - t3))) "${BENCH[@]}" --batch-sizes "$b" \
        --backends fused chunked "${PEERS[@]}" --no-plot --out "$OUT" || status=1
    step "bench-$b-reference" $((130 - (SECONDS - t3))) "${BENCH[@]}" --batch-sizes "$b" \
        --backends reference --peers --no-plot --out "$OUT" || status=1
done
# Compiled once per shape before timing (the compile time is in each row's note), bf16
# only: the goal is against open_clip's bf16-autocast ClipLoss, timed again here beside it
# with chunked in eager mode, so that the three are compared within one run.
step bench-compile 100 "${BENCH[@]}" --batch-sizes "${COMPILED_SIZES[@]}" --precisions bf16 \
    --backends chunked+compile chunked --peers open_clip --no-plot --out "$OUT" || status=1
step "bench-${SIZES[2]}" 80 "${BENCH[@]}" --batch-sizes "${SIZES[2]}" --repeats 3 --warmup 1 \
    --backends fused chunked "${PEERS[@]}" --no-plot --out "$OUT" || status=1
step "bench-${SIZES[3]}" 150 "${BENCH[@]}" --batch-sizes "${SIZES[3]}" --backends fused \
    --precisions bf16 --peers --no-check --repeats 1 --warmup 1 --no-plot --out "$OUT" ||
    status=1

# The summary; the benchmark's table and plot redrawn from every row of its CSV.
"$PY" - "$OUT" "$STATE" "$((SECONDS - START))" "$status" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, sys
from pathlib import Path

from palmtree.bench import FIELDS, markdown_table, plot
from palmtree.bench.compiled import COMPILED, NOTE_START
from palmtree.bench.report import target_summary

out, state, took, status = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = [line.split("\t") for line in (state / "steps.tsv").read_text().splitlines()]


def last_line(name, *marks):
    log = state / f"{name}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    hits = [x.strip() for x in lines if any(m in x for m in marks)]
    return hits[-1] if hits else ""


card = last_line("setup", "card: ").removeprefix("card: ")
lines = ["| step | budget (s) | took (s) | result |", "|---|---:|---:|---|"]
marks = {"verify": ("rows passed", "timed out"), "gpu-tests": (" passed", " failed", " error")}
for name, budget, secs, result in steps:
    extra = last_line(name, *marks.get(name, ("Error", "error")))
    lines.append(f"| {name} | {budget} | {secs} | {result}{': ' + extra if extra else ''} |")

errors = []  # palmtree's cases that raised: a failure; a peer's error is only reported
for path in sorted(out.glob("*.csv")):
    with path.open(newline="") as f:
        latest = {}  # one row per case: the last one measured
        for r in csv.DictReader(f):
            if tuple(r) == FIELDS:
                latest[r["impl"], r["precision"], int(r["batch"]), int(r["dim"])] = r
    rows = list(latest.values())
    if not rows:
        continue
    batches = sorted({int(r["batch"]) for r in rows})
    dims = "/".join(sorted({r["dim"] for r in rows}))
    lines += ["", f"{path.name}: median ms (peak GB) of forward+backward, D={dims}:", ""]
    lines += ["| impl | precision | " + " | ".join(f"B={b}" for b in batches) + " |"]
    lines += ["|---|---|" + "---:|" * len(batches)]
    table = {}
    for r in rows:
        table.setdefault((r["impl"], r["precision"]), {})[int(r["batch"])] = r
    for (impl, precision), per_b in table.items():
        if all(r["status"] == "skip" for r in per_b.values()):
            continue
        cells = [
            ""
            if (r := per_b.get(b)) is None
            else f"{float(r['median_ms']):.4g} ({float(r['peak_mb']) / 1024:.3g})"
            if r["status"] == "ok"
            else r["status"]
            for b in batches
        ]
        lines.append(f"| {impl} | {precision} | " + " | ".join(cells) + " |")
    skipped = sorted({f"{r['impl']} {r['precision']}: {r['note']}" for r in rows
                      if r["status"] == "skip"})
    failed = [r for r in rows if r["status"] not in ("ok", "skip", "oom")]
    lines += [""] + [f"- not run: {s}" for s in skipped]
    lines += [f"- **{r['impl']} {r['precision']} B={r['batch']}: {r['status']}: {r['note']}**"
              for r in failed]
    lines += [f"- {r['impl']} {r['precision']} B={r['batch']}: {part}" for r in rows
              if r["status"] == "ok" for part in r["note"].split("; ")
              if part.startswith(NOTE_START)]
    lines += [f"- {x}" for x in target_summary(rows) if x.startswith(f"{COMPILED} / ")]
    errors += [r for r in failed if r["impl"] in ("fused", "chunked", "reference", COMPILED)]
    head = f"{rows[0]['device']}, torch {rows[0]['torch_version']}, every run of {path.name}"
    ratio_text = "".join(f"\n- {x}" for x in target_summary(rows))
    path.with_suffix(".md").write_text(f"{head}\n\n{markdown_table(rows)}\n{ratio_text}\n")
    plot(rows, path.with_suffix(".png"))

passed = status == "0" and not errors
verdict = "all passed." if passed else "**not all passed**."
lines = [f"### GPU check: {card}", "", f"{len(steps)} steps in {took} s: {verdict}", ""] + lines
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print("\nfiles in", out, ":", ", ".join(sorted(p.name for p in out.iterdir())))
sys.exit(0 if passed else 1)
EOF
((PIPESTATUS[0] == 0)) || status=1
exit $status
