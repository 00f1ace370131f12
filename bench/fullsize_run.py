#!/usr/bin/env python3
"""Full-size run: a Mixtral-8x7B-shaped model served by `moepool serve` and two `moepool worker`
processes (experts 0-3 and 4-7) on this machine, measured end to end (docs/fullsize.md).
Not in CI: it writes 20+ GB and takes about two hours. Python standard library only.

  bench/fullsize_run.py --dir DIR [--type Q3_K_M] [--phases all] [--per-expert-type Q2_K]
                        [--thrash-gib 14] [--out DIR/fullsize-report.json]

Phases (comma-separated, or all), each adding to one JSON report:
  env        CPU, cores, memory, free disk
  synth      `moepool synth --shape mixtral-8x7b` (skipped when the file exists): time, peak RSS
  predict    `moepool inspect --json` and `moepool plan --json`: what each process should hold
  membw      memory read bandwidth with 1 and 2 threads (bench/membw.cc)
  serve      cold page cache (caches dropped; root) then warm, with --preload off and on: time to
             ready for each process, time to the first token, RSS (file-backed and anonymous)
             against the predictions, decode tokens/s with 1 and 4 streams against the
             bandwidth bound, RSS after N requests (creep)
  bench      `moepool bench` (prompt 32, decode 32 tokens; 1 and 4 sequences), all experts in
             one process vs the same coordinator with the two workers, alternating
  thrash     the same three processes in a memory cgroup smaller than the weights (cgroup v1
             or v2; root): what a user sees, and what the processes and the planner said
  per-expert `moepool synth --expert-layout per-expert` (Q2_K), inspect and load, then delete
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

GIB = 1 << 30
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle, "
          "and tell it in the first person.")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def proc_memory(pid):
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in bytes; its major faults."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/stat") as f:
        out["majflt"] = int(f.read().rsplit(")", 1)[1].split()[9])
    return out


def drop_caches():
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"cannot drop the page cache ({e}): the 'cold' figures are warm")
        return False


def cached_bytes_of(path):
    """Bytes of `path` in the page cache (fincore from util-linux), or None."""
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.strip() else None


class Proc:
    """A moepool process started now, ready when it prints its first stdout line."""

    def __init__(self, name, cmd, log_path, cgroup=None):
        self.name = name
        self.t0 = time.monotonic()
        self.err = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  preexec_fn=(lambda: join_cgroup(cgroup)) if cgroup else None)
        self.log_path = log_path
        self.ready_line = None
        self.ready_s = None

    def wait_ready(self, timeout=3600):
        result = {}

        def read():
            result["line"] = self.p.stdout.readline().strip()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        self.ready_line = result.get("line")
        if not self.ready_line:
            raise RuntimeError(f"{self.name} did not become ready; see {self.log_path}")
        self.ready_s = time.monotonic() - self.t0
        return self.ready_s

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.err.close()


def join_cgroup(cgroup):
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def make_cgroup(limit_bytes):
    """A memory cgroup limited to `limit_bytes` (v2 if mounted so, else v1); its path."""
    v2 = "/sys/fs/cgroup/cgroup.controllers"
    if os.path.exists(v2):
        path = "/sys/fs/cgroup/moepool-thrash"
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(limit_bytes))
    else:
        path = "/sys/fs/cgroup/memory/moepool-thrash"
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_bytes))
    return path


def chat(port, max_tokens, seed, out, timeout=3600):
    """One streaming chat completion: (time to first token, tokens, total seconds, end time)."""
    body = json.dumps({"model": "moepool", "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    first = None
    tokens = 0
    error = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.monotonic()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - reported in the results
        error = str(e)
    end = time.monotonic()
    out.append({"ttft_s": round((first or end) - t0, 3), "tokens": tokens,
                "total_s": round(end - t0, 3), "first": first, "end": end, "error": error})


def streams(port, n, max_tokens, timeout=3600):
    """n concurrent streams: TTFT, and decode tokens/s after every stream's first token."""
    results = []
    threads = [threading.Thread(target=chat, args=(port, max_tokens, i + 1, results, timeout))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r["error"] is None and r["first"] is not None]
    out = {"streams": n, "failed": n - len(ok),
           "errors": sorted({r["error"] for r in results if r["error"]}),
           "ttft_s": [r["ttft_s"] for r in results], "tokens": [r["tokens"] for r in results]}
    if ok:
        decode_tokens = sum(r["tokens"] - 1 for r in ok)
        span = max(r["end"] for r in ok) - max(r["first"] for r in ok)
        out["decode_tokens_per_s"] = round(decode_tokens / span, 3) if span > 0 else None
    return out


