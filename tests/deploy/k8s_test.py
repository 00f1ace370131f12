#!/usr/bin/env python3
"""Run the Kubernetes manifests' command lines as real processes on loopback.

Renders deploy/k8s/overlays/cpu (MOEPOOL_K8S_TEST_OVERLAY to pick another) with
`kubectl kustomize`, takes the coordinator Deployment's and the worker StatefulSet's containers
as they are (command, args, env) and runs one coordinator pod and the StatefulSet's replicas as
processes, resolving what Kubernetes would resolve:

  - each pod gets its own loopback address (coordinator 127.0.0.1, moepool-worker-N 127.0.0.(2+N)),
    as each pod has its own IP: the workers share one template, hence one set of ports, and two
    processes cannot both listen on 127.0.0.1:7070. $(POD_IP) (the downward API's status.podIP)
    and a 0.0.0.0 listen host become the pod's address;
  - $(VAR) references are expanded from the container's env (value, configMapKeyRef from the
    rendered ConfigMap, fieldRef, resourceFieldRef with its divisor), as the kubelet does;
  - Service names (moepool-cluster, or NAME.NS.svc.cluster.local) become the address of the one
    pod their selector picks, the Service port its targetPort's containerPort;
  - every volumeMount becomes a temporary directory: Secret volumes hold files with random test
    values under the Secret's keys (items honoured), ConfigMap volumes the ConfigMap's data,
    claims and emptyDirs start empty; the coordinator's --model (a path on the model claim) is a
    model made with `moepool synth --shape tiny --type Q8_0 --seed 5`;
  - the container's command /usr/local/bin/moepool is $MOEPOOL_BINARY (default
    build/cli/moepool); the process gets only the container's env (plus PATH, and HOME set to
    the pod's would-be root directory, which must stay empty: the root filesystem is read-only).

Ports are the declared ones; MOEPOOL_K8S_TEST_PORT_OFFSET=N shifts them all by N. A busy port
fails with a message naming it. MOEPOOL_K8S_TEST_KEEP=1 keeps the temporary directory (the
processes' logs, volumes and model).

Then it checks, in order: the coordinator's startup and readiness probes (the manifest's path and
port) answer 200; each worker's gRPC probe port answers grpc.health.v1.Health/Check with SERVING
(a minimal HTTP/2 client below: python has no gRPC module here); GET /v1/cluster with the API key
read from the Secret file lists every worker ready at its pod address; /health and /metrics need
no key, /v1/models without one is 401; a chat completion succeeds; SIGTERM to the last worker
(as a StatefulSet scale-down or a node drain sends it) while a streamed completion runs: the
stream ends with [DONE] and no error, the worker exits 0 within terminationGracePeriodSeconds and
the coordinator shows it gone; another completion succeeds on what is left; SIGTERM to the other
worker and the coordinator: both exit 0; the read-only model volume is unchanged and nothing was
written outside the declared volumes.

Exit 0: passed; 1: failed; 77: skipped (kubectl or PyYAML missing, in CI too).
"""
import http.client
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP = 77
TEST_DEADLINE_S = 100  # everything up to the shutdown; keeps the test well under 2 minutes

checked = []


def note(msg):
    checked.append(msg)
    print(f"ok: {msg}", flush=True)


class Failure(Exception):
    pass


def require(cond, msg):
    if not cond:
        raise Failure(msg)


def skip(msg):
    # kubectl is not a Debian 12 package of a version that renders these overlays (its
    # kubernetes-client 1.20 embeds kustomize 2): where it is missing the test skips, in CI too.
    print(f"SKIP: {msg}")
    sys.exit(SKIP)


# ---------------------------------------------------------------------------------------------
# Rendering and resolving the manifests.

