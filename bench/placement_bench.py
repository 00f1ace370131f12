#!/usr/bin/env python3
"""Placement that follows routing, measured: the balanced split of `moepool plan` against the
split `moepool plan --stats` makes from routing statistics, on two workers behind
`moepool_slowlink` proxies (a 1 GbE link: 1000 Mbit/s, 100 us each way), alternating rounds
(python3 standard library only).

  bench/placement_bench.py --model mini-skew.gguf [--binary build/cli/moepool]
      [--slowlink build/bench/moepool_slowlink] [--rounds 3] [--streams 1,16]
      [--decode 48] [--warmup-requests 24]

1. Statistics: `moepool serve --routing-stats-file` on the model; warm-up chat requests.
2. Plans: `moepool plan --json` for a coordinator and two 8 GiB workers, without and with
   `--stats`: each worker's (layer, expert) pairs become a placement file.
3. Per round and plan (order rotated): two `moepool worker --placement` processes, each behind
   proxies for its gRPC and data ports on its own loopback address, and `moepool serve
   --workers` through them; chats (other prompts and seeds than the warm-up's, DECODE tokens
   each; max(streams, 4) of them, `streams` at a time).
Prints one JSON object: the plans' predicted co-location, and per plan and stream count the
medians of generated tokens/s, worker exchanges (round trips) and rows sent per processed token
(prompt and generated, from /v1/cluster), with the co-located plan's ratios to the balanced one.
"""
import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from dispatch_ab import cpu_name


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def collect_stats(a, path, log):
    p = subprocess.Popen([a.binary, "serve", "--model", a.model, "--listen", "127.0.0.1:0",
                          "--threads", "2", "--routing-stats-file", path],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    for line in p.stdout:
        if "serving on http://" in line:
            port = int(line.strip().rsplit(":", 1)[1])
            break
    for i in range(a.warmup_requests):
        body = json.dumps({"messages": [{"role": "user", "content": f"Tell me about {i}."}],
                           "max_tokens": 64, "seed": i}).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body), timeout=600).read()
    p.terminate()
    p.wait()


def plan(a, stats):
    cmd = [a.binary, "plan", "--model", a.model, "--coordinator", "8GiB", "--machine", "8GiB",
           "--machine", "8GiB", "--json"]
    if stats:
        cmd += ["--stats", stats]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def placement_files(p, d, name):
    files = []
    for m in p["machines"]:
        if not m["pairs"]:
            continue
        by_layer = {}
        for layer, expert in m["pairs"]:
            by_layer.setdefault(layer, []).append(expert)
        path = os.path.join(d, f"{name}-{m['name']}.placement")
        with open(path, "w") as f:
            for layer, experts in sorted(by_layer.items()):
                f.write(f"layer {layer}: experts {','.join(map(str, experts))}\n")
        files.append(path)
    return files


@contextlib.contextmanager
def cluster(a, files, log):
    procs, addresses = [], []
    try:
        for i, placement in enumerate(files):
            grpc_port, data_port = free_port(), free_port()
            w = subprocess.Popen([a.binary, "worker", "--model", a.model, "--placement", placement,
                                  "--listen", f"127.0.0.1:{grpc_port}", "--data-port",
                                  str(data_port), "--threads", "1", "--preload", "off"],
                                 stdout=subprocess.PIPE, stderr=log, text=True)
            procs.append(w)
            w.stdout.readline()  # "serving ..."
            alias = f"127.0.0.{i + 2}"
            for port in (grpc_port, data_port):
                procs.append(subprocess.Popen(
                    [a.slowlink, "--listen", f"{alias}:{port}", "--target", f"127.0.0.1:{port}",
                     "--delay-us", "100", "--rate-mbit", "1000"], stdout=log, stderr=log))
            addresses.append(f"{alias}:{grpc_port}")
        time.sleep(0.5)
        yield addresses
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def chat(port, i, max_tokens):
    body = json.dumps({"messages": [{"role": "user", "content": f"Write about subject {i}."}],
                       "max_tokens": max_tokens, "seed": 1000 + i, "temperature": 0.8}).encode()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body), timeout=600) as r:
        u = json.loads(r.read())["usage"]
    return u["prompt_tokens"], u["completion_tokens"]


def cluster_counts(port):
    workers = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{port}/v1/cluster", timeout=60).read())["workers"]
    return sum(w.get("requests", 0) for w in workers), sum(w.get("rows", 0) for w in workers)


def bench(a, addresses, streams, log):
    """Chats through `moepool serve --workers` (prompts unlike the warm-up's, other seeds)."""
    p = subprocess.Popen([a.binary, "serve", "--model", a.model, "--listen", "127.0.0.1:0",
                          "--threads", "1", "--workers", ",".join(addresses), "--parallel",
                          str(streams), "--prefix-cache", "off"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        for line in p.stdout:
            if "serving on http://" in line:
                port = int(line.strip().rsplit(":", 1)[1])
                break
        chat(port, 0, 4)  # warm the links
        req0, rows0 = cluster_counts(port)
        n = max(streams, 4)
        t0 = time.monotonic()
        with ThreadPoolExecutor(streams) as pool:
            usage = list(pool.map(lambda i: chat(port, i, a.decode), range(1, n + 1)))
        seconds = time.monotonic() - t0
        req1, rows1 = cluster_counts(port)
    finally:
        p.terminate()
        p.wait()
    generated = sum(c for _, c in usage)
    processed = sum(pt + c for pt, c in usage)
    return {"tokens_per_s": generated / seconds,
            "exchanges_per_token": (req1 - req0) / processed,
            "rows_sent_per_token": (rows1 - rows0) / processed}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--slowlink", default="build/bench/moepool_slowlink")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--warmup-requests", type=int, default=24)
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    with tempfile.TemporaryDirectory() as d, open(os.path.join(d, "log"), "w") as log:
        stats = os.path.join(d, "routing.json")
        collect_stats(a, stats, log)
        plans = {"balanced": plan(a, None), "colocated": plan(a, stats)}
        files = {name: placement_files(p, d, name) for name, p in plans.items()}
        runs = {(name, s): [] for name in plans for s in streams}
        for r in range(a.rounds):
            names = list(plans) if r % 2 == 0 else list(reversed(plans))
            for name in names:
                with cluster(a, files[name], log) as addresses:
                    for s in streams:
                        runs[(name, s)].append(bench(a, addresses, s, log))
        result = {"cpu": cpu_name(), "model": a.model, "rounds": a.rounds,
                  "link": "moepool_slowlink 1000 Mbit/s, 100 us each way",
                  "predicted": plans["colocated"].get("routing"), "measured": {}}
        for s in streams:
            row = {}
            for name in plans:
                rs = runs[(name, s)]
                row[name] = {k: round(statistics.median(x[k] for x in rs), 2) for k in rs[0]}
            row["colocated_vs_balanced"] = {
                k: round(row["colocated"][k] / row["balanced"][k], 3) for k in row["balanced"]}
            result["measured"][f"{s}_streams"] = row
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
