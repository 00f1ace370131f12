#!/usr/bin/env python3
"""Serving benchmark: aggregate output tokens/s and time to first token at several concurrency
levels, against a `moepool serve` it starts itself (python3 standard library only).

  bench/serve_bench.py --binary build/cli/moepool --model mini-Q4_K_M.gguf \
      [--workers host:port,host:port | --spawn-workers N [--worker-threads 1]] \
      [--streams 1,4,16] [--max-tokens 64] [--threads 2] [--micro-batches 1|2] [--repeat N] \
      [--prefix-cache off|on|off,on] [--system-words N [--fresh-system]] \
      [--serve-flags="--wire-dtype f16 ..."]

--spawn-workers N starts N `moepool worker` processes on 127.0.0.1 holding equal shares of the
experts (N = 2: experts 0-3 and 4-7 of an 8-expert model) and serves through them.

Prints one JSON object: per concurrency level, aggregate tokens/s, TTFT p50/p99 (ms), the
ratio of each level's throughput to the single-stream figure (the baseline, same script), and
the coordinator idle ratio over the level (from /metrics: time the forward thread was blocked
waiting for remote experts / scheduler step time; 0 with local experts).

The requests cycle through four short prompts, so they repeat: the server runs with
--prefix-cache off by default, which measures batching rather than cache hits. --prefix-cache
off,on runs the same rounds against one server per setting and reports the ratio (on / off).
--system-words N puts one shared system message of about N words before every prompt (the
shared-system-prompt case the prefix cache is for). With --fresh-system every round of every level
gets a system message the server has not seen (a burst of requests with a new shared prefix).
--serve-flags adds flags (split as a shell would) to every `moepool serve` command line, e.g.
--serve-flags="--wire-dtype f16" (write it with "=": a value starting with "-" is read as a flag).
"""
import argparse
import json
import shlex
import subprocess
import threading
import time
import urllib.request


