#!/usr/bin/env python3
"""The systemd units of deploy/systemd/ checked and run the way systemd would run them.

1. `systemd-analyze verify` accepts both units without a single warning (the binary path is
   substituted: verify checks that ExecStart's program exists).
2. What the units promise: Type=notify, a dedicated user, Restart=on-failure, secrets only as
   credential files (LoadCredential=, never --cluster-token/--api-key on the command line).
3. deploy/systemd/install.sh installs both roles into a scratch root (units, settings, a random
   cluster token and API key). The coordinator and a worker are started from exactly the
   units' ExecStart lines and
   environment files, expanded as systemd does (${VAR} one word, $VAR split at spaces; %d the
   credentials directory, %C the cache root; paths, ports and the model substituted), with a
   $NOTIFY_SOCKET this test listens on: both send READY=1; a chat completion with the API key
   from the credential file answers.
4. Stopping the worker with the units' KillSignal while a streamed reply runs: STOPPING=1, the
   worker leaves the cluster and exits 0, and the reply ends normally.
5. Stopping the coordinator the same way: STOPPING=1, /health answers 503 "draining", a new
   request gets 503, the reply in flight ends normally, and the process exits 0.

Exit 0 pass, 1 fail, 77 skip (systemd-analyze missing, except under CI=true).
Env: MOEPOOL_BINARY (default build/cli/moepool), MOEPOOL_SOURCE_DIR (default the repository).
"""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

SOURCE = os.environ.get("MOEPOOL_SOURCE_DIR",
                        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BINARY = os.path.abspath(os.environ.get("MOEPOOL_BINARY", os.path.join(SOURCE, "build/cli/moepool")))
UNITS = os.path.join(SOURCE, "deploy/systemd")
CI = os.environ.get("CI") == "true"


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def parse_unit(path):
    """{section: [(key, value), ...]} (repeated keys kept in order)."""
    sections, current = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = line.strip("[]")
                sections.setdefault(current, [])
                continue
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit, key):
    return [v for k, v in unit["Service"] if k == key]


