#!/usr/bin/env python3
"""A three-PC cluster on this machine: the coordinator and two workers in three network
namespaces, every worker link through a `moepool_slowlink` proxy (python3 standard library only;
needs root for `ip netns`).

  sudo bench/three_pc_bench.py --model /tmp/mini-Q4_K_M.gguf [--binary build/cli/moepool]
      [--slowlink build/bench/moepool_slowlink] [--threads 1] [--worker-threads 1]
      [--delay-us 100] [--rate-mbit 1000] [--decode-tokens 64] [--streams 1,4,16]
      [--max-tokens 64] [--dtypes f16,q8_0] [--data-port 7002 | --no-data-port]

Layout (stale namespaces of these names are deleted first, with whatever still runs in them; all
of it is removed on exit, also on an error, Ctrl-C or SIGTERM):

  mp-coord  to-w1 10.77.1.1/24 <-veth-> eth0 10.77.1.2/24  mp-w1
            to-w2 10.77.2.1/24 <-veth-> eth0 10.77.2.2/24  mp-w2

In mp-wN: `moepool worker --experts <half> --listen 127.0.0.1:7001 [--data-port 7002]` and one
`moepool_slowlink` per port, listening on the veth address (10.77.N.2:7001 -> 127.0.0.1:7001,
10.77.N.2:7002 -> 127.0.0.1:7002), so the coordinator in mp-coord reaches the workers at
10.77.1.2:7001,10.77.2.2:7001 only through the proxies (--delay-us each way, --rate-mbit per
connection and direction; see bench/slowlink.md for what the proxy itself costs). The first
worker holds the lower half of the experts, the second the upper half (0-3 and 4-7 of 8).
--no-data-port leaves out the worker's --data-port flag and its proxy (binaries without it).

Measured, in mp-coord, for each wire dtype of --dtypes (`--wire-dtype`, with
`--local-fallback off` so that a step can never quietly be computed by the coordinator):
  1. `moepool bench --prompt-tokens 16 --decode-tokens N --json` against the workers: decode
     tokens/s, per-exchange round trip p50, dispatch overhead (round trip - the worker's compute)
     p50/p99, wire bytes per decode token, and the network share of a decode step (below);
  2. bench/serve_bench.py at --streams concurrent streams of --max-tokens tokens: aggregate
     tokens/s, TTFT p50 and the coordinator idle ratio per level.
The same model with every expert in the coordinator (no workers, same --threads), in the same
namespace and the same run, is the baseline; "vs_local" is distributed / local.

Network share of a decode step. `bench --json` reports, for the exchanges of the decode phase
(one per worker per layer that routed a row to it; the prompt and warm-up are excluded), pooled
and per worker: round trip (first request byte written .. last response byte read, on the
coordinator's link thread), the compute time the worker reports, and their difference, each as
p50/p99/sample count (no means, no per-step pairing). A layer sends to both workers at once and
waits for both, so a step costs one round trip per layer, not one per exchange. The script uses

  network_share = n_layer * dispatch_overhead_p50 / step_time,  step_time = 1 / decode_tokens_per_s

i.e. the sum over layers of (round trip - worker compute) of a typical exchange, over the step.
"Network" here is everything between the coordinator's link thread and the worker's compute:
wire, proxy, kernel TCP, gRPC framing, (de)serialization on the worker. It leans low where a
layer waits on two workers (the slower of two is above the median) and where the tail is heavy
(p99 vs p50 is reported beside it). For bounds, each entry also has `coordinator_idle_ratio`
(time the forward thread was blocked on the workers / decode wall time: network plus worker
compute plus thread hand-offs, an upper bound) and `network_share_if_serial` (every exchange's
overhead added as if the two workers were asked one after the other: exchanges per token *
overhead p50 / step time). n_layer comes from `moepool inspect --json`.

Output: one JSON object on stdout (CPU, settings, local baseline, per-dtype results, ratios) and
a table on stderr. A dtype whose runs fail (e.g. one the binary does not know) gets an "error"
entry and the others still run; the exit status is then 1.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NAMESPACES = ("mp-coord", "mp-w1", "mp-w2")
GRPC_PORT = 7001
# (worker namespace, coordinator-side veth, subnet)
LINKS = (("mp-w1", "to-w1", "10.77.1"), ("mp-w2", "to-w2", "10.77.2"))
TOKEN = "three-pc-bench"


def log(msg):
    print(f"three_pc_bench: {msg}", file=sys.stderr, flush=True)


def ip(*argv, check=True):
    r = subprocess.run(["ip", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {r.stderr.strip()}")
    return r


def namespace_exists(ns):
    r = ip("netns", "list", check=False)
    return any(line.split()[0] == ns for line in r.stdout.splitlines() if line.split())


def remove_namespace(ns):
    """Kills what still runs in `ns` and deletes it. The names are this script's: whatever runs
    in them was started by this run or by an earlier one that did not get to clean up."""
    if not namespace_exists(ns):
        return
    for _ in range(50):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    ip("netns", "del", ns, check=False)


def create_namespaces():
    for ns in NAMESPACES:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
    for ns, peer, net in LINKS:
        # Both ends are created inside the namespaces: nothing appears in the caller's namespace.
        ip("link", "add", "name", peer, "netns", "mp-coord", "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        ip("-n", "mp-coord", "addr", "add", f"{net}.1/24", "dev", peer)
        ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
        ip("-n", "mp-coord", "link", "set", peer, "up")
        ip("-n", ns, "link", "set", "eth0", "up")


def tail(path, n=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


class Cluster:
    """The namespaces, the long-running processes in them and a scratch directory."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="three-pc-bench-")
        self.procs = []  # (name, Popen)
        self.made = False

    def start(self, ns, argv, name):
        out, err = os.path.join(self.tmp, f"{name}.out"), os.path.join(self.tmp, f"{name}.log")
        with open(out, "w") as of, open(err, "w") as ef:
            # Own session: a Ctrl-C reaches only this script, which then stops them in order.
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=of, stderr=ef,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc, out, err

    def wait_ready(self, name, proc, out, err, needle, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in tail(out, 100000):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} not ready ({needle!r} not in its output):\n"
                           f"{tail(out)}{tail(err)}")

    def check_alive(self):
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n"
                                   f"{tail(os.path.join(self.tmp, name + '.log'))}")

    def run(self, argv, name, timeout):
        """Runs argv in mp-coord to completion; returns its stdout. Fails with its stderr."""
        err = os.path.join(self.tmp, f"{name}.log")
        with open(err, "w") as ef:
            r = subprocess.run(["ip", "netns", "exec", "mp-coord", *argv], stdout=subprocess.PIPE,
                               stderr=ef, stdin=subprocess.DEVNULL, text=True, timeout=timeout,
                               start_new_session=True)
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed ({r.returncode}): {' '.join(argv)}\n{tail(err)}")
        return r.stdout

    def close(self):
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.made:
            for ns in NAMESPACES:
                remove_namespace(ns)
        shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def pick(bench):
    """The fields kept from one `moepool bench --json`."""
    out = {"decode_tokens_per_s": round(bench["decode_tokens_per_s"], 1),
           "prompt_tokens_per_s": round(bench["prompt_tokens_per_s"], 1)}
    c = bench.get("cluster")
    if c is None:
        return out
    out.update({
        "wire_dtype": c["wire_dtype"],
        "decode_round_trip_us_p50": c["decode_round_trip_us"]["p50"],
        "decode_round_trip_us_p99": c["decode_round_trip_us"]["p99"],
        "decode_worker_compute_us_p50": c["decode_worker_compute_us"]["p50"],
        "decode_dispatch_overhead_us_p50": c["decode_dispatch_overhead_us"]["p50"],
        "decode_dispatch_overhead_us_p99": c["decode_dispatch_overhead_us"]["p99"],
        "decode_wire_bytes_per_token": round(c["decode_wire_bytes_per_token"], 1),
        "coordinator_idle_ratio": round(bench["decode_coordinator_idle_ratio"], 3),
        "per_worker": [{"address": w["address"], "exchanges": w["decode_round_trip_us"]["samples"],
                        "round_trip_us_p50": w["decode_round_trip_us"]["p50"],
                        "worker_compute_us_p50": w["decode_worker_compute_us"]["p50"],
                        "dispatch_overhead_us_p50": w["decode_dispatch_overhead_us"]["p50"]}
                       for w in c["workers"]]})
    return out


