#!/usr/bin/env bash
# Render every kustomization under deploy/k8s (the base and each overlay) and check the result
# offline. Usage: deploy/k8s/validate.sh            (exit 0: all good, 1: a check failed,
#                                                   77: kubectl or PyYAML missing)
#
# What it checks, with no cluster:
#   - `kubectl kustomize` renders each directory (YAML syntax, kustomization fields, patch
#     targets, strategic merges against kustomize's built-in schema);
#   - every document has apiVersion, kind and metadata.name, no namespace (the manifests are
#     namespace-less), and no (kind, name) twice;
#   - the objects the deployment needs exist: Deployment moepool-coordinator (1 replica,
#     Recreate), StatefulSet moepool-worker with its headless Service, Services moepool-api and
#     moepool-cluster, Secret moepool-secrets, ConfigMap moepool-config, PVC moepool-model,
#     PodDisruptionBudget moepool-worker (maxUnavailable 1);
#   - cross references: selectors match the pod labels, every Service targetPort and probe port
#     is a declared containerPort, every mount has a volume, every Secret / ConfigMap / PVC and
#     key referred to exists, every $(VAR) in command/args is an env var of the container,
#     resourceFieldRefs name a container with that limit;
#   - the command lines: the coordinator's --listen port is the probed and Service port, its
#     --cluster-listen port is what moepool-cluster targets and what the workers --join; workers
#     --advertise $(POD_IP) (downward API) with their --listen port, --data-port is the declared
#     "data" port, --listen is the gRPC probe port; --cluster-token-file and --api-key-file are
#     files of the Secret's mount, --cache-dir is on a volumeClaimTemplate, --model (from the
#     ConfigMap) is on the model PVC; no secret on a command line (--cluster-token, --api-key)
#     and no --insecure; with the moepool binary (MOEPOOL_BINARY, default build/cli/moepool)
#     every flag is one that `moepool serve|worker --help` lists;
#   - pods run as non-root uid 10001, allowPrivilegeEscalation false, read-only root, requests
#     and limits for cpu and memory, terminationGracePeriodSeconds >= 30, startup probes that
#     allow >= 10 minutes, no preStop hook; CPU workers' --memory below their memory limit;
#   - field names of the workload, pod, container, probe, security context, Service and PDB
#     specs are ones the Kubernetes API has (typos render fine through kustomize);
#   - the Secret holds only placeholders (every value line contains REPLACE-ME);
#   - per overlay: cpu -> image moepool:cpu, --device cpu; gpu -> image moepool:cuda,
#     nvidia.com/gpu limit, --device cuda:N, a GPU nodeSelector and toleration, and the same
#     worker command line as cpu otherwise; pool-4 -> 4 workers.
#
# What it does not check offline: the Kubernetes API schema itself (field names and types as an
# API server knows them). `kubectl apply --dry-run=client` needs a server for API discovery (it
# dials localhost:8080 without a kubeconfig: that is moepool's own default port) and no schema
# validator (kubeconform, kubeval) is installed here. With a cluster at hand, set
# MOEPOOL_K8S_SERVER_DRY_RUN=1 to also run `kubectl apply --dry-run=server` on each rendering
# against the current kubeconfig context.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

missing() {  # kubectl is not packaged for Debian 12 in a usable version: skip, in CI too
  echo "validate.sh: skipped: $1" >&2
  exit 77
}
command -v kubectl >/dev/null 2>&1 || missing "kubectl not found (needed for kubectl kustomize)"
python3 -c 'import yaml' 2>/dev/null || missing "python3 with PyYAML (import yaml) not found"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

