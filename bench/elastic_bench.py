#!/usr/bin/env python3
"""The elastic cluster measured on one machine: joins through a 1 Gbit/s link.

Starts `moepool serve --cluster-listen` on MODEL and a `moepool_slowlink` proxy in front of its
control port (--rate-mbit, --delay-us), then:
  1. worker A joins through the proxy with an empty cache: time from start to ready, bytes
     fetched, transfer rate (fetch time as the worker reports it) against the link rate, its
     resident memory against its share of the expert bytes;
  2. while a client streams a greedy completion, worker B joins (A hands it half): the time
     between streamed tokens before, during and after the placement change;
  3. B is killed and restarted with its cache: time to ready, bytes fetched (expect 0);
  4. --soak S: 8 streaming clients for S seconds while B is drained, killed and restarted in a
     loop; requests served and failed (the longer form of the chaos test in ctest).
Prints one JSON object.

  bench/elastic_bench.py --binary build/cli/moepool --slowlink build/bench/moepool_slowlink
                         --model /tmp/mini-Q8_0.gguf [--rate-mbit 1000] [--delay-us 100]
                         [--memory 8GiB] [--soak 0]
"""
import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(path, pattern, timeout=600, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                m = re.search(pattern, f.read())
            if m:
                return m
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{pattern!r} not in {path}:\n" + open(path, errors="replace").read()[-3000:])


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stream_times(port, prompt, max_tokens):
    """Streams a greedy completion; returns the arrival time of each token event."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    times, ok = [], False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            ok = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(line)
        times.append(time.time())
    c.close()
    if not ok:
        raise RuntimeError("stream ended without [DONE]")
    return times


class Worker:
    def __init__(self, args, name, control, tmp):
        self.args, self.name, self.control, self.tmp = args, name, control, tmp
        self.cache = os.path.join(tmp, f"cache-{name}")
        self.port = free_port()
        self.proc = None
        self.log = None

    def start(self):
        self.log = os.path.join(self.tmp, f"{self.name}-{time.time():.3f}.log")
        t0 = time.time()
        self.proc = subprocess.Popen(
            [self.args.binary, "worker", "--join", self.control, "--listen",
             f"127.0.0.1:{self.port}", "--cache-dir", self.cache, "--threads", "1",
             "--memory", self.args.memory],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        m = wait_for(self.log, r"fetched ([\d.]+) MiB in ([\d.]+) s", proc=self.proc)
        wait_for(self.log, r"ready as (\S+): serving (\d+) experts \(([\d.]+) MiB\)",
                 proc=self.proc)
        ready = re.search(r"ready as (\S+): serving (\d+) experts \(([\d.]+) MiB\)",
                          open(self.log).read())
        return {"ready_s": round(time.time() - t0, 3),
                "fetched_mib": float(m.group(1)), "fetch_s": float(m.group(2)),
                "experts": int(ready.group(2)), "share_mib": float(ready.group(3)),
                "rss_mib": round(rss_bytes(self.proc.pid) / 2**20, 1)}

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--slowlink", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rate-mbit", type=float, default=1000)
    ap.add_argument("--delay-us", type=int, default=100)
    ap.add_argument("--memory", default="8GiB")
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--soak", type=float, default=0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="elastic-bench-")
    procs = []
    out = {"model": os.path.basename(args.model), "rate_mbit": args.rate_mbit,
           "delay_us": args.delay_us}
    try:
        http_port, control_port, proxy_port = free_port(), free_port(), free_port()
        serve_log = os.path.join(tmp, "serve.log")
        serve = subprocess.Popen(
            [args.binary, "serve", "--model", args.model, "--listen", f"127.0.0.1:{http_port}",
             "--cluster-listen", f"127.0.0.1:{control_port}", "--threads", "1",
             "--parallel", "8"], stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_for(serve_log, "serving on", proc=serve)
        proxy = subprocess.Popen(
            [args.slowlink, "--listen", f"127.0.0.1:{proxy_port}", "--target",
             f"127.0.0.1:{control_port}", "--delay-us", str(args.delay_us), "--rate-mbit",
             str(args.rate_mbit)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proxy)
        time.sleep(0.3)
        control = f"127.0.0.1:{proxy_port}"
        a, b = Worker(args, "a", control, tmp), Worker(args, "b", control, tmp)
        first = a.start()
        procs.append(a.proc)
        link_mib_s = args.rate_mbit * 1e6 / 8 / 2**20
        first["rate_mib_s"] = round(first["fetched_mib"] / max(first["fetch_s"], 1e-9), 1)
        first["share_of_link"] = round(first["rate_mib_s"] / link_mib_s, 3)
        out["join_a"] = first

        # Token times while B joins and A hands it half of its experts.
        result = {}
        streamer = threading.Thread(target=lambda: result.update(
            t=stream_times(http_port, "Once upon a time", args.tokens)))
        streamer.start()
        time.sleep(1.0)
        t_join = time.time()
        out["join_b"] = b.start()
        procs.append(b.proc)
        t_ready = time.time()
        streamer.join()
        times = result["t"]
        gaps = [(times[i], (times[i] - times[i - 1]) * 1e3) for i in range(1, len(times))]
        def gap_stats(sel):
            g = [ms for t, ms in gaps if sel(t)]
            return {"tokens": len(g), "median_ms": round(statistics.median(g), 2) if g else None,
                    "max_ms": round(max(g), 2) if g else None}
        out["token_gap_before_join"] = gap_stats(lambda t: t < t_join)
        out["token_gap_during_join"] = gap_stats(lambda t: t_join <= t <= t_ready + 0.2)
        out["token_gap_after_join"] = gap_stats(lambda t: t > t_ready + 0.2)
        out["rss_a_after_handover_mib"] = round(rss_bytes(a.proc.pid) / 2**20, 1)

        b.kill()
        out["restart_b"] = b.start()
        procs.append(b.proc)

        if args.soak > 0:
            stop = threading.Event()
            counts = {"served": 0, "failed": 0}
            lock = threading.Lock()
            def client():
                while not stop.is_set():
                    try:
                        stream_times(http_port, "The quick brown fox", 16)
                        key = "served"
                    except Exception:
                        key = "failed"
                    with lock:
                        counts[key] += 1
            clients = [threading.Thread(target=client) for _ in range(8)]
            for c in clients:
                c.start()
            end = time.time() + args.soak
            cycles = 0
            while time.time() < end:
                b.kill()
                time.sleep(1)
                b.start()
                time.sleep(1)
                cycles += 1
            stop.set()
            for c in clients:
                c.join()
            out["soak"] = dict(counts, seconds=args.soak, kill_restart_cycles=cycles)
        print(json.dumps(out, indent=1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
