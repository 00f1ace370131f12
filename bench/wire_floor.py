#!/usr/bin/env python3
"""Per-layer dispatch overhead against the TCP floor, and distributed decode against local, on
one machine (issue 20, part 2).

For each of ROUNDS rounds, in an order that rotates every round, runs:
  local                  `moepool bench --threads T` with every expert in the process;
  one run per setting    two `moepool worker --threads W` processes (experts 0-3 and 4-7; with
                         --one-worker a single one holding all eight) and
                         `moepool bench --threads T --workers ... --json` with that setting's
                         flags (default settings: tcp f32, tcp q8_0, grpc f32).
Each distributed run reports the dispatch overhead of its decode exchanges (round trip minus
the worker's compute) and a raw TCP ping-pong of the same request size measured by the same
command (`bench --pings`). Prints per run, then the medians per setting and the ratios the issue
asks for: overhead p50 / ping p50, overhead p99 / ping p99, decode / local decode.

  bench/wire_floor.py --model MODEL [--binary build/cli/moepool] [--rounds 5] [--threads 1]
                      [--worker-threads 1] [--decode 64] [--one-worker]
                      [--setting "tcp-f32=--transport tcp" --setting ...]
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dispatch_ab import cpu_name, workers  # noqa: E402

DEFAULT_SETTINGS = [
    "tcp-f32=--transport tcp --wire-dtype f32",
    "tcp-q8_0=--transport tcp --wire-dtype q8_0",
    "grpc-f32=--transport grpc --wire-dtype f32",
]


def bench(args, extra):
    cmd = [args.binary, "bench", "--model", args.model, "--threads", str(args.threads),
           "--prompt-tokens", "16", "--decode-tokens", str(args.decode), "--json"] + extra
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_local(args):
    return {"decode_tokens_per_s": bench(args, [])["decode_tokens_per_s"]}


def run_cluster(args, flags, log):
    ranges = ("0-7",) if args.one_worker else ("0-3", "4-7")
    with workers(args.binary, args.model, ranges, args.worker_threads, log) as addresses:
        j = bench(args, ["--workers", ",".join(addresses), "--pings", "500",
                         "--local-fallback", "off"] + shlex.split(flags))
    c = j["cluster"]
    return {
        "decode_tokens_per_s": j["decode_tokens_per_s"],
        "overhead_p50_us": c["decode_dispatch_overhead_us"]["p50"],
        "overhead_p99_us": c["decode_dispatch_overhead_us"]["p99"],
        "ping_p50_us": c["tcp_ping_pong_us"]["p50"],
        "ping_p99_us": c["tcp_ping_pong_us"]["p99"],
        "wire_bytes_per_token": c["decode_wire_bytes_per_token"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--one-worker", action="store_true",
                    help="one worker holding every expert instead of two halves")
    ap.add_argument("--setting", action="append",
                    help="NAME=FLAGS for bench (repeatable; default: %s)" % DEFAULT_SETTINGS)
    args = ap.parse_args()
    settings = [s.split("=", 1) for s in (args.setting or DEFAULT_SETTINGS)]
    os.environ.setdefault("MOEPOOL_CLUSTER_TOKEN", "wire-floor")
    cpu = cpu_name()
    print(f"# {cpu}, {os.cpu_count()} CPUs; {args.model}; {args.rounds} rounds; coordinator "
          f"threads {args.threads}, {1 if args.one_worker else 2} worker(s) with "
          f"{args.worker_threads} thread(s); {args.decode} decode tokens", file=sys.stderr)
    names = ["local"] + [name for name, _ in settings]
    runs = {name: [] for name in names}
    with tempfile.NamedTemporaryFile("w", prefix="wire_floor_", suffix=".log", delete=False) as log:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                res = (run_local(args) if name == "local"
                       else run_cluster(args, dict(settings)[name], log))
                runs[name].append(res)
                print(f"round {r} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()),
                      file=sys.stderr, flush=True)
    median = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
              for name, rs in runs.items()}
    local = median["local"]["decode_tokens_per_s"]
    ratios = {}
    for name, _ in settings:
        m = median[name]
        ratios[name] = {
            "overhead_p50_over_ping_p50": m["overhead_p50_us"] / m["ping_p50_us"],
            "overhead_p99_over_ping_p99": m["overhead_p99_us"] / m["ping_p99_us"],
            "overhead_p99_over_ping_p50": m["overhead_p99_us"] / m["ping_p50_us"],
            "decode_over_local": m["decode_tokens_per_s"] / local,
        }
        print(f"{name}: overhead p50 {m['overhead_p50_us']:.0f} us = "
              f"{ratios[name]['overhead_p50_over_ping_p50']:.2f}x ping p50; p99 "
              f"{m['overhead_p99_us']:.0f} us = {ratios[name]['overhead_p99_over_ping_p99']:.2f}x "
              f"ping p99; decode {m['decode_tokens_per_s']:.1f} tok/s = "
              f"{ratios[name]['decode_over_local']:.2f}x local ({local:.1f})", file=sys.stderr)
    print(json.dumps({"cpu": cpu, "cpus": os.cpu_count(), "settings": dict(settings),
                      "workers": 1 if args.one_worker else 2,
                      "runs": runs, "median": median, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