def render(overlay):
    try:
        import yaml  # noqa: F401  (PyYAML)
    except ImportError:
        skip("python3 has no PyYAML (import yaml)")
    import yaml
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip("kubectl not found (needed for kubectl kustomize)")
    path = os.path.join(ROOT, "deploy", "k8s", "overlays", overlay)
    r = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=60)
    require(r.returncode == 0, f"kubectl kustomize {path} failed:\n{r.stderr}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def find(docs, kind, name):
    for d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return d
    raise Failure(f"the rendering has no {kind} {name}")


def expand(text, env):
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as they are."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


QUANTITY = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q):
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    require(m and m.group(2) in QUANTITY, f"cannot read the quantity {q!r}")
    return float(m.group(1)) * QUANTITY[m.group(2)]


class Pod:
    def __init__(self, name, ip, template, workdir):
        self.name, self.ip = name, ip
        self.labels = template["metadata"].get("labels") or {}
        self.spec = template["spec"]
        require(len(self.spec["containers"]) == 1, f"{name}: expected one container")
        self.container = self.spec["containers"][0]
        self.ports = {}
        for p in self.container.get("ports") or []:
            self.ports[p["containerPort"]] = p["containerPort"]
            if p.get("name"):
                self.ports[p["name"]] = p["containerPort"]
        self.dir = os.path.join(workdir, name)
        self.root = os.path.join(self.dir, "root")  # stands for the read-only root filesystem
        self.mounts = {}  # mountPath -> local directory
        self.proc = None
        self.log = None
        self.address = None

    def probe(self, kind):
        return self.container.get(kind)


