#!/usr/bin/env python3
"""Checks deploy/prometheus and deploy/grafana against a real coordinator's /metrics.

Starts `moepool serve` in cluster mode (--cluster-listen) on a small synthetic model, scrapes
/metrics before any worker joins, joins one `moepool worker`, sends a chat request and scrapes
again, then checks:

  cluster-setup      the scrapes show what the cluster alerts assume: no ready worker and
                     every expert on the coordinator's local fallback before the join, one ready
                     worker and no fallback expert after it
  referenced-metrics every moepool_* metric named in moepool-rules.yml (comments left out) and
                     in the PromQL of moepool-dashboard.json is in the scrape (X_bucket, X_sum
                     and X_count of a histogram X count as X's; recording rules, whose names
                     have colons, are not scraped and are left out)
  histograms         each histogram's buckets are cumulative and its +Inf bucket equals _count
  le-shortest-form   every bucket label le is the shortest decimal that reads back as the same
                     double (le="0.0025", not le="0.0025000000000000001"; le="1", not "1.0")
  step-histogram     moepool_step_duration_seconds: buckets from 0.001 to 60 s, one observation
                     per scheduler step (its _count equals moepool_forward_steps_total)
  promtool-*         with promtool on PATH (or $PROMTOOL): `promtool check config`, `promtool
                     check rules`, `promtool test rules` and a PromQL syntax check of the
                     dashboard's queries; without promtool they are skipped, and fail under CI=true

Usage: tests/deploy/metrics_test.py   (MOEPOOL_BINARY=path, default build/cli/moepool)
Exit status: 0 all passed, 1 something failed, 77 skipped (no moepool binary).
python3 standard library only.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
CONFIG = os.path.join(PROM_DIR, "prometheus.yml")
RULES = os.path.join(PROM_DIR, "moepool-rules.yml")
RULES_TEST = os.path.join(PROM_DIR, "moepool-rules.test.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "moepool-dashboard.json")

# What coordinator/metrics.cc gained for these files: a binary built before that fails the checks
# below that involve them, and the failure says so.
PENDING = {
    "moepool_step_duration_seconds": (
        "a binary built before coordinator/metrics.cc exported the histogram of the scheduler's "
        "forward-step wall time lacks it; MoepoolStepTimeHigh and the step-time panel need it"),
}
PENDING_LE = ("a binary built before coordinator/metrics.cc printed bucket bounds in shortest "
              "form (Histogram::Render used %.17g) has these labels")

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
STEP_BUCKETS_FIRST, STEP_BUCKETS_LAST = 0.001, 60.0
START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 60.0


class Results:
    def __init__(self):
        self.rows = []

    def add(self, name, status, message, pending=None):
        self.rows.append((name, status, message, pending))
        line = "%s %s: %s" % (status, name, message)
        if status == "FAIL" and pending:
            line += "\n     (expected with an old binary: %s)" % pending
        print(line, flush=True)

    def failed(self):
        return [r for r in self.rows if r[1] == "FAIL"]


# ------------------------------------------------------------------------------ processes


class Proc:
    """A child process whose combined stdout/stderr is collected by a reader thread."""

    def __init__(self, args, name):
        self.name = name
        self.lines = []
        self.cv = threading.Condition()
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, errors="replace")
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_for(self, pattern, timeout):
        """Returns the first match of `pattern` in the output, or None on exit or timeout."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        seen = 0
        with self.cv:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.time()
                if left <= 0 or (self.p.poll() is not None and not self.t.is_alive()):
                    return None
                self.cv.wait(min(left, 0.5))

    def output(self, last=20):
        with self.cv:
            return "\n".join("    %s| %s" % (self.name, l) for l in self.lines[-last:])

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.t.join(timeout=5)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def start_server(binary, model):
    """Starts `moepool serve` with a control port; returns (proc, http_base, control_addr)."""
    for attempt in range(2):
        proc = Proc([binary, "serve", "--model", model, "--listen", "127.0.0.1:0",
                     "--cluster-listen", "127.0.0.1:0", "--threads", "1", "--parallel", "2"],
                    "serve")
        control = proc.wait_for(r"cluster control on (127\.0\.0\.1:\d+)", START_TIMEOUT_S)
        serving = proc.wait_for(r"serving on (http://127\.0\.0\.1:\d+)", START_TIMEOUT_S)
        if control and serving:
            return proc, serving.group(1), control.group(1)
        print("moepool serve did not start (attempt %d):\n%s" % (attempt + 1, proc.output()),
              flush=True)
        proc.stop()
        time.sleep(5)  # e.g. the binary being replaced by a rebuild
    return None, None, None