def network_share(bench, n_layer):
    """See the module docstring: n_layer * overhead p50 / step time, with its bounds' inputs."""
    c = bench["cluster"]
    step_us = 1e6 / bench["decode_tokens_per_s"]
    tokens = bench["decode_tokens"] * bench.get("decode_sequences", 1)
    exchanges = c["decode_round_trip_us"]["samples"] / max(tokens, 1)
    overhead = c["decode_dispatch_overhead_us"]["p50"]
    return {"network_share": round(n_layer * overhead / step_us, 3),
            "network_share_if_serial": round(exchanges * overhead / step_us, 3),
            "step_us": round(step_us, 1), "n_layer": n_layer,
            "exchanges_per_token": round(exchanges, 2),
            "network_us_per_token": round(n_layer * overhead, 1)}


def serve_levels(report):
    return {n: {"aggregate_tokens_per_s": lv["aggregate_tokens_per_s"],
                "coordinator_idle_ratio": lv["coordinator_idle_ratio"],
                "ttft_ms_p50": lv["ttft_ms_p50"], "completed": lv["completed"],
                "output_tokens": lv["output_tokens"]}
            for n, lv in report["levels"].items()}


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)


def print_table(out, levels):
    s = out["settings"]
    lines = [f"three-PC cluster on {out['cpu']} ({out['cores']} cores): link "
             f"{s['rate_mbit']:g} Mbit/s + {s['delay_us']} us each way (moepool_slowlink), "
             f"coordinator {s['threads']} thread(s), workers {s['worker_threads']} each, "
             f"data port {s['data_port'] or 'off'}; decode {s['decode_tokens']} tokens, "
             f"serve {s['max_tokens']} tokens/stream"]
    head = (f"{'setup':<7} {'decode tok/s':>12} {'vs local':>8} {'rtt p50':>8} "
            f"{'ovh p50/p99 us':>15} {'wire B/tok':>10} {'net share':>9}")
    for n in levels:
        head += f"  {'serve x' + str(n) + ' tok/s (idle, vs local)':>30}"
    lines.append(head)
    rows = [("local", out["local"], None)] + [(d, r, r.get("vs_local")) for d, r in
                                               out["distributed"].items()]
    for name, r, vs in rows:
        if "error" in r:
            reason = [x for x in r["error"].splitlines() if x.strip()] or ["?"]
            lines.append(f"{name:<7} error: {reason[-1][:110]}")
            continue
        b = r.get("bench") or {}
        ns = r.get("network") or {}
        ovh = (f"{fmt(b.get('decode_dispatch_overhead_us_p50'))}/"
               f"{fmt(b.get('decode_dispatch_overhead_us_p99'))}"
               if "decode_dispatch_overhead_us_p50" in b else "-")
        line = (f"{name:<7} {fmt(b.get('decode_tokens_per_s'), '{:.1f}'):>12} "
                f"{fmt((vs or {}).get('decode_tokens_per_s'), '{:.2f}'):>8} "
                f"{fmt(b.get('decode_round_trip_us_p50')):>8} {ovh:>15} "
                f"{fmt(b.get('decode_wire_bytes_per_token')):>10} "
                f"{fmt(ns.get('network_share'), '{:.2f}'):>9}")
        for n in levels:
            lv = (r.get("serve") or {}).get(str(n))
            if lv is None:
                line += f"  {'-':>30}"
                continue
            cell = f"{lv['aggregate_tokens_per_s']:.1f} ({lv['coordinator_idle_ratio']:.2f}"
            v = ((vs or {}).get("serve_tokens_per_s") or {}).get(str(n))
            cell += f", {v:.2f})" if v is not None else ")"
            line += f"  {cell:>30}"
        lines.append(line)
    print("\n".join(lines), file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--slowlink", default="build/bench/moepool_slowlink")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1, help="coordinator threads")
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--delay-us", type=int, default=100, help="proxy delay, each way")
    ap.add_argument("--rate-mbit", type=float, default=1000, help="proxy rate cap (0: none)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,4,16", help="serve_bench concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per serve_bench stream")
    ap.add_argument("--dtypes", default="f16,q8_0", help="--wire-dtype values to measure")
    ap.add_argument("--data-port", type=int, default=7002,
                    help="the workers' --data-port (and its proxy)")
    ap.add_argument("--no-data-port", action="store_true",
                    help="run the workers without --data-port (binaries without the flag)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds each bench or serve_bench run may take")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (ip netns)")
    binary, slowlink = os.path.abspath(args.binary), os.path.abspath(args.slowlink)
    model = os.path.abspath(args.model)
    for path in (binary, slowlink, model):
        if not os.path.exists(path):
            ap.error(f"{path} does not exist")
    dtypes = [d for d in args.dtypes.split(",") if d]
    levels = [int(x) for x in args.streams.split(",") if x]
    data_port = None if args.no_data_port else args.data_port
    serve_bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_bench.py")
    os.environ["MOEPOOL_CLUSTER_TOKEN"] = TOKEN  # off loopback the workers require a token

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    info = json.loads(subprocess.run([binary, "inspect", model, "--json"], check=True,
                                     stdout=subprocess.PIPE, text=True).stdout)
    n_layer, n_expert = info["n_layer"], info["n_expert"]
    halves = (f"0-{n_expert // 2 - 1}", f"{n_expert // 2}-{n_expert - 1}")
    workers = ",".join(f"{net}.2:{GRPC_PORT}" for _, _, net in LINKS)
    out = {"cpu": cpu_model(), "cores": os.cpu_count(),
           "settings": {"model": model, "n_layer": n_layer, "n_expert": n_expert,
                        "threads": args.threads, "worker_threads": args.worker_threads,
                        "delay_us": args.delay_us, "rate_mbit": args.rate_mbit,
                        "decode_tokens": args.decode_tokens, "prompt_tokens": 16,
                        "streams": levels, "max_tokens": args.max_tokens, "dtypes": dtypes,
                        "data_port": data_port, "workers": workers,
                        "worker_experts": dict(zip(("mp-w1", "mp-w2"), halves))},
           "local": {}, "distributed": {}}
    failed = False
    stopped = 0
    cluster = Cluster()
    try:
        cluster.made = True  # from here on, close() removes the namespaces of these names
        for ns in NAMESPACES:
            if namespace_exists(ns):
                log(f"removing stale namespace {ns} and what runs in it")
            remove_namespace(ns)
        create_namespaces()
        for (ns, _, net), experts in zip(LINKS, halves):
            name = ns.replace("mp-", "")
            argv = [binary, "worker", "--model", model, "--experts", experts, "--listen",
                    f"127.0.0.1:{GRPC_PORT}", "--threads", str(args.worker_threads)]
            if data_port:
                argv += ["--data-port", str(data_port)]
            proc, o, e = cluster.start(ns, argv, f"worker-{name}")
            cluster.wait_ready(f"worker in {ns}", proc, o, e, f":{GRPC_PORT}")
            for port in [GRPC_PORT] + ([data_port] if data_port else []):
                proc, o, e = cluster.start(
                    ns, [slowlink, "--listen", f"{net}.2:{port}", "--target",
                         f"127.0.0.1:{port}", "--delay-us", str(args.delay_us), "--rate-mbit",
                         f"{args.rate_mbit:g}"], f"proxy-{name}-{port}")
                cluster.wait_ready(f"proxy {net}.2:{port} in {ns}", proc, o, e, "listening on",
                                   timeout=30)
        log(f"workers up in mp-w1, mp-w2 (experts {halves[0]}, {halves[1]}), reached from "
            f"mp-coord at {workers} through the proxies")

        bench_argv = [binary, "bench", "--model", model, "--threads", str(args.threads),
                      "--prompt-tokens", "16", "--decode-tokens", str(args.decode_tokens),
                      "--json"]
        serve_argv = [sys.executable, serve_bench, "--binary", binary, "--model", model,
                      "--streams", ",".join(map(str, levels)), "--max-tokens",
                      str(args.max_tokens), "--threads", str(args.threads)]

        log("local baseline: bench")
        local = json.loads(cluster.run(bench_argv, "bench-local", args.timeout))
        out["local"]["bench"] = pick(local)
        log("local baseline: serve_bench")
        out["local"]["serve"] = serve_levels(
            json.loads(cluster.run(serve_argv, "serve-local", args.timeout)))

        for dtype in dtypes:
            entry = out["distributed"].setdefault(dtype, {})
            cluster_flags = ["--workers", workers, "--wire-dtype", dtype, "--local-fallback",
                             "off"]
            try:
                cluster.check_alive()
                log(f"{dtype}: bench")
                b = json.loads(cluster.run(bench_argv + cluster_flags + ["--pings", "10"],
                                           f"bench-{dtype}", args.timeout))
                entry["bench"] = pick(b)
                entry["network"] = network_share(b, n_layer)
                log(f"{dtype}: serve_bench")
                cluster.check_alive()
                flags = shlex.join(["--wire-dtype", dtype, "--local-fallback", "off"])
                s = json.loads(cluster.run(serve_argv + ["--workers", workers,
                                                         f"--serve-flags={flags}"],
                                           f"serve-{dtype}", args.timeout))
                entry["serve"] = serve_levels(s)
                cluster.check_alive()
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                failed = True
                entry["error"] = str(e)
                log(f"{dtype}: {str(e).strip()[-1500:]}")
                continue
            loc = out["local"]
            entry["vs_local"] = {
                "decode_tokens_per_s": ratio(entry["bench"]["decode_tokens_per_s"],
                                             loc["bench"]["decode_tokens_per_s"]),
                "serve_tokens_per_s": {
                    n: ratio(lv["aggregate_tokens_per_s"],
                             loc["serve"].get(n, {}).get("aggregate_tokens_per_s"))
                    for n, lv in entry["serve"].items()}}
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}), cleaning up")
        stopped = 130
    except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
        log(f"failed: {e}")
        if "--data-port" in str(e):
            log("a binary without the worker's --data-port flag runs with --no-data-port")
        stopped = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster.close()
    if stopped:
        sys.exit(stopped)
    print(json.dumps(out, indent=1))
    print_table(out, levels)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