class Cluster:
    def __init__(self, docs, workdir, binary, offset):
        self.docs, self.workdir, self.binary, self.offset = docs, workdir, binary, offset
        self.config = {}
        for d in docs:
            if d["kind"] == "ConfigMap":
                self.config[d["metadata"]["name"]] = d.get("data") or {}
        self.services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        # Test values for every key of every Secret: one random token a key.
        self.secret_values = {}
        for d in docs:
            if d["kind"] == "Secret":
                keys = list((d.get("stringData") or {})) + list((d.get("data") or {}))
                self.secret_values[d["metadata"]["name"]] = {
                    k: f"test-{k.replace('.', '-')}-{secrets.token_hex(16)}" for k in keys}
        self.pods = []

    def port(self, declared):
        return declared + self.offset

    def resolve_service(self, host, port):
        """(pod ip, port) that HOST:PORT reaches through a Service, None when HOST is none."""
        name = host.split(".")[0]
        svc = self.services.get(name)
        if svc is None or (len(host.split(".")) > 1 and host.split(".")[2:3] not in ([], ["svc"])):
            return None
        selector = svc["spec"].get("selector") or {}
        pods = [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]
        require(len(pods) >= 1, f"Service {name} selects no pod")
        for sp in svc["spec"].get("ports") or []:
            if sp["port"] == port:
                target = sp.get("targetPort", sp["port"])
                pod = pods[0]
                require(target in pod.ports,
                        f"Service {name} port {port}: targetPort {target} is not a containerPort "
                        f"of {pod.name}")
                return pod.ip, self.port(pod.ports[target])
        raise Failure(f"Service {name} has no port {port}")

    def env_of(self, pod):
        env = {}
        res = pod.container.get("resources") or {}
        for e in pod.container.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
                continue
            vf = e.get("valueFrom") or {}
            if "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                require(ref["key"] in self.config.get(ref["name"], {}),
                        f"{pod.name}: env {e['name']}: no ConfigMap key {ref['name']}/{ref['key']}")
                env[e["name"]] = self.config[ref["name"]][ref["key"]]
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                env[e["name"]] = self.secret_values[ref["name"]][ref["key"]]
            elif "fieldRef" in vf:
                field = vf["fieldRef"]["fieldPath"]
                values = {"status.podIP": pod.ip, "status.podIPs": pod.ip,
                          "status.hostIP": "127.0.0.1", "metadata.name": pod.name,
                          "metadata.namespace": "default", "spec.nodeName": "node-0",
                          "spec.serviceAccountName": "default"}
                require(field in values, f"{pod.name}: env {e['name']}: fieldRef {field} "
                                         "not emulated")
                env[e["name"]] = values[field]
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                kind, _, r = ref["resource"].partition(".")
                require(r in (res.get(kind) or {}),
                        f"{pod.name}: env {e['name']}: no {ref['resource']}")
                value = quantity(res[kind][r]) / quantity(ref.get("divisor", "1"))
                env[e["name"]] = str(max(1, math.ceil(value - 1e-9)))
            else:
                raise Failure(f"{pod.name}: env {e['name']}: a valueFrom not emulated: {vf}")
        return env

    def make_volumes(self, pod):
        volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
        for m in pod.container.get("volumeMounts") or []:
            local = os.path.join(pod.dir, "volumes", m["name"])
            os.makedirs(local, exist_ok=True)
            v = volumes.get(m["name"], {})  # absent: a volumeClaimTemplate, starts empty
            if "secret" in v:
                values = self.secret_values[v["secret"]["secretName"]]
                items = v["secret"].get("items") or [{"key": k, "path": k} for k in values]
                for item in items:
                    with open(os.path.join(local, item["path"]), "w") as f:
                        f.write(values[item["key"]] + "\n")
            elif "configMap" in v:
                data = self.config[v["configMap"]["name"]]
                for k, val in data.items():
                    with open(os.path.join(local, k), "w") as f:
                        f.write(val)
            pod.mounts[m["mountPath"].rstrip("/")] = (local, bool(m.get("readOnly")))

    def local_path(self, pod, path):
        best = None
        for mp in pod.mounts:
            if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best)):
                best = mp
        return None if best is None else pod.mounts[best][0] + path[len(best):]

    def command_of(self, pod):
        """The container's command line as this machine runs it."""
        env = self.env_of(pod)
        argv = [expand(a, env) for a in
                list(pod.container.get("command") or []) + list(pod.container.get("args") or [])]
        require(argv and os.path.basename(argv[0]) == "moepool",
                f"{pod.name}: the command is not moepool: {argv[:1]}")
        out = [self.binary]
        prev = ""
        for a in argv[1:]:
            m = re.fullmatch(r"([A-Za-z0-9.-]*|\[[0-9a-fA-F:]*\]):(\d+)", a)
            if m and not a.startswith("/"):
                host, port = m.group(1), int(m.group(2))
                if host in ("", "0.0.0.0", "[::]", pod.ip):
                    require(port in pod.ports,
                            f"{pod.name}: {a}: port {port} is not a declared containerPort")
                    a = f"{pod.ip}:{self.port(port)}"
                else:
                    target = self.resolve_service(host, port)
                    if target is not None:
                        a = f"{target[0]}:{target[1]}"
            elif a.isdigit() and prev.endswith("-port"):
                require(int(a) in pod.ports,
                        f"{pod.name}: {prev} {a}: not a declared containerPort")
                a = str(self.port(int(a)))
            elif a.startswith("/"):
                local = self.local_path(pod, a)
                require(local is not None, f"{pod.name}: {a} is on no mounted volume (the root "
                                           "filesystem is read-only)")
                a = local
            out.append(a)
            prev = a if a.startswith("--") else ""
        return out, env

    def start(self, pod, argv, env):
        os.makedirs(pod.root, exist_ok=True)
        for port in set(pod.ports.values()):
            port_free_or_fail(pod.ip, self.port(port), port)
        penv = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": pod.root}
        penv.update(env)
        pod.log = open(os.path.join(pod.dir, "log"), "w")
        try:
            pod.proc = subprocess.Popen(argv, cwd=pod.root, env=penv, stdin=subprocess.DEVNULL,
                                        stdout=pod.log, stderr=subprocess.STDOUT)
        except OSError as e:
            raise Failure(f"{pod.name}: cannot start {argv[0]}: {e}")
        print(f"started {pod.name} (pid {pod.proc.pid}): {' '.join(argv)}", flush=True)


