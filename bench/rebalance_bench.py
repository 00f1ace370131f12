#!/usr/bin/env python3
"""The live rebalancer, measured: an elastic cluster (`moepool serve --cluster-listen` and two
`moepool worker --join` processes, each worker's expert and data ports behind `moepool_slowlink`
proxies: 1000 Mbit/s, 100 us each way) before and after `POST /v1/cluster/rebalance`, on one
model per --model (python3 standard library only).

  bench/rebalance_bench.py --model mini-skew1.gguf --model mini-skew0.gguf
      [--binary build/cli/moepool] [--slowlink build/bench/moepool_slowlink] [--rounds 3]
      [--streams 1,16] [--decode 48] [--warmup-requests 24] [--min-gain 0.15]
      [--replicas on|off] [--worker-threads 2,1] [--slow-worker] [--netns]

Per round and model: a fresh cluster (workers with empty caches join: the coordinator's
balanced assignment); warm-up chats fill the routing statistics; chats with other prompts and
seeds (DECODE tokens each, max(streams, 4) of them, `streams` at a time) measure the balanced
placement; the rebalancer plans and moves the experts (make before break, while nothing runs);
the same chats measure the new placement. Per placement and stream count: generated tokens/s,
worker exchanges (round trips) and rows sent per processed token (from /v1/cluster), bytes sent
to workers per processed token (rows out, f32), and the mean scheduler step time (/metrics).
Prints one JSON object with medians over rounds and the after/before ratios, the plans'
predictions and the CPU.

--netns (root): the three-PC layout of bench/three_pc_bench.py instead of loopback aliases: the
coordinator (and this script, re-run inside it) in namespace mp-coord, worker a in mp-w1 and b
in mp-w2, each behind a veth pair; a worker's proxies listen on its veth address (10.77.N.2) and
forward to the worker on its own loopback; workers join the coordinator at 10.77.N.1 with a
cluster token (the control port is then off loopback).
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from dispatch_ab import cpu_name
from placement_bench import chat, free_port


DUTY_CYCLE = """
import os, signal, sys, time
pid = int(sys.argv[1])
try:
    while True:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.005)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
except (ProcessLookupError, KeyboardInterrupt):
    pass