class Cluster:
    """Two workers (experts 0-3, 4-7) and a coordinator serving through them."""

    def __init__(self, args, model, tag, cgroup=None, preload=True):
        self.args = args
        self.preload = "on" if preload else "off"
        self.model = model
        self.tag = tag
        self.cgroup = cgroup
        self.procs = []
        self.port = None

    def start(self):
        a = self.args
        ports = [a.worker_port, a.worker_port + 1]
        timings = {}
        for i, (experts, port) in enumerate(zip(["0-3", "4-7"], ports)):
            w = Proc(f"worker{i}", [a.binary, "worker", "--model", self.model, "--experts",
                                    experts, "--listen", f"127.0.0.1:{port}", "--threads",
                                    str(a.worker_threads), "--preload", self.preload],
                     os.path.join(a.dir, f"{self.tag}-worker{i}.log"), self.cgroup)
            self.procs.append(w)
        for w in self.procs:
            timings[w.name] = round(w.wait_ready(), 3)
        c = Proc("coordinator", [a.binary, "serve", "--model", self.model, "--listen",
                                 "127.0.0.1:0", "--threads", str(a.threads), "--parallel", "4",
                                 "--ctx", str(a.ctx), "--preload", self.preload, "--workers",
                                 ",".join(f"127.0.0.1:{p}" for p in ports)],
                 os.path.join(a.dir, f"{self.tag}-coordinator.log"), self.cgroup)
        self.procs.append(c)
        timings["coordinator"] = round(c.wait_ready(), 3)
        self.port = int(c.ready_line.rsplit(":", 1)[1])
        return timings

    def memory(self):
        return {p.name: proc_memory(p.p.pid) for p in self.procs if p.p.poll() is None}

    def stderr_notes(self):
        notes = {}
        for p in self.procs:
            with open(p.log_path) as f:
                notes[p.name] = [line.strip() for line in f if line.strip()][-6:]
        return notes

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def timed(cmd):
    """Runs cmd under /usr/bin/time -v: (seconds, peak RSS bytes, stdout)."""
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return time.monotonic() - t0, rss * 1024, r.stdout


def phase_env(args, report):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    m = meminfo()
    du = shutil.disk_usage(args.dir)
    report["env"] = {"cpu": cpu, "cores": os.cpu_count(),
                     "avx512_vnni": "avx512_vnni" in flags,
                     "mem_total_bytes": m["MemTotal"], "mem_available_bytes": m["MemAvailable"],
                     "disk_free_bytes": du.free, "date": time.strftime("%Y-%m-%d %H:%M")}


def synth(args, model, type_name, layout):
    if os.path.exists(model):
        log(f"{model} exists: not synthesized again")
        return {"skipped": True, "file_bytes": os.path.getsize(model)}
    log(f"synthesizing {model} ({type_name}, {layout})")
    seconds, rss, _ = timed([args.binary, "synth", "--shape", "mixtral-8x7b", "--type",
                             type_name, "--seed", "1", "--expert-layout", layout, "--out", model])
    size = os.path.getsize(model)
    return {"seconds": round(seconds, 1), "peak_rss_bytes": rss, "file_bytes": size,
            "write_mb_per_s": round(size / seconds / 1e6, 1)}


def phase_synth(args, report):
    report["synth"] = synth(args, args.model, args.type, "merged")