dirs=(base)
for d in "$here"/overlays/*/; do
  [ -f "$d/kustomization.yaml" ] && dirs+=("overlays/$(basename "$d")")
done

status=0
for d in "${dirs[@]}"; do
  name=${d//\//_}
  if ! kubectl kustomize "$here/$d" >"$out/$name.yaml" 2>"$out/$name.err"; then
    echo "FAIL $d: kubectl kustomize failed:" >&2
    cat "$out/$name.err" >&2
    status=1
    continue
  fi
  echo "rendered $d: $(grep -c '^kind:' "$out/$name.yaml") objects"
done
[ $status -eq 0 ] || exit 1

binary=${MOEPOOL_BINARY:-$root/build/cli/moepool}
python3 - "$out" "$binary" "${dirs[@]}" <<'PY' || status=1
import os
import re
import subprocess
import sys

import yaml

out, binary, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
failures = []


def fail(where, msg):
    failures.append(f"{where}: {msg}")


def load(d):
    with open(os.path.join(out, d.replace("/", "_") + ".yaml")) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# Flags that `moepool serve|worker --help` lists (None: no binary, not checked).
def help_flags(sub):
    if not os.access(binary, os.X_OK):
        return None
    try:
        text = subprocess.run([binary, sub, "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(re.findall(r"^\s+--([a-z0-9-]+)", text, re.M))


FLAGS = {"serve": help_flags("serve"), "worker": help_flags("worker")}

K8S_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "": 1}


def k8s_bytes(q):
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * K8S_UNITS[m.group(2)] if m and m.group(2) in K8S_UNITS else None


def moepool_bytes(s):
    m = re.fullmatch(r"([0-9.]+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?", s)
    if not m:
        return None
    unit = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
            "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)]
    return float(m.group(1)) * unit


def arg_value(args, flag):
    """The value of --flag in args (None when absent); --flag=value is accepted too."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def port_of(address):
    return int(address.rsplit(":", 1)[1])


# Field names of the objects these manifests use (Kubernetes 1.30 API), to catch typos that
# kustomize lets through (an unknown field renders fine and a server drops or rejects it).
FIELDS = {
    "Deployment.spec": "replicas selector template strategy minReadySeconds revisionHistoryLimit "
                       "progressDeadlineSeconds paused",
    "StatefulSet.spec": "replicas selector template serviceName volumeClaimTemplates "
                        "podManagementPolicy updateStrategy revisionHistoryLimit minReadySeconds "
                        "persistentVolumeClaimRetentionPolicy ordinals",
    "Service.spec": "type selector ports clusterIP clusterIPs publishNotReadyAddresses "
                    "sessionAffinity sessionAffinityConfig externalTrafficPolicy "
                    "internalTrafficPolicy ipFamilies ipFamilyPolicy loadBalancerIP "
                    "loadBalancerSourceRanges loadBalancerClass externalIPs externalName "
                    "healthCheckNodePort allocateLoadBalancerNodePorts trafficDistribution",
    "PodDisruptionBudget.spec": "maxUnavailable minAvailable selector unhealthyPodEvictionPolicy",
    "pod": "containers initContainers volumes securityContext terminationGracePeriodSeconds "
           "affinity nodeSelector tolerations serviceAccountName automountServiceAccountToken "
           "enableServiceLinks priorityClassName topologySpreadConstraints dnsPolicy dnsConfig "
           "hostname subdomain imagePullSecrets restartPolicy runtimeClassName schedulerName "
           "shareProcessNamespace hostNetwork hostPID hostIPC hostUsers hostAliases "
           "activeDeadlineSeconds preemptionPolicy overhead readinessGates os setHostnameAsFQDN "
           "resourceClaims schedulingGates ephemeralContainers nodeName",
    "container": "name image imagePullPolicy command args env envFrom ports resources "
                 "securityContext volumeMounts volumeDevices startupProbe readinessProbe "
                 "livenessProbe lifecycle workingDir terminationMessagePath "
                 "terminationMessagePolicy stdin stdinOnce tty resizePolicy restartPolicy",
    "probe": "httpGet grpc tcpSocket exec initialDelaySeconds periodSeconds timeoutSeconds "
             "successThreshold failureThreshold terminationGracePeriodSeconds",
    "containerSecurityContext": "allowPrivilegeEscalation readOnlyRootFilesystem runAsNonRoot "
                                "runAsUser runAsGroup capabilities privileged seccompProfile "
                                "seLinuxOptions procMount windowsOptions appArmorProfile",
    "podSecurityContext": "runAsNonRoot runAsUser runAsGroup fsGroup fsGroupChangePolicy "
                          "seccompProfile seLinuxOptions supplementalGroups sysctls "
                          "windowsOptions appArmorProfile",
}
FIELDS = {k: set(v.split()) for k, v in FIELDS.items()}


def unknown_fields(where, obj, kind):
    for k in (obj or {}):
        if k not in FIELDS[kind]:
            fail(where, f"unknown field {k!r} in {kind}")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check(d):
    docs = load(d)
    seen = set()
    by = {}
    for i, doc in enumerate(docs):
        where = f"{d} document {i}"
        for field in ("apiVersion", "kind"):
            if not doc.get(field):
                fail(where, f"no {field}")
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            fail(where, "no metadata.name")
            continue
        if "namespace" in meta:
            fail(where, f"{doc.get('kind')}/{meta['name']} sets a namespace")
        key = (doc.get("kind"), meta["name"])
        if key in seen:
            fail(where, f"{key[0]}/{key[1]} twice")
        seen.add(key)
        by[key] = doc
        if f"{doc.get('kind')}.spec" in FIELDS:
            unknown_fields(f"{d} {key[0]}/{key[1]}", doc.get("spec"), f"{doc['kind']}.spec")

    def need(kind, name):
        obj = by.get((kind, name))
        if obj is None:
            fail(d, f"no {kind} {name}")
        return obj

    coord = need("Deployment", "moepool-coordinator")
    workers = need("StatefulSet", "moepool-worker")
    api = need("Service", "moepool-api")
    cluster = need("Service", "moepool-cluster")
    secret = need("Secret", "moepool-secrets")
    config = need("ConfigMap", "moepool-config")
    need("PersistentVolumeClaim", "moepool-model")
    pdb = need("PodDisruptionBudget", "moepool-worker")
    if None in (coord, workers, api, cluster, secret, config, pdb):
        return

    # The Secret: placeholders only.
    import base64
    values = dict(secret.get("stringData") or {})
    for k, v in (secret.get("data") or {}).items():
        values[k] = base64.b64decode(v).decode("utf-8", "replace")
    for k, v in values.items():
        lines = [l for l in str(v).splitlines() if l.strip() and not l.lstrip().startswith("#")]
        if not lines or not all("REPLACE-ME" in l for l in lines):
            fail(d, f"Secret moepool-secrets key {k} holds something other than a REPLACE-ME "
                    "placeholder: keep real secrets out of the repository")
    secret_keys = set(values)
    config_data = config.get("data") or {}

    workloads = [o for o in docs if o.get("kind") in ("Deployment", "StatefulSet")]
    pvcs = {o["metadata"]["name"] for o in docs if o.get("kind") == "PersistentVolumeClaim"}

    def pod_labels(w):
        return w["spec"]["template"]["metadata"].get("labels") or {}

    for w in workloads:
        where = f"{d} {w['kind']}/{w['metadata']['name']}"
        sel = w["spec"].get("selector", {}).get("matchLabels") or {}
        if not matches(sel, pod_labels(w)):
            fail(where, "selector does not match the pod template's labels")

    def container_ports(w):
        ports = {}
        for c in w["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports") or []:
                ports[p["containerPort"]] = p
                if p.get("name"):
                    ports[p["name"]] = p
        return ports

    def resolve_port(w, port):
        p = container_ports(w).get(port)
        return p["containerPort"] if p else None

    # Services: each selects a workload and targets declared ports.
    for svc in (o for o in docs if o.get("kind") == "Service"):
        where = f"{d} Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector") or {}
        targets = [w for w in workloads if matches(sel, pod_labels(w))]
        if len(targets) != 1:
            fail(where, f"selects {len(targets)} workloads, expected 1")
            continue
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort", p["port"])
            if resolve_port(targets[0], tp) is None:
                fail(where, f"targetPort {tp} is not a containerPort of "
                            f"{targets[0]['metadata']['name']}")
    if not matches(pdb["spec"].get("selector", {}).get("matchLabels") or {}, pod_labels(workers)):
        fail(d, "PodDisruptionBudget moepool-worker does not select the workers")
    if pdb["spec"].get("maxUnavailable") != 1:
        fail(d, "PodDisruptionBudget moepool-worker: maxUnavailable is not 1")
    headless = by.get(("Service", workers["spec"].get("serviceName")))
    if headless is None or headless["spec"].get("clusterIP") != "None":
        fail(d, "StatefulSet moepool-worker: serviceName is not a headless Service")
    if coord["spec"].get("replicas") != 1 or coord["spec"].get("strategy", {}).get("type") != "Recreate":
        fail(d, "Deployment moepool-coordinator: want replicas 1 and strategy Recreate")

    def check_pod(w):
        """Generic pod checks; returns {container name: (container, args, env names, mounts)}."""
        where = f"{d} {w['kind']}/{w['metadata']['name']}"
        spec = w["spec"]["template"]["spec"]
        psc = spec.get("securityContext") or {}
        unknown_fields(where, spec, "pod")
        unknown_fields(where, psc, "podSecurityContext")
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 10001:
            fail(where, "pod securityContext: want runAsNonRoot true and runAsUser 10001")
        if (spec.get("terminationGracePeriodSeconds") or 30) < 30:
            fail(where, "terminationGracePeriodSeconds < 30: too short to drain")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
        for name, v in volumes.items():
            if "secret" in v:
                if v["secret"].get("secretName") != "moepool-secrets":
                    fail(where, f"volume {name}: unknown Secret {v['secret'].get('secretName')}")
                for item in v["secret"].get("items") or []:
                    if item["key"] not in secret_keys:
                        fail(where, f"volume {name}: Secret has no key {item['key']}")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                fail(where, f"volume {name}: no PVC {v['persistentVolumeClaim']['claimName']}")
        result = {}
        for c in spec["containers"]:
            cw = f"{where} container {c['name']}"
            unknown_fields(cw, c, "container")
            unknown_fields(cw, c.get("securityContext"), "containerSecurityContext")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                unknown_fields(f"{cw} {probe}", c.get(probe), "probe")
            if not c.get("image") or c["image"].endswith(":latest") or ":" not in c["image"]:
                fail(cw, f"image {c.get('image')!r}: want a fixed tag")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        fail(cw, f"no resources.{kind}.{r}")
            csc = c.get("securityContext") or {}
            if csc.get("allowPrivilegeEscalation") is not False:
                fail(cw, "allowPrivilegeEscalation is not false")
            if csc.get("readOnlyRootFilesystem") is not True:
                fail(cw, "readOnlyRootFilesystem is not true")
            if (c.get("lifecycle") or {}).get("preStop"):
                fail(cw, "has a preStop hook: SIGTERM drains by itself")
            mounts = {}
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in templates:
                    fail(cw, f"mount {m['name']} has no volume")
                mounts[m["mountPath"]] = (m["name"], volumes.get(m["name"]), m["name"] in templates)
            env = {}
            for e in c.get("env") or []:
                env[e["name"]] = e
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    if ref["name"] != "moepool-config" or ref["key"] not in config_data:
                        fail(cw, f"env {e['name']}: no ConfigMap key {ref['name']}/{ref['key']}")
                if "secretKeyRef" in vf:
                    ref = vf["secretKeyRef"]
                    if ref["name"] != "moepool-secrets" or ref["key"] not in secret_keys:
                        fail(cw, f"env {e['name']}: no Secret key {ref['name']}/{ref['key']}")
                if "resourceFieldRef" in vf:
                    ref = vf["resourceFieldRef"]
                    kind, _, r = ref["resource"].partition(".")
                    if ref.get("containerName", c["name"]) != c["name"] or r not in (res.get(kind) or {}):
                        fail(cw, f"env {e['name']}: no {ref['resource']} on this container")
            args = list(c.get("command") or []) + list(c.get("args") or [])
            for a in args:
                for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    if var not in env:
                        fail(cw, f"$({var}) in the command line is not an env var")
            for bad in ("--cluster-token", "--api-key", "--insecure"):
                if any(a == bad or a.startswith(bad + "=") for a in args):
                    fail(cw, f"{bad} on the command line (use the *-file flags)")
            sub = (c.get("args") or [None])[0]
            flags = FLAGS.get(sub)
            if flags is not None:
                for a in c.get("args") or []:
                    if a.startswith("--") and a[2:].split("=")[0] not in flags:
                        fail(cw, f"{a}: not a flag of `moepool {sub} --help`")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if p is None:
                    fail(cw, f"no {probe}")
                    continue
                port = (p.get("httpGet") or p.get("grpc") or p.get("tcpSocket") or {}).get("port")
                if resolve_port(w, port) is None:
                    fail(cw, f"{probe} port {port} is not a declared containerPort")
            sp = c.get("startupProbe") or {}
            if sp and sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) < 600:
                fail(cw, "startupProbe allows less than 10 minutes (loading or fetching takes "
                         "minutes)")

            def on_mount(path, want):
                """The mount holding path, checked to be of kind `want`."""
                for mp, (name, vol, is_template) in mounts.items():
                    if path.startswith(mp.rstrip("/") + "/") or path == mp:
                        ok = {"secret": vol is not None and "secret" in vol,
                              "pvc": vol is not None and "persistentVolumeClaim" in vol,
                              "template": is_template}[want]
                        if not ok:
                            fail(cw, f"{path} is on mount {name}, not a {want} volume")
                        return vol
                fail(cw, f"{path} is on no mounted volume")
                return None

            for flag in ("--cluster-token-file", "--api-key-file"):
                path = arg_value(args, flag)
                if path is None:
                    continue
                vol = on_mount(path, "secret")
                if vol is not None:
                    items = vol["secret"].get("items")
                    names = {i["path"] for i in items} if items else secret_keys
                    if os.path.basename(path) not in names:
                        fail(cw, f"{flag} {path}: the Secret volume has no such file")
            result[c["name"]] = dict(c=c, args=c.get("args") or [], env=env, on_mount=on_mount,
                                     where=cw)
        return result

    coord_c = check_pod(coord).get("coordinator")
    worker_c = check_pod(workers).get("worker")
    if coord_c is None or worker_c is None:
        fail(d, "want containers named coordinator and worker")
        return
    ca, wa = coord_c["args"], worker_c["args"]

    # Coordinator command line.
    cw = coord_c["where"]
    if ca[:1] != ["serve"]:
        fail(cw, "args do not start with serve")
    for flag in ("--model", "--listen", "--cluster-listen", "--cluster-token-file", "--api-key-file"):
        if arg_value(ca, flag) is None:
            fail(cw, f"no {flag}")
    model = arg_value(ca, "--model") or ""
    m = re.fullmatch(r"\$\(([A-Za-z_0-9]+)\)", model)
    if m:
        ref = ((coord_c["env"].get(m.group(1)) or {}).get("valueFrom") or {}).get("configMapKeyRef")
        model = config_data.get(ref["key"], "") if ref else ""
    if model:
        coord_c["on_mount"](model, "pvc")
    listen = arg_value(ca, "--listen")
    cluster_listen = arg_value(ca, "--cluster-listen")
    if listen:
        http_port = port_of(listen)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            g = (coord_c["c"].get(probe) or {}).get("httpGet") or {}
            if g.get("path") != "/health" or resolve_port(coord, g.get("port")) != http_port:
                fail(cw, f"{probe} is not httpGet /health on the --listen port {http_port}")
        if resolve_port(coord, api["spec"]["ports"][0].get("targetPort")) != http_port:
            fail(d, "Service moepool-api does not target the coordinator's --listen port")
    if cluster_listen:
        cport = port_of(cluster_listen)
        if resolve_port(coord, cluster["spec"]["ports"][0].get("targetPort")) != cport:
            fail(d, "Service moepool-cluster does not target the coordinator's --cluster-listen port")

    # Worker command line.
    ww = worker_c["where"]
    if wa[:1] != ["worker"]:
        fail(ww, "args do not start with worker")
    join = arg_value(wa, "--join")
    if join is None:
        fail(ww, "no --join")
    else:
        host, port = join.rsplit(":", 1)
        svc = by.get(("Service", host.split(".")[0]))
        sp = [p for p in (svc or {}).get("spec", {}).get("ports", []) if p["port"] == int(port)]
        if not sp or not cluster_listen or resolve_port(coord, sp[0].get("targetPort")) != port_of(cluster_listen):
            fail(ww, f"--join {join} does not reach the coordinator's --cluster-listen")
    wl = arg_value(wa, "--listen")
    if wl is None:
        fail(ww, "no --listen")
    else:
        lp = port_of(wl)
        if arg_value(wa, "--advertise") != f"$(POD_IP):{lp}":
            fail(ww, f"--advertise is not $(POD_IP):{lp}")
        pod_ip = (worker_c["env"].get("POD_IP") or {}).get("valueFrom", {}).get("fieldRef", {})
        if pod_ip.get("fieldPath") != "status.podIP":
            fail(ww, "env POD_IP is not the downward API's status.podIP")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if ((worker_c["c"].get(probe) or {}).get("grpc") or {}).get("port") != lp:
                fail(ww, f"{probe} is not a gRPC probe of the --listen port {lp}")
    dp = arg_value(wa, "--data-port")
    if dp is None or not dp.isdigit() or resolve_port(workers, "data") != int(dp):
        fail(ww, f"--data-port {dp} is not the declared containerPort named data")
    cache = arg_value(wa, "--cache-dir")
    if cache is None:
        fail(ww, "no --cache-dir")
    else:
        worker_c["on_mount"](cache, "template")
    if arg_value(wa, "--cluster-token-file") is None:
        fail(ww, "no --cluster-token-file")
    device = arg_value(wa, "--device") or "cpu"
    limits = worker_c["c"].get("resources", {}).get("limits", {})
    if device == "cpu":
        mem, lim = arg_value(wa, "--memory"), k8s_bytes(limits.get("memory", ""))
        if mem is None:
            fail(ww, "CPU worker without --memory: its default is the node's free memory, "
                     "not the container's limit")
        elif moepool_bytes(mem) is None or lim is None or moepool_bytes(mem) >= lim:
            fail(ww, f"--memory {mem} is not below limits.memory {limits.get('memory')}")
    return dict(docs=docs, coord=coord_c, worker=worker_c, workers=workers, device=device,
                limits=limits)


rendered = {}
for d in dirs:
    r = check(d)
    if r:
        rendered[d] = r

# Per-overlay expectations.
def image(r, which):
    return r[which]["c"]["image"]


if "overlays/cpu" in rendered:
    r = rendered["overlays/cpu"]
    if image(r, "coord") != "moepool:cpu" or image(r, "worker") != "moepool:cpu":
        fail("overlays/cpu", "images are not moepool:cpu")
    if r["device"] != "cpu":
        fail("overlays/cpu", "workers are not --device cpu")
if "overlays/gpu" in rendered:
    r = rendered["overlays/gpu"]
    spec = r["workers"]["spec"]["template"]["spec"]
    if image(r, "coord") != "moepool:cuda" or image(r, "worker") != "moepool:cuda":
        fail("overlays/gpu", "images are not moepool:cuda")
    if not re.fullmatch(r"cuda:\d+", r["device"]):
        fail("overlays/gpu", f"workers are --device {r['device']}, not cuda:N")
    if str(r["limits"].get("nvidia.com/gpu")) != "1":
        fail("overlays/gpu", "workers have no nvidia.com/gpu: 1 limit")
    if not spec.get("nodeSelector") or not any(
            t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
        fail("overlays/gpu", "workers have no GPU nodeSelector and nvidia.com/gpu toleration")
    if "overlays/cpu" in rendered:
        # The gpu patch replaces the worker args as a whole: it must stay the cpu command line
        # but for --device and --memory.
        def strip(args):
            out, skip = [], False
            for a in args:
                if skip:
                    skip = False
                    continue
                if a in ("--device", "--memory"):
                    skip = True
                    continue
                out.append(a)
            return out
        if strip(r["worker"]["args"]) != strip(rendered["overlays/cpu"]["worker"]["args"]):
            fail("overlays/gpu", "worker args differ from the cpu overlay's beyond --device and "
                                 "--memory: update deploy/k8s/overlays/gpu/worker-gpu.yaml")
if "overlays/pool-4" in rendered:
    if rendered["overlays/pool-4"]["workers"]["spec"].get("replicas") != 4:
        fail("overlays/pool-4", "StatefulSet moepool-worker does not have 4 replicas")
if rendered.get("base") and rendered["base"]["workers"]["spec"].get("replicas") != 2:
    fail("base", "StatefulSet moepool-worker does not have 2 replicas")

if FLAGS["serve"] is None:
    print(f"note: {binary} not runnable: flags not checked against `moepool --help`")
for d, r in rendered.items():
    print(f"{d}: coordinator: {' '.join(r['coord']['args'])}")
    print(f"{d}: worker:      {' '.join(r['worker']['args'])}")
if failures:
    for f in failures:
        print("FAIL " + f, file=sys.stderr)
    sys.exit(1)
print(f"ok: {len(rendered)} renderings checked")
PY

if [ "${MOEPOOL_K8S_SERVER_DRY_RUN:-}" = "1" ]; then
  for d in "${dirs[@]}"; do
    [ "$d" = base ] && continue
    echo "server dry run: $d"
    kubectl apply --dry-run=server -f "$out/${d//\//_}.yaml" || status=1
  done
else
  echo "not checked: the API schema (needs a cluster: MOEPOOL_K8S_SERVER_DRY_RUN=1)"
fi
exit $status