finally:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
"""


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
        return r.read().decode()


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait_for(path, pattern, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{path}: exited\n" + open(path).read()[-2000:])
        m = re.search(pattern, open(path).read())
        if m:
            return m
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no '{pattern}' in {timeout} s")


def counters(port):
    view = json.loads(get(port, "/v1/cluster"))
    metrics = get(port, "/metrics")
    steps = sum(float(v) for v in re.findall(r"^moepool_forward_steps_total\{[^}]*\} (\S+)",
                                             metrics, re.M))
    step_s = float(re.search(r"^moepool_step_seconds_total (\S+)", metrics, re.M).group(1))
    return {"requests": sum(w.get("requests", 0) for w in view["workers"]),
            "rows": sum(w.get("rows", 0) for w in view["workers"]),
            "steps": steps, "step_s": step_s}


def measure(a, port, streams):
    chat(port, 0, 4)
    c0 = counters(port)
    n = max(streams, 4)
    t0 = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        usage = list(pool.map(lambda i: chat(port, i, a.decode), range(1, n + 1)))
    seconds = time.monotonic() - t0
    c1 = counters(port)
    generated = sum(c for _, c in usage)
    processed = sum(p + c for p, c in usage)
    rows = (c1["rows"] - c0["rows"]) / processed
    return {"tokens_per_s": generated / seconds,
            "exchanges_per_token": (c1["requests"] - c0["requests"]) / processed,
            "rows_sent_per_token": rows,
            "step_ms": 1e3 * (c1["step_s"] - c0["step_s"]) / max(c1["steps"] - c0["steps"], 1)}


def one_round(a, model, tmp, log):
    procs, duty = [], []
    try:
        http_port, control_port = free_port(), free_port()
        serve_log = os.path.join(tmp, "serve.log")
        token = os.path.join(tmp, "cluster.token")  # made by serve, read by the workers
        listen = "0.0.0.0" if a.netns else "127.0.0.1"
        serve = subprocess.Popen(
            [a.binary, "serve", "--model", model, "--listen", f"127.0.0.1:{http_port}",
             "--cluster-listen", f"{listen}:{control_port}", "--cluster-token-file", token,
             "--threads", "1", "--parallel", "16", "--prefix-cache", "off", "--rebalance", "off",
             "--rebalance-min-gain", str(a.min_gain), "--rebalance-replicas", a.replicas],
            stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_for(serve_log, "serving on", serve)
        for i, name in enumerate(["a", "b"]):
            # Loopback: an alias address per worker. --netns: the worker's namespace and veth.
            ns = ["ip", "netns", "exec", f"mp-w{i + 1}"] if a.netns else []
            alias = f"10.77.{i + 1}.2" if a.netns else f"127.0.0.{i + 2}"
            coordinator = f"10.77.{i + 1}.1" if a.netns else "127.0.0.1"
            grpc_port, data_port = free_port(), free_port()
            for port in (grpc_port, data_port):
                procs.append(subprocess.Popen(
                    ns + [a.slowlink, "--listen", f"{alias}:{port}", "--target",
                          f"127.0.0.1:{port}", "--delay-us", "100", "--rate-mbit", "1000"],
                    stdout=log, stderr=log))
            wlog = os.path.join(tmp, f"{name}.log")
            w = subprocess.Popen(
                ns + [a.binary, "worker", "--join", f"{coordinator}:{control_port}", "--listen",
                      f"127.0.0.1:{grpc_port}", "--advertise", f"{alias}:{grpc_port}",
                      "--data-port", str(data_port), "--cache-dir",
                      os.path.join(tmp, f"cache-{name}"), "--threads", str(a.worker_threads[i]),
                      "--memory", "8GiB", "--cluster-token-file", token],
                stdout=open(wlog, "w"), stderr=subprocess.STDOUT)
            procs.append(w)
            wait_for(wlog, "ready as", w)
            if a.slow_worker and name == "b":
                # A slower machine: b runs 5 ms of every 10 (SIGSTOP/SIGCONT), so a row that
                # arrives while it is stopped waits. (A busy loop on its CPU does not slow it: the
                # scheduler favours a process that was sleeping.)
                duty.append(subprocess.Popen(["python3", "-c", DUTY_CYCLE, str(w.pid)]))
        time.sleep(0.5)  # the first worker's handover
        for i in range(a.warmup_requests):
            body = {"messages": [{"role": "user", "content": f"Tell me about {i}."}],
                    "max_tokens": 64, "seed": i}
            post(http_port, "/v1/chat/completions", body)
        out = {"before": {s: measure(a, http_port, s) for s in a.streams}}
        t0 = time.monotonic()
        plan = post(http_port, "/v1/cluster/rebalance", {})
        while json.loads(get(http_port, "/v1/cluster"))["placement_changing"]:
            time.sleep(0.05)
        out["change_s"] = time.monotonic() - t0
        out["plan"] = {k: plan[k] for k in ("before", "after", "layers_dealt", "pace_swaps",
                                            "replicas_added", "bytes_to_fetch", "micros_per_row")}
        out["plan"]["moves"] = len(plan["moves"])
        out["after"] = {s: measure(a, http_port, s) for s in a.streams}
        # The plan's bytes per round trip are a row out and a sum back of n_embd f32 values.
        cost = plan["before"]
        n_embd = cost["bytes_per_token"] / (8 * cost["round_trips_per_token"])
        for placement in ("before", "after"):
            for m in out[placement].values():
                m["bytes_out_per_token"] = m["rows_sent_per_token"] * n_embd * 4
        return out
    finally:
        for p in duty:  # first, so no worker stays stopped
            p.kill()
            p.wait()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def run_in_namespaces():
    """Creates the three namespaces, re-runs this script inside mp-coord, removes them."""
    import three_pc_bench as tp
    for ns in tp.NAMESPACES:
        tp.remove_namespace(ns)
    try:
        tp.create_namespaces()
        argv = [os.path.abspath(p) if os.path.exists(p) else p for p in sys.argv[1:]]
        return subprocess.run(["ip", "netns", "exec", "mp-coord", sys.executable,
                               os.path.abspath(__file__), *argv, "--inside-netns"]).returncode
    finally:
        for ns in tp.NAMESPACES:
            tp.remove_namespace(ns)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--slowlink", default="build/bench/moepool_slowlink")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--warmup-requests", type=int, default=24)
    ap.add_argument("--min-gain", type=float, default=0.15)
    ap.add_argument("--replicas", default="off", choices=["on", "off"])
    ap.add_argument("--slow-worker", action="store_true",
                    help="worker b runs 5 ms of every 10 (SIGSTOP/SIGCONT): a slower machine")
    ap.add_argument("--worker-threads", default="1,1",
                    help="threads of workers a and b (2,1: b is the slow worker)")
    ap.add_argument("--netns", action="store_true",
                    help="three network namespaces, as bench/three_pc_bench.py (root)")
    ap.add_argument("--inside-netns", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.netns and not a.inside_netns:
        sys.exit(run_in_namespaces())
    a.streams = [int(s) for s in a.streams.split(",")]
    a.worker_threads = [int(t) for t in a.worker_threads.split(",")]
    result = {"cpu": cpu_name(), "rounds": a.rounds, "replicas": a.replicas,
              "worker_threads": a.worker_threads, "slow_worker": a.slow_worker,
              "link": "moepool_slowlink 1000 Mbit/s, 100 us each way",
              "hosts": "three network namespaces" if a.netns else "loopback", "models": {}}
    with open(os.devnull, "w") as log:
        for model in a.model:
            runs = []
            for _ in range(a.rounds):
                tmp = tempfile.mkdtemp(prefix="rebalance-bench-")
                try:
                    runs.append(one_round(a, model, tmp, log))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            row = {"plan": runs[-1]["plan"],
                   "change_s": round(statistics.median(r["change_s"] for r in runs), 2)}
            for s in a.streams:
                med = {w: {k: round(statistics.median(r[w][s][k] for r in runs), 3)
                           for k in runs[0][w][s]} for w in ("before", "after")}
                med["after_vs_before"] = {k: round(med["after"][k] / med["before"][k], 3)
                                          for k in med["before"] if med["before"][k]}
                row[f"{s}_streams"] = med
            result["models"][os.path.basename(model)] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