def phase_predict(args, report):
    inspect = json.loads(run([args.binary, "inspect", args.model, "--json", "--ctx",
                              str(args.ctx)]))
    total = meminfo()["MemTotal"]
    plan = json.loads(run([args.binary, "plan", "--model", args.model, "--machine",
                           f"{total // (1 << 20)}MiB", "--ctx", str(args.ctx), "--json"]))
    # Each worker holds 4 of the 8 experts of every layer: half of the expert bytes.
    worker = inspect["expert_bytes"] // 2 + plan["worker_buffer_bytes"]
    report["predict"] = {
        "inspect": {k: inspect[k] for k in ("file_bytes", "expert_bytes", "non_expert_bytes",
                                            "kv_cache_bytes", "memory_bytes")},
        "plan_fits_one_machine": plan["fits"],
        "coordinator_bytes": plan["coordinator"]["total_bytes"],
        "coordinator_weight_bytes": plan["coordinator"]["non_expert_bytes"],
        "worker_bytes": worker,
        "worker_expert_bytes": inspect["expert_bytes"] // 2}


def phase_membw(args, report):
    out = json.loads(run([args.membw, "--mib", "2048", "--passes", "5"]))
    # The larger of the plain and the prefetching read, per thread count (the kernels prefetch).
    plain, ahead = out["read_gb_per_s"], out.get("read_gb_per_s_prefetched", {})
    report["membw"] = {t: max(v, ahead.get(t, 0)) for t, v in plain.items()}


def decode_bound(report, streams_n):
    """Tokens/s if every byte a decode step reads came at the 2-thread read bandwidth."""
    if "predict" not in report or "membw" not in report:
        return None
    p = report["predict"]["inspect"]
    bw = max(report["membw"].values()) * 1e9
    per_expert = p["expert_bytes"] / 8  # one expert of every layer
    # Distinct experts a step of `streams_n` tokens reads per layer (uniform top-2 routing).
    distinct = 8 * (1 - (6 / 8) ** streams_n)
    step_bytes = p["non_expert_bytes"] + distinct * per_expert
    return round(streams_n * bw / step_bytes, 3)


def measure_cluster(args, report, key, cold, preload):
    entry = {"page_cache_dropped": drop_caches() if cold else False, "preload": preload}
    cluster = Cluster(args, args.model, key, preload=preload)
    try:
        entry["ready_s"] = cluster.start()
        entry["memory_at_ready"] = cluster.memory()
        entry["first_request"] = streams(cluster.port, 1, 4)
        entry["memory_after_first_request"] = cluster.memory()
        if cold:
            entry["model_bytes_cached_after_first_request"] = cached_bytes_of(args.model)
        for n in (1, 4):
            res = streams(cluster.port, n, args.decode_tokens)
            res["bandwidth_bound_tokens_per_s"] = decode_bound(report, n)
            entry[f"decode_{n}_streams"] = res
            log(f"{key}: {n} stream(s): {res.get('decode_tokens_per_s')} tok/s")
        before = cluster.memory()
        for i in range(args.creep_requests):
            streams(cluster.port, 1, 8)
        after = cluster.memory()
        entry["rss_creep_bytes"] = {k: after[k]["VmRSS"] - before[k]["VmRSS"] for k in after}
        entry["memory_at_end"] = after
        entry["stderr_tail"] = cluster.stderr_notes()
    finally:
        cluster.stop()
    return entry


def phase_serve(args, report):
    # --preload off shows what a lazily mapped model costs the first request.
    for preload in (False, True):
        for cold in (True, False):
            key = f"serve_{'cold' if cold else 'warm'}_preload_{'on' if preload else 'off'}"
            report[key] = measure_cluster(args, report, key, cold, preload)


def bench_once(args, workers):
    cmd = [args.binary, "bench", "--model", args.model, "--threads", str(args.threads),
           "--prompt-tokens", "32", "--decode-tokens", "32", "--sequences", "4", "--json"]
    if workers:
        cmd += ["--workers", workers, "--pings", "500"]
    return json.loads(run(cmd))


def phase_bench(args, report):
    ports = [args.worker_port + 10, args.worker_port + 11]
    workers = []
    for i, (experts, port) in enumerate(zip(["0-3", "4-7"], ports)):
        w = Proc(f"worker{i}", [args.binary, "worker", "--model", args.model, "--experts", experts,
                                "--listen", f"127.0.0.1:{port}", "--threads",
                                str(args.worker_threads)],
                 os.path.join(args.dir, f"bench-worker{i}.log"))
        workers.append(w)
    runs = {"local": [], "distributed": []}
    try:
        for w in workers:
            w.wait_ready()
        for _ in range(args.bench_rounds):
            runs["local"].append(bench_once(args, None))
            runs["distributed"].append(
                bench_once(args, ",".join(f"127.0.0.1:{p}" for p in ports)))
            log(f"bench: local {runs['local'][-1].get('decode_tokens_per_s')} vs distributed "
                f"{runs['distributed'][-1].get('decode_tokens_per_s')} tok/s")
    finally:
        for w in workers:
            w.stop()
    report["bench"] = runs


def phase_thrash(args, report):
    limit = int(args.thrash_gib * GIB)
    entry = {"cgroup_limit_bytes": limit}
    plan = subprocess.run([args.binary, "plan", "--model", args.model, "--machine",
                           f"{args.thrash_gib}GiB", "--ctx", str(args.ctx)],
                          capture_output=True, text=True)
    entry["plan_exit_code"] = plan.returncode
    entry["plan_output"] = (plan.stdout + plan.stderr).strip().splitlines()[:8]
    drop_caches()
    cgroup = make_cgroup(limit)
    cluster = Cluster(args, args.model, "thrash", cgroup)
    try:
        entry["ready_s"] = cluster.start()
        res = streams(cluster.port, 1, 8, timeout=args.thrash_timeout)
        entry["one_stream_8_tokens"] = res
        entry["memory_at_end"] = cluster.memory()
        entry["stderr_tail"] = cluster.stderr_notes()
    except RuntimeError as e:
        entry["error"] = str(e)
    finally:
        cluster.stop()
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
    report["thrash"] = entry


def phase_per_expert(args, report):
    model = os.path.join(args.dir, f"mixtral-8x7b-{args.per_expert_type}-per-expert.gguf")
    entry = {"synth": synth(args, model, args.per_expert_type, "per-expert")}
    try:
        inspect = json.loads(run([args.binary, "inspect", model, "--json"]))
        entry["inspect"] = {k: inspect[k] for k in ("expert_layout", "file_bytes", "expert_bytes",
                                                    "non_expert_bytes", "memory_bytes")}
        entry["tensor_count"] = sum(inspect["tensor_types"].values())
        drop_caches()
        w = Proc("worker", [args.binary, "worker", "--model", model, "--experts", "0-3",
                            "--listen", f"127.0.0.1:{args.worker_port}"],
                 os.path.join(args.dir, "per-expert-worker.log"))
        try:
            entry["worker_ready_s"] = round(w.wait_ready(), 3)
            entry["worker_ready_line"] = w.ready_line
            entry["worker_memory"] = proc_memory(w.p.pid)
        finally:
            w.stop()
    finally:
        if not args.keep_per_expert and os.path.exists(model):
            os.remove(model)
            entry["deleted"] = True
    report["per_expert"] = entry


PHASES = {"env": phase_env, "synth": phase_synth, "predict": phase_predict,
          "membw": phase_membw, "serve": phase_serve, "bench": phase_bench,
          "thrash": phase_thrash,
          "per-expert": phase_per_expert}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the model files and logs go")
    ap.add_argument("--type", default="Q3_K_M")
    ap.add_argument("--per-expert-type", default="Q2_K")
    ap.add_argument("--phases", default="all")
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--membw", default="build/bench/moepool_membw")
    ap.add_argument("--threads", type=int, default=2, help="coordinator threads")
    ap.add_argument("--worker-threads", type=int, default=2)
    ap.add_argument("--worker-port", type=int, default=7170)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--creep-requests", type=int, default=20)
    ap.add_argument("--bench-rounds", type=int, default=3)
    ap.add_argument("--thrash-gib", type=float, default=14)
    ap.add_argument("--thrash-timeout", type=int, default=1800)
    ap.add_argument("--keep-per-expert", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    args.model = os.path.join(args.dir, f"mixtral-8x7b-{args.type}.gguf")
    out = args.out or os.path.join(args.dir, "fullsize-report.json")
    report = json.load(open(out)) if os.path.exists(out) else {}
    phases = list(PHASES) if args.phases == "all" else args.phases.split(",")
    for name in phases:
        log(f"phase {name}")
        t0 = time.monotonic()
        PHASES[name](args, report)
        report.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