def parse_env(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    return env


def expand(exec_start, env, specifiers):
    """ExecStart as systemd expands it: specifiers, then ${VAR} (one word), $VAR (split)."""
    for spec, value in specifiers.items():
        exec_start = exec_start.replace(spec, value)
    argv = []
    for word in shlex.split(exec_start):
        if word.startswith("$") and not word.startswith("${"):
            argv.extend(env.get(word[1:], "").split())
            continue
        while "${" in word:
            start = word.index("${")
            end = word.index("}", start)
            word = word[:start] + env.get(word[start + 2:end], "") + word[end + 1:]
        argv.append(word)
    return argv


def verify(units):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if CI:
            fail("systemd-analyze is missing (install systemd)")
        print("SKIP: systemd-analyze is missing")
        sys.exit(77)
    with tempfile.TemporaryDirectory() as d:
        for name in units:
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/usr/local/bin/moepool", BINARY)
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        r = subprocess.run([tool, "verify", "--man=no"] + [os.path.join(d, n) for n in units],
                           capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            fail(f"systemd-analyze verify: rc {r.returncode}\n{out}")
    print("ok: systemd-analyze verify, no warnings")


def check_promises(name, unit):
    service = dict(unit["Service"])
    for key, want in [("Type", "notify"), ("User", "moepool"), ("Restart", "on-failure"),
                      ("KillSignal", "SIGTERM")]:
        if service.get(key) != want:
            fail(f"{name}: {key}={service.get(key)}, want {want}")
    start = service["ExecStart"]
    for flag in ("--cluster-token ", "--api-key "):
        if flag in start:
            fail(f"{name}: a secret on the command line ({flag.strip()})")
    creds = [v.split(":")[0] for v in values(unit, "LoadCredential")]
    if "cluster-token" not in creds or "%d/cluster-token" not in start:
        fail(f"{name}: the cluster token must come from the cluster-token credential")
    print(f"ok: {name}: Type=notify, User=moepool, Restart=on-failure, secrets as credentials")


class NotifySocket:
    """Collects sd_notify datagrams: {pid: [message, ...]}."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode())

    def wait_for(self, needle, timeout):
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if any(needle in m for m in self.messages):
                    return True
            time.sleep(0.05)
        return False

    def count(self, needle):
        with self.lock:
            return sum(needle in m for m in self.messages)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(port, path, body=None, key=None, timeout=60):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        return 0, repr(e)


def stream_chat(port, key, max_tokens, result):
    """A streamed chat reply; result gets 'finish' (the finish_reason) or 'error'."""
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 1, "seed": 3,
            # keep it going past the end-of-turn token (id 2 in the Mistral vocabulary), so the
            # reply is still running when a process is stopped, whatever the model samples
            "logit_bias": {"2": -100}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    result["tokens"] = 0
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["error"] = chunk["error"]
                    return
                for c in chunk.get("choices", []):
                    if c["delta"].get("content"):
                        result["tokens"] += 1
                    if c.get("finish_reason"):
                        result["finish"] = c["finish_reason"]
    except Exception as e:  # noqa: BLE001 - any failure of the request is the test's failure
        result["error"] = repr(e)


def main():
    units = ["moepool-coordinator.service", "moepool-worker.service"]
    verify(units)
    coord_unit = parse_unit(os.path.join(UNITS, units[0]))
    worker_unit = parse_unit(os.path.join(UNITS, units[1]))
    check_promises(units[0], coord_unit)
    check_promises(units[1], worker_unit)

    tmp = tempfile.mkdtemp(prefix="moepool-systemd-")
    procs = []
    try:
        model = os.path.join(tmp, "tiny.gguf")
        subprocess.run([BINARY, "synth", "--out", model, "--shape", "tiny", "--type", "Q8_0",
                        "--seed", "5"], check=True, capture_output=True)
        # install.sh into a scratch root: units, settings, the secrets it makes.
        root = os.path.join(tmp, "root")
        api, cluster, worker_port = free_port(), free_port(), free_port()
        install = os.path.join(UNITS, "install.sh")
        env = dict(os.environ, MOEPOOL_INSTALL_ROOT=root)
        subprocess.run([install, "coordinator", "--binary", BINARY, "--model", model], env=env,
                       check=True, capture_output=True)
        subprocess.run([install, "worker", "--binary", BINARY, "--coordinator",
                        f"127.0.0.1:{cluster}"], env=env, check=True, capture_output=True)
        etc = os.path.join(root, "etc/moepool")
        for unit_name in units:
            if not os.path.exists(os.path.join(root, "etc/systemd/system", unit_name)):
                fail(f"install.sh did not install {unit_name}")
        # The secrets handed over as systemd credentials (LoadCredential=ID:PATH -> %d/ID).
        creds = {}
        for role, unit in (("coordinator", coord_unit), ("worker", worker_unit)):
            creds[role] = os.path.join(tmp, f"creds-{role}")
            os.makedirs(creds[role])
            for spec in values(unit, "LoadCredential"):
                cred_id, _, path = spec.partition(":")
                shutil.copy(path.replace("/etc/moepool", etc), os.path.join(creds[role], cred_id))
        with open(os.path.join(etc, "api-keys")) as f:
            api_key = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")][0]
        notify = NotifySocket(os.path.join(tmp, "notify.sock"))

        cenv = parse_env(os.path.join(etc, "coordinator.env"))
        if cenv["MOEPOOL_MODEL"] != model:
            fail("install.sh --model did not set MOEPOOL_MODEL")
        cenv.update(MOEPOOL_LISTEN=f"127.0.0.1:{api}", MOEPOOL_CLUSTER_LISTEN=f"127.0.0.1:{cluster}",
                    MOEPOOL_SERVE_FLAGS="--threads 1")
        wenv = parse_env(os.path.join(etc, "worker.env"))
        wenv.update(MOEPOOL_LISTEN=f"127.0.0.1:{worker_port}", MOEPOOL_WORKER_FLAGS="--threads 1")

        def start(unit, env, cred_dir, name):
            exec_start = dict(unit["Service"])["ExecStart"]
            argv = expand(exec_start, env, {"%d": cred_dir, "%C": os.path.join(tmp, "cache")})
            argv[0] = argv[0].replace("/usr/local/bin/moepool", BINARY)
            print(f"{name}: {shlex.join(argv)}")
            log = open(os.path.join(tmp, f"{name}.log"), "w")
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, NOTIFY_SOCKET=notify.path))
            procs.append(p)
            return p

        coordinator = start(coord_unit, cenv, creds["coordinator"], "coordinator")
        if not notify.wait_for("READY=1", 60):
            fail("the coordinator sent no READY=1")
        worker = start(worker_unit, wenv, creds["worker"], "worker")
        if not notify.wait_for("ready as", 120):
            fail("the worker sent no READY=1 with its status")
        status, body = http(api, "/v1/cluster", key=api_key)
        workers = json.loads(body).get("workers", []) if status == 200 else []
        if not any(w.get("state") == "ready" for w in workers):
            fail(f"no ready worker in /v1/cluster: {status} {body}")
        status, body = http(api, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                            key=api_key)
        if status != 200:
            fail(f"chat completion: {status} {body}")
        print("ok: both READY=1 through $NOTIFY_SOCKET; a completion with the credential's key")

        # The worker stopped as systemd stops it, during a streamed reply.
        result = {}
        t = threading.Thread(target=stream_chat, args=(api, api_key, 3000, result))
        t.start()
        time.sleep(0.5)
        worker.send_signal(signal.SIGTERM)
        try:
            rc = worker.wait(timeout=float(dict(worker_unit["Service"])["TimeoutStopSec"]))
        except subprocess.TimeoutExpired:
            fail("the worker did not exit within TimeoutStopSec")
        if not t.is_alive():
            fail("the reply ended before the worker had stopped: the test proves nothing")
        t.join(timeout=300)
        if rc != 0 or notify.count("STOPPING=1") < 1:
            fail(f"worker: exit {rc}, STOPPING=1 seen {notify.count('STOPPING=1')} times")
        if "error" in result or "finish" not in result:
            fail(f"the reply in flight while the worker stopped: {result}")
        print(f"ok: worker stopped with SIGTERM mid-reply: STOPPING=1, exit 0, reply ended "
              f"normally ({result['tokens']} deltas, finish_reason {result['finish']})")

        # The coordinator stopped the same way: it drains.
        result = {}
        t = threading.Thread(target=stream_chat, args=(api, api_key, 3000, result))
        t.start()
        time.sleep(0.3)
        coordinator.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        health, hbody = http(api, "/health")
        refused, _ = http(api, "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                          key=api_key)
        if not t.is_alive():
            fail("the reply ended before the drain was checked: the test proves nothing")
        t.join(timeout=300)
        try:
            rc = coordinator.wait(timeout=float(dict(coord_unit["Service"])["TimeoutStopSec"]))
        except subprocess.TimeoutExpired:
            fail("the coordinator did not exit within TimeoutStopSec")
        if health != 503 or "draining" not in hbody or refused != 503:
            fail(f"draining coordinator: /health {health} {hbody}, new request {refused}")
        if "error" in result or "finish" not in result:
            fail(f"the reply in flight while the coordinator stopped: {result}")
        if rc != 0 or notify.count("STOPPING=1") < 2:
            fail(f"coordinator: exit {rc}, STOPPING=1 seen {notify.count('STOPPING=1')} times")
        print(f"ok: coordinator stopped with SIGTERM mid-reply: /health 503 draining, new "
              f"requests 503, the reply finished ({result['finish']}), exit 0")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("MOEPOOL_KEEP_TEST_FILES"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