def port_free_or_fail(ip, port, declared):
    """Fails when something listens on ip:port. A connection attempt, not a test bind: the
    connections of a previous run left in TIME_WAIT make a bind fail for a minute, though the
    servers (SO_REUSEADDR) bind fine."""
    try:
        socket.create_connection((ip, port), timeout=2).close()
    except OSError:
        return
    raise Failure(f"port {ip}:{port} (declared containerPort {declared}) is busy: something "
                  "listens there; stop it or set MOEPOOL_K8S_TEST_PORT_OFFSET=N to shift every "
                  "port by N")


# ---------------------------------------------------------------------------------------------
# Probes.

def http_get(url, key=None, timeout=5):
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url, body, key, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def grpc_health_check(ip, port, timeout=5.0):
    """grpc.health.v1.Health/Check with service "" (what the kubelet's grpc probe sends) over
    cleartext HTTP/2; returns the serving status (1 = SERVING). A minimal client: HPACK literals
    without Huffman for the request; the response headers are not decoded, only the DATA frame
    carrying the HealthCheckResponse message."""
    def frame(ftype, flags, stream, payload=b""):
        return (struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) +
                struct.pack(">I", stream) + payload)

    def literal(name, value):  # literal header field without indexing, new name
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    headers = (literal(b":method", b"POST") + literal(b":scheme", b"http") +
               literal(b":path", b"/grpc.health.v1.Health/Check") +
               literal(b":authority", f"{ip}:{port}".encode()) +
               literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers"))
    message = b"\x00" + struct.pack(">I", 0)  # uncompressed, empty HealthCheckRequest
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) +
                  frame(1, 0x4, 1, headers) + frame(0, 0x1, 1, message))
        buf, data = b"", b""
        while True:
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    raise Failure(f"{ip}:{port}: the connection closed during the health check")
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            ftype, flags = buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if ftype == 4 and not flags & 0x1:
                s.sendall(frame(4, 0x1, 0))  # SETTINGS ack
            elif ftype == 6 and not flags & 0x1:
                s.sendall(frame(6, 0x1, 0, payload))  # PING ack
            elif ftype == 7:
                raise Failure(f"{ip}:{port}: GOAWAY during the health check")
            elif ftype == 3 and stream == 1:
                raise Failure(f"{ip}:{port}: the health check was reset")
            elif ftype == 0 and stream == 1:
                if flags & 0x8:  # PADDED
                    payload = payload[1:len(payload) - payload[0]]
                data += payload
            if stream == 1 and ftype in (0, 1) and flags & 0x1:  # END_STREAM
                break
    if len(data) < 5:
        raise Failure(f"{ip}:{port}: the health check returned no message (an error status)")
    body = data[5:5 + int.from_bytes(data[1:5], "big")]
    # HealthCheckResponse { ServingStatus status = 1; }: tag 0x08, then a varint (absent: 0).
    return body[1] if len(body) >= 2 and body[0] == 0x08 else 0


def run_probe(cluster, pod, probe, deadline):
    """Polls one probe of the manifest until it succeeds (before deadline); returns a line."""
    last = None
    while time.monotonic() < deadline:
        require(pod.proc.poll() is None,
                f"{pod.name} exited with {pod.proc.returncode} before its {probe} passed")
        spec = pod.probe(probe)
        try:
            if "httpGet" in spec:
                g = spec["httpGet"]
                port = cluster.port(pod.ports[g["port"]])
                status, _ = http_get(f"http://{pod.ip}:{port}{g.get('path', '/')}")
                if 200 <= status < 400:
                    return f"httpGet {g.get('path', '/')} on {port}: {status}"
                last = f"HTTP {status}"
            elif "grpc" in spec:
                port = cluster.port(spec["grpc"]["port"])
                st = grpc_health_check(pod.ip, port)
                if st == 1:
                    return f"grpc.health.v1 Check on {port}: SERVING"
                last = f"status {st}"
            elif "tcpSocket" in spec:
                port = cluster.port(pod.ports[spec["tcpSocket"]["port"]])
                socket.create_connection((pod.ip, port), timeout=2).close()
                return f"tcpSocket {port}: connected"
            else:
                raise Failure(f"{pod.name}: {probe} of a kind not emulated: {spec}")
        except (OSError, Failure, http.client.HTTPException) as e:
            last = str(e)
        time.sleep(0.2)
    raise Failure(f"{pod.name}: {probe} did not pass in time (last: {last})")