def join_worker(binary, control, cache_dir, base):
    """Joins one worker on a free fixed port and waits until the coordinator lists it ready."""
    for attempt in range(3):
        port = free_port()  # --join needs a fixed --listen port
        proc = Proc([binary, "worker", "--join", control, "--listen", "127.0.0.1:%d" % port,
                     "--cache-dir", cache_dir, "--threads", "1", "--memory", "1GiB"], "worker")
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline and proc.p.poll() is None:
            status, body = http("GET", base + "/v1/cluster")
            if status == 200:
                workers = json.loads(body).get("workers", [])
                if any(w.get("state") == "ready" for w in workers):
                    return proc
            time.sleep(0.25)
        print("worker not ready (attempt %d):\n%s" % (attempt + 1, proc.output()), flush=True)
        proc.stop()
    return None


# ------------------------------------------------------------------------------ exposition


SAMPLE_RX = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
LABEL_RX = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Scrape:
    def __init__(self, text):
        self.types = {}  # family -> type
        self.samples = []  # (name, {label: value}, value string)
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    self.types[parts[2]] = parts[3]
                continue
            if not line.strip() or line.startswith("#"):
                continue
            m = SAMPLE_RX.match(line)
            if not m:
                raise ValueError("unparsable exposition line: %r" % line)
            labels = dict(LABEL_RX.findall(m.group(3) or ""))
            self.samples.append((m.group(1), labels, m.group(4)))
        self.names = {s[0] for s in self.samples}

    def has(self, name):
        """Whether a metric name used in PromQL is exported (histogram suffixes included)."""
        if name in self.names or name in self.types:
            return True
        for suffix in HISTOGRAM_SUFFIXES:
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base and self.types.get(base) in ("histogram", "summary"):
                return True
        return False

    def value(self, name, **labels):
        for n, l, v in self.samples:
            if n == name and all(l.get(k) == x for k, x in labels.items()):
                return float(v)
        return None

    def total(self, name):
        return sum(float(v) for n, _, v in self.samples if n == name)

    def histograms(self):
        """{family: {'buckets': [(le string, count)], 'count': c}} per label set (minus le)."""
        out = {}
        for fam, typ in self.types.items():
            if typ != "histogram":
                continue
            series = {}
            for n, l, v in self.samples:
                key = tuple(sorted((k, x) for k, x in l.items() if k != "le"))
                if n == fam + "_bucket":
                    series.setdefault(key, {"buckets": [], "count": None})["buckets"].append(
                        (l.get("le"), float(v)))
                elif n == fam + "_count":
                    series.setdefault(key, {"buckets": [], "count": None})["count"] = float(v)
            out[fam] = series
        return out


def shortest(le):
    """The shortest decimal that reads back as float(le) (Python's repr, minus a trailing .0)."""
    r = repr(float(le))
    return r[:-2] if r.endswith(".0") else r


# ------------------------------------------------------------------------------ references


IDENT_RX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
METRIC_RX = re.compile(r"^moepool_[a-z_]+$")


def names_in(text):
    """moepool_* metric names in PromQL/YAML text; names with colons (recording rules) left out."""
    return {t for t in IDENT_RX.findall(text) if ":" not in t and METRIC_RX.match(t)}