def stream_one(port, prompt, max_tokens, seed, out, system):
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = json.dumps({
        "model": "moepool", "stream": True, "stream_options": {"include_usage": True},
        "messages": messages, "max_tokens": max_tokens,
        "temperature": 0.8, "seed": seed}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    ttft = None
    tokens = 0
    prompt_tokens = cached = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
                ttft = time.monotonic() - t0  # first generated text, not the role chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
                tokens = usage["completion_tokens"]
                prompt_tokens = usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    out.append((ttft or 0.0, tokens, time.monotonic() - t0, prompt_tokens, cached))


def step_counters(port):
    """(idle seconds, step seconds) from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode("utf-8")
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            values[parts[0]] = float(parts[1])
    return (values.get("moepool_coordinator_idle_seconds_total", 0.0),
            values.get("moepool_step_seconds_total", 0.0))


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def run_level(port, n, prompts, max_tokens, system):
    results = []
    threads = [threading.Thread(target=stream_one,
                                args=(port, prompts[i % len(prompts)], max_tokens, i, results,
                                      system))
               for i in range(n)]
    idle0, steps0 = step_counters(port)
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    idle1, steps1 = step_counters(port)
    tokens = sum(r[1] for r in results)
    ttfts = [r[0] * 1000 for r in results]
    return {"streams": n, "completed": len(results), "output_tokens": tokens,
            "aggregate_tokens_per_s": round(tokens / wall, 1),
            "ttft_ms_p50": round(percentile(ttfts, 50), 1),
            "ttft_ms_p99": round(percentile(ttfts, 99), 1),
            "coordinator_idle_ratio": round((idle1 - idle0) / max(steps1 - steps0, 1e-9), 3),
            "prompt_tokens": sum(r[3] for r in results),
            "cached_prompt_tokens": sum(r[4] for r in results)}


SYSTEM_WORDS = ("you are a careful assistant for a small team that studies coastal weather and "
                "answers questions about tides storms winds and the sea in short plain sentences "
                "with numbers where they help and no guessing when the data is missing").split()


def system_message(words):
    return " ".join(SYSTEM_WORDS[i % len(SYSTEM_WORDS)] for i in range(words))


def start_server(args, prefix_cache, levels):
    cmd = [args.binary, "serve", "--model", args.model, "--listen", "127.0.0.1:0",
           "--threads", str(args.threads), "--parallel", str(max(levels)),
           "--max-queue", "64", "--prefix-cache", prefix_cache]
    if args.workers:
        cmd += ["--workers", args.workers]
    if args.micro_batches:
        cmd += ["--micro-batches", str(args.micro_batches)]
    cmd += shlex.split(args.serve_flags)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline().strip()
    return server, int(line.rsplit(":", 1)[1])


def run_setting(args, prefix_cache, levels, prompts, system):
    fresh = [0]

    def system_for_round():
        if not system or not args.fresh_system:
            return system
        fresh[0] += 1
        return f"Session {fresh[0]}. {system}"

    server, port = start_server(args, prefix_cache, levels)
    try:
        stream_one(port, "warm up", 8, 0, [], system)  # with --system-words: primes the cache
        # Rounds alternate over the levels, so a busy spell of a shared machine hits every level;
        # each level reports its median round (by throughput).
        rounds = {n: [] for n in levels}
        for _ in range(max(1, args.repeat)):
            for n in levels:
                rounds[n].append(run_level(port, n, prompts, args.max_tokens, system_for_round()))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {}
    base = None
    for n in levels:
        runs = sorted(rounds[n], key=lambda r: r["aggregate_tokens_per_s"])
        level = runs[len(runs) // 2]
        base = base or level["aggregate_tokens_per_s"]
        level["vs_single_stream"] = round(level["aggregate_tokens_per_s"] / base, 2)
        if len(runs) > 1:
            level["rounds_tokens_per_s"] = [r["aggregate_tokens_per_s"] for r in rounds[n]]
        report[str(n)] = level
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", default="")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spawn-workers", type=int, default=0)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--n-expert", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=0, help="0: the server's default")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all levels; each level reports its median round")
    ap.add_argument("--prefix-cache", default="off",
                    help="off, on, or off,on (one server each, same rounds; adds on/off ratios)")
    ap.add_argument("--system-words", type=int, default=0,
                    help="a shared system message of this many words before every prompt")
    ap.add_argument("--fresh-system", action="store_true",
                    help="a new system message (same length) for every round of every level")
    ap.add_argument("--serve-flags", default="",
                    help="extra flags for `moepool serve`, split as a shell would "
                         "(e.g. --serve-flags=\"--wire-dtype f16\")")
    args = ap.parse_args()
    settings = args.prefix_cache.split(",")
    if any(s not in ("on", "off") for s in settings):
        ap.error("--prefix-cache takes off, on or off,on")
    spawned = []
    try:
        if args.spawn_workers:
            addresses = []
            per = args.n_expert // args.spawn_workers
            for w in range(args.spawn_workers):
                lo = w * per
                hi = args.n_expert - 1 if w == args.spawn_workers - 1 else lo + per - 1
                proc = subprocess.Popen(
                    [args.binary, "worker", "--model", args.model, "--experts", f"{lo}-{hi}",
                     "--listen", "127.0.0.1:0", "--threads", str(args.worker_threads)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                spawned.append(proc)
                ready = proc.stdout.readline().strip()
                addresses.append(ready.rsplit(" on ", 1)[1].split()[0])
            args.workers = ",".join(addresses)
        levels = [int(x) for x in args.streams.split(",")]
        prompts = ["Tell me a story about a fox.", "Explain mixture of experts briefly.",
                   "Write a short poem about the sea.", "List three uses of a GPU."]
        system = system_message(args.system_words) if args.system_words > 0 else None
        report = {"model": args.model, "workers": args.workers or None,
                  "micro_batches": args.micro_batches or "default",
                  "max_tokens": args.max_tokens, "repeat": max(1, args.repeat),
                  "system_words": args.system_words, "fresh_system": args.fresh_system}
        results = {s: run_setting(args, s, levels, prompts, system) for s in settings}
        if len(settings) == 1:
            report["prefix_cache"] = settings[0]
            report["levels"] = results[settings[0]]
        else:
            report["prefix_cache"] = {s: {"levels": results[s]} for s in settings}
            if "on" in results and "off" in results:
                report["on_vs_off"] = {
                    str(n): {
                        "tokens_per_s": round(results["on"][str(n)]["aggregate_tokens_per_s"] /
                                              results["off"][str(n)]["aggregate_tokens_per_s"], 2),
                        "ttft_p50": round(results["on"][str(n)]["ttft_ms_p50"] /
                                          max(results["off"][str(n)]["ttft_ms_p50"], 1e-9), 2)}
                    for n in levels}
        print(json.dumps(report, indent=1))
    finally:
        for proc in spawned:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