# ---------------------------------------------------------------------------------------------

def snapshot(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for f in files:
            st = os.stat(os.path.join(base, f))
            out[os.path.relpath(os.path.join(base, f), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def stream_completion(ip, port, key, result, first_tokens):
    """Streams a long chat completion; result gets the chunks, [DONE] and errors."""
    try:
        conn = http.client.HTTPConnection(ip, port, timeout=60)
        body = {"stream": True, "max_tokens": 400, "temperature": 0.7, "seed": 3,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                # keep it going past the end-of-turn token (id 2 in the Mistral vocabulary)
                "logit_bias": {"2": -100}}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        result["status"] = resp.status
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result["error"] = chunk["error"]
                break
            result["chunks"].append((time.monotonic(), chunk))
            if len(result["chunks"]) == 5:
                first_tokens.set()
        conn.close()
    except Exception as e:  # noqa: BLE001 (reported by the main thread)
        result["exception"] = repr(e)
    finally:
        first_tokens.set()


def stop(pod, grace, sig=signal.SIGTERM):
    pod.proc.send_signal(sig)
    try:
        return pod.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pod.proc.kill()
        pod.proc.wait()
        raise Failure(f"{pod.name} did not exit within terminationGracePeriodSeconds ({grace} s) "
                      "of SIGTERM")


def main():
    start_time = time.monotonic()
    binary = os.environ.get("MOEPOOL_BINARY", os.path.join(ROOT, "build", "cli", "moepool"))
    binary = os.path.abspath(binary)
    if not os.access(binary, os.X_OK):
        skip(f"no moepool binary at {binary} (build it or set MOEPOOL_BINARY)")
    offset = int(os.environ.get("MOEPOOL_K8S_TEST_PORT_OFFSET", "0"))
    overlay = os.environ.get("MOEPOOL_K8S_TEST_OVERLAY", "cpu")
    try:
        s = socket.socket()
        s.bind(("127.0.0.3", 0))
        s.close()
    except OSError:
        skip("cannot bind 127.0.0.2/127.0.0.3 (every pod gets its own loopback address)")

    docs = render(overlay)
    note(f"rendered deploy/k8s/overlays/{overlay}: {len(docs)} objects")
    coord_dep = find(docs, "Deployment", "moepool-coordinator")
    worker_set = find(docs, "StatefulSet", "moepool-worker")
    replicas = worker_set["spec"].get("replicas", 1)

    workdir = tempfile.mkdtemp(prefix="moepool-k8s-test-")
    cluster = Cluster(docs, workdir, binary, offset)
    coord = Pod("moepool-coordinator-0", "127.0.0.1", coord_dep["spec"]["template"], workdir)
    workers = [Pod(f"moepool-worker-{i}", f"127.0.0.{2 + i}", worker_set["spec"]["template"],
                   workdir) for i in range(replicas)]
    require(replicas <= 250, "too many replicas for 127.0.0.N")
    cluster.pods = [coord] + workers
    ok = False
    try:
        for pod in cluster.pods:
            cluster.make_volumes(pod)
        coord_argv, coord_env = cluster.command_of(pod=coord)
        worker_cmds = [cluster.command_of(pod=w) for w in workers]
        for w, (argv, _) in zip(workers, worker_cmds):
            flag = "--advertise" if "--advertise" in argv else "--listen"
            w.address = argv[argv.index(flag) + 1]  # where the coordinator should reach it

        # The model the ConfigMap names, on the model volume.
        model = coord_argv[coord_argv.index("--model") + 1]
        require(not os.path.exists(model), f"{model} exists before the test made it")
        synth = os.path.join(workdir, "model.gguf")
        r = subprocess.run([binary, "synth", "--out", synth, "--shape", "tiny", "--type", "Q8_0",
                            "--seed", "5"], capture_output=True, text=True, timeout=120)
        require(r.returncode == 0, f"moepool synth failed: {r.stderr}")
        os.link(synth, model)
        note(f"model {os.path.basename(model)} (moepool synth tiny Q8_0) on the model volume")
        read_only = {p: snapshot(local) for p, (local, ro) in coord.mounts.items() if ro}

        key_file = coord_argv[coord_argv.index("--api-key-file") + 1]
        with open(key_file) as f:
            key = [l.strip() for l in f if l.strip() and not l.startswith("#")][0]

        deadline = start_time + TEST_DEADLINE_S
        cluster.start(coord, coord_argv, coord_env)
        for probe in ("startupProbe", "readinessProbe"):
            note(f"coordinator {probe}: {run_probe(cluster, coord, probe, deadline)}")
        for w, (argv, env) in zip(workers, worker_cmds):
            cluster.start(w, argv, env)
        for w in workers:
            for probe in ("startupProbe", "readinessProbe"):
                note(f"{w.name} {probe}: {run_probe(cluster, w, probe, deadline)}")

        http_port = cluster.port(coord.ports[coord.probe("readinessProbe")["httpGet"]["port"]])
        base = f"http://{coord.ip}:{http_port}"
        want = {w.address for w in workers}
        while True:
            status, body = http_get(f"{base}/v1/cluster", key)
            require(status == 200, f"GET /v1/cluster: {status} {body[:200]!r}")
            view = json.loads(body)
            ready = {w["address"] for w in view["workers"] if w["state"] == "ready"}
            if ready == want:
                break
            require(time.monotonic() < deadline,
                    f"GET /v1/cluster: ready workers {sorted(ready)}, want {sorted(want)}: "
                    f"{json.dumps(view['workers'])[:800]}")
            time.sleep(0.2)
        note(f"GET /v1/cluster (API key from the Secret file): {len(want)} workers ready at their "
             f"pod addresses {sorted(want)}, placement version {view['placement_version']}")

        status, body = http_get(f"{base}/health")
        require(status == 200 and json.loads(body)["status"] == "ok", f"/health: {status}")
        status, body = http_get(f"{base}/metrics")
        require(status == 200 and b"moepool_cluster_workers" in body, f"/metrics: {status}")
        status, _ = http_get(f"{base}/v1/models")
        require(status == 401, f"/v1/models without the API key: {status}, want 401")
        note("/health and /metrics answer without a key, /v1/models without one is 401")

        status, reply = http_post(f"{base}/v1/chat/completions",
                                  {"max_tokens": 16, "temperature": 0, "messages":
                                   [{"role": "user", "content": "Hello"}]}, key)
        require(status == 200, f"chat completion: {status} {reply!r:.300}")
        require(reply["choices"][0]["finish_reason"] in ("stop", "length") and
                reply["usage"]["completion_tokens"] >= 1, f"chat completion: {reply}")
        note(f"chat completion: {reply['usage']['completion_tokens']} tokens, "
             f"finish_reason {reply['choices'][0]['finish_reason']}")

        # SIGTERM to the last worker while a streamed completion runs.
        grace = worker_set["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        victim, survivors = workers[-1], workers[:-1]
        result, first_tokens = {"chunks": []}, threading.Event()
        t = threading.Thread(target=stream_completion,
                             args=(coord.ip, http_port, key, result, first_tokens), daemon=True)
        t.start()
        require(first_tokens.wait(30), "the streamed completion sent no token in 30 s")
        require("exception" not in result and "error" not in result,
                f"the stream failed before the SIGTERM: {result.get('exception') or result.get('error')}")
        # The victim is computing rows for this stream (its experts are on every layer).
        vaddr = victim.address
        status, body = http_get(f"{base}/v1/cluster", key)
        before = {w["address"]: w for w in json.loads(body)["workers"]}
        require(before.get(vaddr, {}).get("state") == "ready" and before[vaddr].get("requests", 0) > 0,
                f"{victim.name} is not serving rows before the SIGTERM: {before.get(vaddr)}")
        signalled = time.monotonic()
        rc = stop(victim, grace)
        exited = time.monotonic()
        t.join(60)
        require(not t.is_alive(), "the streamed completion did not end in 60 s")
        require(result.get("status") == 200, f"stream status {result.get('status')}")
        require("exception" not in result, f"stream: {result.get('exception')}")
        require("error" not in result, f"the stream ended with an error event: {result.get('error')}")
        require(result.get("done"), "the stream did not end with data: [DONE]")
        after = sum(1 for ts, _ in result["chunks"] if ts > signalled)
        require(after > 0, "the stream had ended before the SIGTERM: nothing was in flight")
        finish = [c["choices"][0]["finish_reason"] for _, c in result["chunks"]
                  if c.get("choices") and c["choices"][0].get("finish_reason")]
        require(finish in (["length"], ["stop"]), f"stream finish_reason {finish}")
        require(rc == 0, f"{victim.name} exited with {rc} after SIGTERM, want 0")
        note(f"SIGTERM to {victim.name} while it served a stream's rows ({before[vaddr]['requests']} "
             f"requests so far): it exited 0 after "
             f"{exited - signalled:.2f} s (grace {grace} s); the stream went on for {after} more "
             f"chunks and ended with [DONE], finish_reason {finish[0]}, no error")

        status, body = http_get(f"{base}/v1/cluster", key)
        states = {w["address"]: w["state"] for w in json.loads(body)["workers"]}
        require(states.get(vaddr) == "gone", f"{victim.name} is {states.get(vaddr)}, want gone")
        for w in survivors:
            require(states.get(w.address) == "ready",
                    f"{w.name} is {states.get(w.address)}, want ready")
            note(f"{w.name} readinessProbe after the drain: "
                 f"{run_probe(cluster, w, 'readinessProbe', time.monotonic() + 10)}")
        status, reply = http_post(f"{base}/v1/chat/completions",
                                  {"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
                                  key)
        require(status == 200, f"chat completion after the drain: {status} {reply!r:.300}")
        note(f"/v1/cluster shows {victim.name} gone, the others ready; a completion still works")

        for w in survivors:
            rc = stop(w, grace)
            require(rc == 0, f"{w.name} exited with {rc} after SIGTERM, want 0")
        cgrace = coord_dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        rc = stop(coord, cgrace)
        require(rc == 0, f"the coordinator exited with {rc} after SIGTERM, want 0")
        note("SIGTERM: the other workers and the coordinator exited 0")

        for p, snap in read_only.items():
            require(snapshot(coord.mounts[p][0]) == snap, f"the read-only mount {p} was written to")
        for pod in cluster.pods:
            left = os.listdir(pod.root)
            require(not left, f"{pod.name} wrote {left} outside its volumes (cwd or HOME): the "
                              "root filesystem is read-only")
        note("read-only mounts unchanged; nothing written to the (read-only) root filesystem")
        ok = True
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
    except Exception:  # noqa: BLE001 (an unexpected error is a failure too, after the cleanup)
        import traceback
        print("FAIL: unexpected error:\n" + traceback.format_exc(), file=sys.stderr)
    finally:
        for pod in cluster.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()
            if pod.log is not None:
                pod.log.close()
        if not ok:
            for pod in cluster.pods:
                path = os.path.join(pod.dir, "log")
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        tail = f.read()[-3000:]
                    print(f"--- {pod.name} log (tail) ---\n{tail}", file=sys.stderr)
        if os.environ.get("MOEPOOL_K8S_TEST_KEEP") == "1":
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - start_time
    print(f"took {elapsed:.1f} s")
    print(f"{len(checked)} passed, {0 if ok else 1} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
