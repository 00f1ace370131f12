#!/usr/bin/env python3
"""Structured output end to end: decode tokens/s of chat replies with and without a
response_format json_schema (and with tool_choice "required"), against one `moepool serve` it
starts itself, in alternating rounds (python3 standard library only).

  bench/structured_bench.py --binary build/cli/moepool --model mini-Q4_K_M.gguf \
      [--rounds 5] [--requests 8] [--max-tokens 96] [--threads 2]

Each request is sequential (one stream): tokens/s = completion tokens / (request time - time to
the first token), so prompt processing is left out. Prints one JSON object with the median
tokens/s of each setting over the rounds and its ratio to the unconstrained baseline.
"""
import argparse
import json
import statistics
import subprocess
import time
import urllib.request

from dispatch_ab import cpu_name

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": ["string", "null"], "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6}},
    "required": ["name", "age", "email", "tags"], "additionalProperties": False}

SETTINGS = {
    "text": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": PERSON}}},
    "tool_required": {"tools": [{"type": "function", "function": {
        "name": "save_person", "parameters": PERSON}}], "tool_choice": "required"},
}


def one(port, extra, max_tokens, seed):
    body = {"messages": [{"role": "user", "content": "Describe a person."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream_options": {"include_usage": True}}
    body.update(extra)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.monotonic()  # the role chunk: the prompt is done
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, time.monotonic() - (first or t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/cli/moepool")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    proc = subprocess.Popen([a.binary, "serve", "--model", a.model, "--listen", "127.0.0.1:0",
                             "--threads", str(a.threads), "--parallel", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = None
        for line in proc.stdout:
            if "serving on http://127.0.0.1:" in line:
                port = int(line.strip().rsplit(":", 1)[1])
                break
        rates = {name: [] for name in SETTINGS}
        for r in range(a.rounds):
            names = list(SETTINGS)
            names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
            for name in names:
                tokens = seconds = 0.0
                for i in range(a.requests):
                    t, s = one(port, SETTINGS[name], a.max_tokens, 1000 * r + i)
                    tokens += t
                    seconds += s
                rates[name].append(tokens / seconds)
        base = statistics.median(rates["text"])
        print(json.dumps({
            "cpu": cpu_name(), "model": a.model, "threads": a.threads, "rounds": a.rounds,
            "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "ratio_to_text": {k: round(statistics.median(v) / base, 3) for k, v in rates.items()},
        }, indent=1))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
