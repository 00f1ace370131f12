#!/usr/bin/env python3
"""Distributed decode of two moepool binaries, alternating, on one machine.

For each of ROUNDS rounds and each binary (A first, then B; the order flips every round), starts
two `moepool worker` processes of that binary (experts 0-3 and 4-7) and runs `moepool bench
--workers ... --json` with the same binary. Prints per run, and the medians per binary: decode
tokens/s, the per-layer round trip p50 and the dispatch overhead p50 and p99 (round trip less
the worker's compute). Used for the architecture change of issue 18 (docs/architecture.md):
the baseline binary is a build of the commit before it.

  bench/dispatch_ab.py --a OLD_BINARY --b NEW_BINARY --model MODEL [--rounds 5]
                       [--threads 1] [--worker-threads 1] [--decode 32] [--sequences 1]
                       [--micro-batches 1]
"""
import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def start_worker(binary, model, experts, threads, log):
    p = subprocess.Popen(
        [binary, "worker", "--model", model, "--experts", experts, "--listen", "127.0.0.1:0",
         "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline().strip()
    m = re.search(r":(\d+)$", line)
    if not m:
        p.kill()
        raise RuntimeError(f"worker did not print its address: {line!r}")
    return p, f"127.0.0.1:{m.group(1)}"


def cpu_name():
    """The CPU's model name from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


@contextlib.contextmanager
def workers(binary, model, expert_ranges, threads, log):
    """Starts one `moepool worker` per expert range; yields their addresses; stops them."""
    procs = []
    try:
        addresses = []
        for experts in expert_ranges:
            p, address = start_worker(binary, model, experts, threads, log)
            procs.append(p)
            addresses.append(address)
        yield addresses
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def run_once(binary, args, log):
    with workers(binary, args.model, ("0-3", "4-7"), args.worker_threads, log) as addresses:
        out = subprocess.run(
            [binary, "bench", "--model", args.model, "--threads", str(args.threads),
             "--workers", ",".join(addresses), "--decode-tokens", str(args.decode),
             "--prompt-tokens", "16", "--pings", "200",
             "--sequences", str(args.sequences), "--micro-batches", str(args.micro_batches),
             "--json"],
            check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    c = j["cluster"]
    return {
        "decode_tokens_per_s": j["decode_tokens_per_s"],
        "round_trip_p50_us": c["decode_round_trip_us"]["p50"],
        "overhead_p50_us": c["decode_dispatch_overhead_us"]["p50"],
        "overhead_p99_us": c["decode_dispatch_overhead_us"]["p99"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="baseline binary")
    ap.add_argument("--b", required=True, help="binary under test")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=1)
    args = ap.parse_args()
    env = os.environ
    env.setdefault("MOEPOOL_CLUSTER_TOKEN", "dispatch-ab")
    cpu = cpu_name()
    print(f"# {cpu}, {os.cpu_count()} CPUs; model {args.model}; {args.rounds} rounds, "
          f"coordinator threads {args.threads}, worker threads {args.worker_threads}, "
          f"{args.sequences} sequence(s) x {args.decode} decode tokens, "
          f"{args.micro_batches} micro-batch(es)")
    results = {"A": [], "B": []}
    with tempfile.NamedTemporaryFile("w", prefix="dispatch_ab_", suffix=".log", delete=False) as log:
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for name in order:
                binary = args.a if name == "A" else args.b
                t0 = time.time()
                res = run_once(binary, args, log)
                results[name].append(res)
                print(f"round {r} {name}: decode {res['decode_tokens_per_s']:.2f} tok/s, "
                      f"round trip p50 {res['round_trip_p50_us']:.0f} us, overhead p50 "
                      f"{res['overhead_p50_us']:.0f} us p99 {res['overhead_p99_us']:.0f} us "
                      f"({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for name in ("A", "B"):
        runs = results[name]
        summary[name] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        summary[name]["spread_decode"] = (max(x["decode_tokens_per_s"] for x in runs) -
                                          min(x["decode_tokens_per_s"] for x in runs))
        summary[name]["spread_overhead_p50"] = (max(x["overhead_p50_us"] for x in runs) -
                                                min(x["overhead_p50_us"] for x in runs))
    a, b = summary["A"], summary["B"]
    print(json.dumps({"cpu": cpu, "runs": results, "median": summary,
                      "b_over_a_decode": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
                      "b_over_a_overhead_p50": b["overhead_p50_us"] / a["overhead_p50_us"]},
                     indent=1))


if __name__ == "__main__":
    sys.exit(main())