def strip_yaml_comments(text):
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def dashboard_queries(dash):
    """The PromQL strings of the dashboard: panel targets and query variables."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "definition") and isinstance(v, str):
                    out.append(v)
                elif k == "query" and isinstance(v, str) and node.get("type") != "datasource":
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash.get("panels", []))
    walk(dash.get("templating", {}))
    return out


# ------------------------------------------------------------------------------ checks


def check_cluster_setup(res, before, after):
    problems = []
    ready0 = before.value("moepool_cluster_workers", state="ready")
    fallback0 = before.value("moepool_cluster_fallback_experts")
    ready1 = after.value("moepool_cluster_workers", state="ready")
    fallback1 = after.value("moepool_cluster_fallback_experts")
    if ready0 != 0:
        problems.append("before the join moepool_cluster_workers{state=\"ready\"} = %s, want 0"
                        % ready0)
    if not fallback0:
        problems.append("before the join moepool_cluster_fallback_experts = %s, want > 0 (every "
                        "expert on the coordinator's local fallback)" % fallback0)
    if ready1 != 1:
        problems.append("after the join moepool_cluster_workers{state=\"ready\"} = %s, want 1"
                        % ready1)
    if fallback1 != 0:
        problems.append("after the join moepool_cluster_fallback_experts = %s, want 0" % fallback1)
    if not after.value("moepool_generated_tokens_total"):
        problems.append("moepool_generated_tokens_total is 0 after a request")
    if problems:
        res.add("cluster-setup", "FAIL", "; ".join(problems))
    else:
        res.add("cluster-setup", "PASS", "no ready worker and %d fallback experts before the "
                "join; 1 ready worker, no fallback expert and %d generated tokens after it"
                % (fallback0, after.value("moepool_generated_tokens_total")))


def check_references(res, scrape):
    with open(RULES) as f:
        rules_text = strip_yaml_comments(f.read())
    with open(DASHBOARD) as f:
        dash = json.load(f)
    refs = {}
    for n in names_in(rules_text):
        refs.setdefault(n, []).append(os.path.relpath(RULES, ROOT))
    for q in dashboard_queries(dash):
        for n in names_in(q):
            refs.setdefault(n, []).append(os.path.relpath(DASHBOARD, ROOT))
    if not refs:
        res.add("referenced-metrics", "FAIL", "no moepool_* metric found in the rules and the "
                "dashboard (parsing broken?)")
        return
    missing = sorted(n for n in refs if not scrape.has(n))
    pending_missing = [n for n in missing if base_name(n) in PENDING]
    other_missing = [n for n in missing if base_name(n) not in PENDING]
    for n in other_missing:
        res.add("referenced-metrics", "FAIL", "%s (used in %s) is not in /metrics"
                % (n, ", ".join(sorted(set(refs[n])))))
    for n in pending_missing:
        res.add("referenced-metrics", "FAIL", "%s (used in %s) is not in /metrics yet"
                % (n, ", ".join(sorted(set(refs[n])))), pending=PENDING[base_name(n)])
    if not missing:
        res.add("referenced-metrics", "PASS", "all %d metric names used by the rules and the "
                "dashboard are exported: %s" % (len(refs), ", ".join(sorted(refs))))


def base_name(name):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_histograms(res, scrape):
    problems = []
    n = 0
    for fam, series in scrape.histograms().items():
        for key, h in series.items():
            n += 1
            counts = [c for _, c in h["buckets"]]
            if any(b < a for a, b in zip(counts, counts[1:])):
                problems.append("%s%s: buckets not cumulative %s" % (fam, dict(key), counts))
            if not h["buckets"] or h["buckets"][-1][0] != "+Inf":
                problems.append("%s%s: last bucket is not le=\"+Inf\"" % (fam, dict(key)))
            elif h["count"] != h["buckets"][-1][1]:
                problems.append("%s%s: _count %s != +Inf bucket %s"
                                % (fam, dict(key), h["count"], h["buckets"][-1][1]))
    if problems:
        res.add("histograms", "FAIL", "; ".join(problems))
    else:
        res.add("histograms", "PASS", "%d histogram series well formed (%s)"
                % (n, ", ".join(sorted(scrape.histograms()))))


def check_le_form(res, scrape):
    bad = {}
    n = 0
    for name, labels, _ in scrape.samples:
        le = labels.get("le")
        if le is None or le == "+Inf":
            continue
        n += 1
        try:
            want = shortest(le)
        except ValueError:
            want = "a number"
        if le != want:
            bad.setdefault(base_name(name), []).append('le="%s" should be le="%s"' % (le, want))
    if not n:
        res.add("le-shortest-form", "FAIL", "no bucket with an le label in the scrape")
    elif bad:
        for fam, items in sorted(bad.items()):
            res.add("le-shortest-form", "FAIL", "%s: %d of its bucket labels are not in shortest "
                    "form: %s" % (fam, len(items), ", ".join(items)), pending=PENDING_LE)
    else:
        res.add("le-shortest-form", "PASS", "all %d le labels in shortest form" % n)


def check_step_histogram(res, scrape):
    fam = "moepool_step_duration_seconds"
    if scrape.types.get(fam) != "histogram":
        res.add("step-histogram", "FAIL", "%s is not exported as a histogram (TYPE %s)"
                % (fam, scrape.types.get(fam)), pending=PENDING[fam])
        return
    series = scrape.histograms()[fam]
    problems = []
    for key, h in series.items():
        finite = [float(le) for le, _ in h["buckets"] if le != "+Inf"]
        if not finite or finite[0] != STEP_BUCKETS_FIRST or finite[-1] != STEP_BUCKETS_LAST:
            problems.append("buckets %s, want %s .. %s s" % (finite, STEP_BUCKETS_FIRST,
                                                             STEP_BUCKETS_LAST))
        steps = scrape.total("moepool_forward_steps_total")
        if not h["count"]:
            problems.append("_count is 0 after a request")
        elif h["count"] != steps:
            problems.append("_count %s != moepool_forward_steps_total %s (one observation per "
                            "step expected)" % (h["count"], steps))
    if problems:
        res.add("step-histogram", "FAIL", "%s: %s" % (fam, "; ".join(problems)))
    else:
        res.add("step-histogram", "PASS", "%s: buckets %s .. %s s, one observation per step"
                % (fam, STEP_BUCKETS_FIRST, STEP_BUCKETS_LAST))


def run_promtool(res, name, args, what=None):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace", timeout=120)
    tail = "\n".join("    " + l for l in p.stdout.strip().splitlines()[-30:])
    if p.returncode == 0:
        res.add(name, "PASS", what or "promtool " + " ".join(
            os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in args[1:]))
    else:
        res.add(name, "FAIL", "%s exited %d:\n%s" % (" ".join(args[1:]), p.returncode, tail))


def check_promtool(res):
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    names = ["promtool-check-config", "promtool-check-rules", "promtool-test-rules",
             "promtool-dashboard-promql"]
    if not promtool:
        ci = os.environ.get("CI", "").lower() == "true"
        for name in names:
            res.add(name, "FAIL" if ci else "SKIP",
                    "promtool not found (apt-get install prometheus, or set PROMTOOL)"
                    + ("; required under CI=true" if ci else ""))
        return
    run_promtool(res, names[0], [promtool, "check", "config", CONFIG])
    run_promtool(res, names[1], [promtool, "check", "rules", RULES])
    run_promtool(res, names[2], [promtool, "test", "rules", RULES_TEST])
    # The dashboard's queries as recording rules, Grafana's macros and variables substituted,
    # so that promtool parses their PromQL.
    with open(DASHBOARD) as f:
        queries = dashboard_queries(json.load(f))
    subst = [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
             ("$job", ".+"), ("$instance", ".+")]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dashboard-queries.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, q in enumerate(queries):
                if q.startswith("label_values("):  # Grafana's, not PromQL: take its selector
                    q = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q.strip())
                for a, b in subst:
                    q = q.replace(a, b)
                f.write("      - record: dashboard:query_%d\n        expr: %s\n"
                        % (i, json.dumps(q)))
        run_promtool(res, names[3], [promtool, "check", "rules", path],
                     "the %d PromQL queries of %s parse" % (len(queries),
                                                            os.path.relpath(DASHBOARD, ROOT)))


# ------------------------------------------------------------------------------ main


def main():
    binary = os.environ.get("MOEPOOL_BINARY") or os.path.join(ROOT, "build", "cli", "moepool")
    if not os.path.isabs(binary):
        binary = os.path.join(os.getcwd(), binary)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print("SKIP: no moepool binary at %s (set MOEPOOL_BINARY)" % binary)
        return 77
    res = Results()
    procs = []
    with tempfile.TemporaryDirectory(prefix="moepool-metrics-test-") as tmp:
        try:
            model = os.path.join(tmp, "m.gguf")
            p = subprocess.run([binary, "synth", "--out", model, "--shape", "tiny", "--type",
                                "Q8_0", "--seed", "5"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=120)
            if p.returncode != 0:
                res.add("server", "FAIL", "moepool synth failed:\n" + p.stdout)
                return 1
            server, base, control = start_server(binary, model)
            if server is None:
                res.add("server", "FAIL", "moepool serve did not start")
                return 1
            procs.append(server)
            status, before_text = http("GET", base + "/metrics")
            if status != 200:
                res.add("server", "FAIL", "GET /metrics before the join: %d" % status)
                return 1
            worker = join_worker(binary, control, os.path.join(tmp, "cache"), base)
            if worker is None:
                res.add("server", "FAIL", "no worker became ready:\n" + server.output())
                return 1
            procs.append(worker)
            status, body = http("POST", base + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 8})
            if status != 200:
                res.add("server", "FAIL", "chat request: %d %s" % (status, body[:500]))
                return 1
            status, after_text = http("GET", base + "/metrics")
            if status != 200:
                res.add("server", "FAIL", "GET /metrics: %d" % status)
                return 1
            res.add("server", "PASS", "coordinator %s with one joined worker answered a chat "
                    "request; /metrics scraped (%d bytes)" % (base, len(after_text)))
            try:
                before, after = Scrape(before_text), Scrape(after_text)
            except ValueError as e:
                res.add("exposition", "FAIL", str(e))
                return 1
            check_cluster_setup(res, before, after)
            check_references(res, after)
            check_histograms(res, after)
            check_le_form(res, after)
            check_step_histogram(res, after)
        finally:
            for proc in reversed(procs):
                proc.stop()
    check_promtool(res)

    failed = res.failed()
    print()
    if not failed:
        skipped = [r for r in res.rows if r[1] == "SKIP"]
        print("metrics_test: %d checks passed%s" % (
            len(res.rows) - len(skipped),
            ", %d skipped (promtool not installed)" % len(skipped) if skipped else ""))
        return 0
    pending = [r for r in failed if r[3]]
    print("metrics_test: %d of %d checks failed" % (len(failed), len(res.rows)))
    if pending and len(pending) == len(failed):
        print("metrics_test: every failure is about what coordinator/metrics.cc gained for "
              "deploy/ (moepool_step_duration_seconds, shortest-form le labels): rebuild "
              "build/cli/moepool (or point MOEPOOL_BINARY at a newer one)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
