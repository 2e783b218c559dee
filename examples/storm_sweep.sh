#!/usr/bin/env bash
# A researcher's sweep: svm-storm runs cpu-populated at 1 and 2 engines, with
# 4K and largest fault windows, into one JSON (with its context block: version,
# commit, build, CPU, load, date), writes the same runs as CSV, and bench/plot
# draws the charts. Without gnuplot the sweep still runs; the plot step says
# so and the script exits 77 (ctest reports the example as skipped).
#   examples/storm_sweep.sh SVM_STORM OUTDIR
set -euo pipefail
storm=${1:?usage: storm_sweep.sh SVM_STORM OUTDIR}
out=${2:?usage: storm_sweep.sh SVM_STORM OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

"$storm" --scenario cpu-populated --size 1M --seconds 0.2 --quiet \
  --sweep engines=1,2 --sweep window=4k,largest \
  --json "$out/sweep.json" --csv "$out/sweep.csv"

python3 - "$out/sweep.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert len(j["points"]) == 4, "expected 4 sweep points"
for r in j["runs"]:
    assert r["stale_accesses"] == 0 and r["data_errors"] == 0, "a run the oracles do not vouch for"
c = j["context"]
print(f'sweep: {len(j["runs"])} runs, svm {c["svm_version"]} ({c["build_type"]}), {c["cpu_model"]}')
for p, r in zip(j["points"], j["runs"]):
    print(f'  {p["params"]}: {r["pages_per_s"] / 1e6:.2f} M pages/s, mean batch {r["mean_batch"]:.1f}')
PY

if ! command -v gnuplot >/dev/null; then
  echo "storm_sweep: gnuplot is not installed, skipping the plot (apt-get install gnuplot-nox)"
  exit 77
fi
python3 "$here/../bench/plot" "$out/sweep.json" -o "$out"
test -s "$out/sweep-throughput-engines.png"
echo "storm_sweep: plots in $out"
