#!/usr/bin/env bash
# Side-by-side CPU speed, alternating runs in one script (docs/engine.md, "CPU kernels"):
#   this build's `moepool bench` on each kernel path it can run (MOEPOOL_CPU_KERNELS),
#   optionally a baseline moepool binary (BASELINE=path, e.g. the previous commit's build), and
#   optionally the reference's llama-bench (REF_BENCH=path, built outside this repository).
# Usage: bench/cpu_kernels_ab.sh ROUNDS MODEL.gguf [MODEL.gguf ...]
# Env: MOEPOOL (default build/cli/moepool), THREADS (2), PROMPT (512), DECODE (128),
#      PATHS (default "avx512 avx2"), BASELINE_PATHS (default "avx512 avx2").
# Prints one line per run: model, binary, path, prompt tokens/s, decode tokens/s.
set -euo pipefail
rounds=${1:?rounds}
shift
moepool=${MOEPOOL:-build/cli/moepool}
threads=${THREADS:-2}
prompt=${PROMPT:-512}
decode=${DECODE:-128}
paths=${PATHS:-"avx512 avx2"}
baseline_paths=${BASELINE_PATHS:-"avx512 avx2"}

vnni=$(grep -q -w avx512_vnni /proc/cpuinfo && echo avx512_vnni || echo "no avx512_vnni")
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $vnni," \
  "$(nproc) cores, $threads threads"

run_moepool() {  # binary label path model
  local out
  out=$(MOEPOOL_CPU_KERNELS=$3 "$1" bench --model "$4" --threads "$threads" \
    --prompt-tokens "$prompt" --decode-tokens "$decode" --json 2>/dev/null)
  python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], sys.argv[4],
"%.1f" % j["prompt_tokens_per_s"], "%.1f" % j["decode_tokens_per_s"])' "$out" "$(basename "$4")" "$2" "$3"
}

run_reference() {  # model
  local csv
  csv=$("$REF_BENCH" -m "$1" -t "$threads" -p "$prompt" -n "$decode" -r 1 -o csv 2>/dev/null)
  python3 -c 'import csv,io,sys
rows=list(csv.DictReader(io.StringIO(sys.argv[1])))
pp=[r["avg_ts"] for r in rows if int(r["n_prompt"])>0]; tg=[r["avg_ts"] for r in rows if int(r["n_gen"])>0]
print(sys.argv[2], "reference", "-", "%.1f" % float(pp[0]), "%.1f" % float(tg[0]))' "$csv" "$(basename "$1")"
}

for ((round = 1; round <= rounds; ++round)); do
  for model in "$@"; do
    for p in $paths; do run_moepool "$moepool" new "$p" "$model"; done
    if [[ -n ${BASELINE:-} ]]; then
      for p in $baseline_paths; do run_moepool "$BASELINE" baseline "$p" "$model"; done
    fi
    if [[ -n ${REF_BENCH:-} ]]; then run_reference "$model"; fi
  done
done
