#!/usr/bin/env python3
"""Validates the deployment files and checks they agree with the binaries.

    python3 .ci/check-deploy.py [--schemas DIR] [--kubernetes-version 1.31.0]

1. Renders every overlay under k8s/overlays with `kubectl kustomize`.
2. Validates what renders: built-in kinds with `kubernetes-validate --strict` at a
   pinned Kubernetes version; custom resources (KEDA, Prometheus operator, Gateway
   API, External Secrets, cert-manager) against the JSON schemas in ../shared/schemas,
   one document at a time. A custom resource without a schema fails: nothing is
   skipped silently.
3. Validates the GitHub workflows against the GitHub workflow schema.
4. Checks consistency with the code: ports, probe paths, metric ports and grace
   periods in the manifests and docker-compose.yml against the defaults and timeouts
   the binaries are built with (read from their settings source).
5. Runs checkov on the dev overlay: its PostgreSQL and Redis pass what the services
   pass, or a waiver says why (.ci/checkov-waivers.yaml).
6. Checks the alert rules with promtool (syntax and `.ci/alerts-test.yaml`), their
   runbooks and the label kube-prometheus-stack selects them by.
7. Models what a cluster would do that a schema cannot see: the order Argo CD syncs
   each overlay in (hook phases, sync waves, kind order; `check_sync_order`), and
   Deployments whose replicas an autoscaler owns.
"""

import argparse
import copy
import ipaddress
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io",
                  "rbac.authorization.k8s.io"}
failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


def run(args, **kwargs):
    return subprocess.run(args, check=False, text=True, capture_output=True, **kwargs)


def rust_default(path, pattern):
    """The first capture of `pattern` in a Rust source file."""
    match = re.search(pattern, (ROOT / path).read_text())
    if not match:
        sys.exit(f"cannot find {pattern!r} in {path}: update .ci/check-deploy.py")
    return match.group(1)


def binary_defaults():
    defaults = {}
    for binary, crate, settings in [("mobile-api", "api", "ApiSettings"),
                                    ("mobile-gateway", "gateway", "GatewaySettings"),
                                    ("mobile-worker", "worker", "WorkerSettings")]:
        source = f"crates/{crate}/src/settings.rs"
        listen = rust_default(source, r'listen_addr: "[^"]*:(\d+)"')
        metrics = rust_default(source, r'metrics_addr: "[^"]*:(\d+)"')
        defaults[binary] = {"http": int(listen), "metrics": int(metrics)}
    shutdown = int(rust_default("crates/runtime/src/settings.rs",
                                r'"SHUTDOWN_TIMEOUT_SECONDS",\s*(\d+)'))
    image_timeout = int(rust_default("crates/worker/src/settings.rs",
                                     r'"IMAGE_JOB_TIMEOUT_SECONDS",\s*(\d+)'))
    push_timeout = int(rust_default("crates/worker/src/settings.rs",
                                    r'"PUSH_JOB_TIMEOUT_SECONDS",\s*(\d+)'))
    live = rust_default("crates/runtime/src/health.rs", r'"(/health/live)"')
    ready = rust_default("crates/runtime/src/health.rs", r'"(/health/ready)"')
    return defaults, shutdown, max(image_timeout, push_timeout), live, ready


def api_limits():
    """What the proxies in front of the API must allow: seconds and bytes."""
    api = "crates/api/src/settings.rs"
    return {
        "request": int(rust_default(api, r'"REQUEST_TIMEOUT_SECONDS",\s*(\d+)')),
        "upload": int(rust_default(api, r'"UPLOAD_TIMEOUT_SECONDS",\s*(\d+)')),
        "media_bytes": eval_int(rust_default(api, r'"MEDIA_MAX_BYTES",\s*([\d *]+)\)')),
        "check": int(rust_default("crates/runtime/src/health.rs",
                                  r"CHECK_TIMEOUT: Duration = Duration::from_secs\((\d+)\)")),
        "upload_path": rust_default("crates/api/src/routes/media.rs",
                                    r'UPLOAD_PATH: &str = "([^"]+)"'),
    }


def eval_int(expression):
    """`20 * 1024 * 1024` → 20971520 (a product of integers only)."""
    value = 1
    for factor in expression.split("*"):
        value *= int(factor.strip())
    return value


def seconds(duration):
    """A Gateway API duration (`30s`, `10m`, `1h`) or nginx's bare seconds, in seconds."""
    total = 0
    for amount, unit in re.findall(r"(\d+)(ms|h|m|s)?", str(duration)):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "": 1}[unit]
    return total


def size_bytes(size):
    """nginx's `21m`, `512k` or bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", str(size).lower())
    if not match:
        return 0
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)]


def route_for(rules, path, method):
    """The HTTPRoute rule a request takes (Gateway API precedence: an Exact path before
    the longest prefix, a rule matching the method before one matching any)."""
    best, best_rank = None, None
    for rule in rules:
        for match in rule.get("matches", [{}]):
            kind = match.get("path", {}).get("type", "PathPrefix")
            value = match.get("path", {}).get("value", "/")
            if kind == "Exact" and value != path:
                continue
            if kind == "PathPrefix" and not (path == value or path.startswith(value.rstrip("/") + "/")):
                continue
            if match.get("method") not in (None, method):
                continue
            rank = (kind == "Exact", len(value), match.get("method") is not None)
            if best_rank is None or rank > best_rank:
                best, best_rank = rule, rank
    return best


def check_timeouts(overlay, docs, limits):
    """The proxies let an upload take as long as the API does, and every other request
    as long as REQUEST_TIMEOUT_SECONDS; probes wait longer than the checks' budget."""
    upload_path = limits["upload_path"]
    for doc in docs:
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "HTTPRoute":
            rules = doc["spec"]["rules"]
            for method, path, floor in (("POST", upload_path, limits["upload"]),
                                        ("GET", "/v1/me", limits["request"])):
                rule = route_for(rules, path, method)
                if rule is None:
                    continue
                timeout = rule.get("timeouts", {}).get("request")
                if timeout is None and method == "POST":
                    # Implementations default to 15-30 s: an upload needs its own.
                    fail(f"{where}: {method} {path} has no request timeout of its own")
                elif timeout is not None and seconds(timeout) <= floor:
                    fail(f"{where}: {method} {path} is cut at {timeout}, but the API allows "
                         f"it {floor} s")
        elif doc["kind"] == "Ingress" and doc["spec"].get("ingressClassName") == "nginx":
            notes = doc["metadata"].get("annotations", {})
            for name in ("proxy-read-timeout", "proxy-send-timeout"):
                value = notes.get(f"nginx.ingress.kubernetes.io/{name}", "60")
                if seconds(value) <= limits["upload"]:
                    fail(f"{where}: {name} {value} s cuts an upload the API allows "
                         f"{limits['upload']} s")
            if notes.get("nginx.ingress.kubernetes.io/proxy-request-buffering") != "off":
                fail(f"{where}: proxy-request-buffering must be off, or nginx holds whole "
                     "uploads and the API cannot judge their pace")
            body = notes.get("nginx.ingress.kubernetes.io/proxy-body-size", "1m")
            if size_bytes(body) <= limits["media_bytes"]:
                fail(f"{where}: proxy-body-size {body} refuses uploads the API accepts "
                     f"({limits['media_bytes']} bytes)")
        elif doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if not (container.get("command") or [""])[0].startswith("mobile-"):
                    continue  # postgres, redis in dev
                probe = container.get("readinessProbe")
                if probe and probe.get("timeoutSeconds", 1) <= limits["check"]:
                    fail(f"{where}: readinessProbe timeoutSeconds "
                         f"{probe.get('timeoutSeconds', 1)} must exceed the checks' own "
                         f"budget ({limits['check']} s)")
    print(f"ok   {overlay}: proxy timeouts and body sizes, probe timeouts")


def render_overlays(out_dir):
    rendered = {}
    for overlay in sorted((ROOT / "k8s/overlays").iterdir()):
        if not (overlay / "kustomization.yaml").exists():
            continue
        result = run(["kubectl", "kustomize", str(overlay)])
        if result.returncode != 0:
            fail(f"kubectl kustomize {overlay.relative_to(ROOT)}: {result.stderr.strip()}")
            continue
        path = out_dir / f"{overlay.name}.yaml"
        path.write_text(result.stdout)
        rendered[overlay.name] = (path, [d for d in yaml.safe_load_all(result.stdout) if d])
        # `kubectl apply -k` twice in a row must be a no-op: the render may not change
        # between runs (a generated name or value that does would re-apply, and make the
        # migration Job's immutable template fail).
        again = run(["kubectl", "kustomize", str(overlay)])
        if again.stdout != result.stdout:
            fail(f"kubectl kustomize {overlay.relative_to(ROOT)} renders differently each time")
        print(f"ok   kubectl kustomize {overlay.relative_to(ROOT)} "
              f"({len(rendered[overlay.name][1])} objects, the same twice)")
    return rendered


def validate_builtin(rendered, version):
    for name, (path, _) in rendered.items():
        result = run(["kubernetes-validate", "--strict", "--quiet", "-k", version, str(path)])
        errors = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "Couldn't find schema" not in line]
        if result.returncode != 0 or errors:
            fail(f"kubernetes-validate --strict -k {version} {name}:\n  " + "\n  ".join(errors))
        else:
            print(f"ok   kubernetes-validate --strict -k {version} {name}")


def validate_custom(rendered, schemas):
    for name, (_, docs) in rendered.items():
        for index, doc in enumerate(docs):
            group, _, version = doc["apiVersion"].rpartition("/")
            if group in BUILTIN_GROUPS:
                continue
            kind = doc["kind"]
            schema = schemas / group / f"{kind.lower()}_{version}.json"
            if not schema.exists():
                # Written here for what ../shared/schemas does not carry (.ci/schemas).
                schema = ROOT / ".ci/schemas" / group / f"{kind.lower()}_{version}.json"
            label = f"{name}: {kind} {doc['metadata']['name']} ({doc['apiVersion']})"
            if not schema.exists():
                fail(f"{label}: no schema at {schema}")
                continue
            errors = schema_errors(json.loads(schema.read_text()), doc)
            if errors:
                fail(f"{label}:\n  " + "\n  ".join(errors))
            else:
                print(f"ok   {label} against {schema.name}")


def schema_errors(schema, doc):
    """Validates with the `jsonschema` library (what check-jsonschema runs on) rather
    than the CLI: the CLI first checks the schema itself, and these schemas hold Go
    regexes (`^(?i)(abort|warn)?$`) that no Python or ECMAScript checker accepts. A
    pattern is compiled here only if the document has the field it constrains."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def validate_workflows():
    workflows = sorted((ROOT / ".github/workflows").glob("*.y*ml"))
    if not workflows:
        fail("no workflows in .github/workflows")
        return
    result = run(["check-jsonschema", "--builtin-schema", "vendor.github-workflows",
                  *map(str, workflows)])
    if result.returncode != 0:
        fail(f"GitHub workflows:\n{result.stdout}{result.stderr}")
    else:
        print(f"ok   {len(workflows)} workflows against the GitHub workflow schema")
    argo = ROOT / "k8s/argocd/application.yaml"
    if argo.exists():
        doc = yaml.safe_load(argo.read_text())
        path = doc.get("spec", {}).get("source", {}).get("path", "")
        if not (ROOT / path / "kustomization.yaml").exists():
            fail(f"{argo.relative_to(ROOT)}: spec.source.path {path!r} is not an overlay")


def env_value(container, name):
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry.get("value")
    return None


def check_deployments(rendered, defaults, shutdown_default, longest_job, live, ready):
    for overlay, (_, docs) in rendered.items():
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            spec = doc["spec"]
            pod = spec["template"]["spec"]
            container = pod["containers"][0]
            binary = (container.get("command") or [""])[0]
            if binary not in defaults:
                continue  # postgres, redis in dev
            where = f"{overlay}: Deployment {doc['metadata']['name']}"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            expected = defaults[binary]
            for port_name in ("http", "metrics"):
                if ports.get(port_name) != expected[port_name]:
                    fail(f"{where}: port {port_name} is {ports.get(port_name)}, "
                         f"{binary} listens on {expected[port_name]}")
            for var, port_name in (("LISTEN_ADDR", "http"), ("METRICS_ADDR", "metrics")):
                value = env_value(container, var)
                if value is not None and not value.endswith(f":{ports.get(port_name)}"):
                    fail(f"{where}: {var}={value} but the {port_name} port is {ports.get(port_name)}")
            for probe, path in (("startupProbe", live), ("livenessProbe", live),
                                ("readinessProbe", ready)):
                got = container.get(probe, {}).get("httpGet", {})
                if got.get("path") != path or got.get("port") != "http":
                    fail(f"{where}: {probe} should GET {path} on port http, has {got}")
            rolling = spec.get("strategy", {}).get("rollingUpdate", {})
            if rolling.get("maxSurge") != 1 or rolling.get("maxUnavailable") != 0:
                fail(f"{where}: RollingUpdate must be maxSurge 1, maxUnavailable 0")
            pre_stop = (container.get("lifecycle", {}).get("preStop", {})
                        .get("sleep", {}).get("seconds"))
            if not pre_stop:
                fail(f"{where}: no preStop sleep")
                pre_stop = 0
            drain = int(env_value(container, "SHUTDOWN_TIMEOUT_SECONDS") or shutdown_default)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= pre_stop + drain:
                fail(f"{where}: terminationGracePeriodSeconds {grace} must exceed "
                     f"preStop {pre_stop} + SHUTDOWN_TIMEOUT_SECONDS {drain}")
            if binary == "mobile-worker" and drain - 2 < longest_job:
                fail(f"{where}: the drain ({drain} s, jobs released 2 s before its end) is "
                     f"shorter than the longest job timeout ({longest_job} s)")
            security = container.get("securityContext", {})
            pod_security = pod.get("securityContext", {})
            if not (pod_security.get("runAsNonRoot") and security.get("readOnlyRootFilesystem")
                    and security.get("allowPrivilegeEscalation") is False
                    and security.get("capabilities", {}).get("drop") == ["ALL"]
                    and pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
                fail(f"{where}: not Pod Security 'restricted'")
            resources = container.get("resources", {})
            if not resources.get("requests") or not resources.get("limits"):
                fail(f"{where}: requests and limits are both required")
            service = services.get(doc["metadata"]["name"])
            if service is None:
                fail(f"{where}: no Service of the same name")
                continue
            service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            if service_ports.get("metrics") != expected["metrics"]:
                fail(f"{where}: Service port 'metrics' (scraped by the ServiceMonitor) is "
                     f"{service_ports.get('metrics')}, not {expected['metrics']}")
        print(f"ok   {overlay}: ports, probes, rollout, grace periods, security")
        check_routes(overlay, docs, services)


def check_routes(overlay, docs, services):
    def port_of(service, port):
        ports = {p["name"]: p["port"] for p in services[service]["spec"]["ports"]}
        return port if isinstance(port, int) else ports.get(port)

    for doc in docs:
        backends = []
        if doc["kind"] == "HTTPRoute":
            backends = [(b["name"], b["port"]) for rule in doc["spec"]["rules"]
                        for b in rule["backendRefs"]]
        elif doc["kind"] == "Ingress":
            backends = [(p["backend"]["service"]["name"],
                         p["backend"]["service"]["port"].get("name")
                         or p["backend"]["service"]["port"].get("number"))
                        for rule in doc["spec"]["rules"] for p in rule["http"]["paths"]]
        for service, port in backends:
            if service not in services or port_of(service, port) is None:
                fail(f"{overlay}: {doc['kind']} routes to {service}:{port}, which does not exist")


def check_compose(defaults, shutdown_default):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, binary in (("api", "mobile-api"), ("gateway", "mobile-gateway"),
                         ("worker", "mobile-worker")):
        service = services[name]
        if service["command"][0] != binary:
            fail(f"compose {name}: runs {service['command']}, expected {binary}")
        if service["healthcheck"]["test"] != ["CMD", binary, "health"]:
            fail(f"compose {name}: health check should be `{binary} health`")
        port = defaults[binary]["http"]
        if f"{port}:{port}" not in service.get("ports", []):
            fail(f"compose {name}: should publish {port}")
        grace = int(service.get("stop_grace_period", "10s").rstrip("s"))
        drain = int(service["environment"].get("SHUTDOWN_TIMEOUT_SECONDS", shutdown_default))
        if grace <= drain:
            fail(f"compose {name}: stop_grace_period {grace}s must exceed the drain {drain}s")
    prometheus = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0]
               for job in prometheus["scrape_configs"]}
    for binary, ports in defaults.items():
        target = targets.get(binary, "")
        if not target.endswith(f":{ports['metrics']}"):
            fail(f"deploy/compose/prometheus.yml: {binary} should be scraped on :{ports['metrics']}, is {target!r}")
    print("ok   docker-compose.yml and Prometheus targets agree with the binaries")


# Argo CD's order within a phase and wave (gitops-engine, pkg/sync/sync_tasks.go):
# kinds in this list first, in this order; every other kind (custom resources) after.
ARGO_KIND_ORDER = [
    "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap",
    "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList",
    "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass",
    "Ingress", "APIService",
]
ARGO_PHASES = {"PreSync": -1, "Sync": 0, "PostSync": 1}


def argo_step(doc):
    """Where Argo CD applies `doc`: (phase, wave, kind order, name), compared as a
    tuple. Objects without a hook annotation are in the Sync phase."""
    annotations = doc.get("metadata", {}).get("annotations") or {}
    phase = annotations.get("argocd.argoproj.io/hook", "Sync")
    try:
        wave = int(annotations.get("argocd.argoproj.io/sync-wave", "0"))
    except ValueError:
        wave = 0
    kind = doc.get("kind")
    order = ARGO_KIND_ORDER.index(kind) - len(ARGO_KIND_ORDER) if kind in ARGO_KIND_ORDER else 0
    return (ARGO_PHASES.get(phase, 0), wave, order, doc["metadata"]["name"])


def pod_references(spec):
    """(kind, name) of the ServiceAccount, ConfigMaps, Secrets and PVCs a pod needs."""
    refs = [("ServiceAccount", spec.get("serviceAccountName", "default"))]
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source and not source["configMapRef"].get("optional"):
                refs.append(("ConfigMap", source["configMapRef"]["name"]))
            if "secretRef" in source and not source["secretRef"].get("optional"):
                refs.append(("Secret", source["secretRef"]["name"]))
        for var in container.get("env", []):
            value_from = var.get("valueFrom", {})
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if key in value_from and not value_from[key].get("optional"):
                    refs.append((kind, value_from[key]["name"]))
    for volume in spec.get("volumes", []):
        if "configMap" in volume and not volume["configMap"].get("optional"):
            refs.append(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume and not volume["secret"].get("optional"):
            refs.append(("Secret", volume["secret"]["secretName"]))
        if "persistentVolumeClaim" in volume:
            refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for source in volume.get("projected", {}).get("sources", []):
            for key, kind, field in (("configMap", "ConfigMap", "name"),
                                     ("secret", "Secret", "name")):
                if key in source and not source[key].get("optional"):
                    refs.append((kind, source[key][field]))
    return refs


def service_account_refs(value):
    """Every `serviceAccountRef: {name}` in a custom resource (a SecretStore that
    authenticates with workload identity)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "serviceAccountRef" and isinstance(inner, dict) and "name" in inner:
                yield ("ServiceAccount", inner["name"])
            else:
                yield from service_account_refs(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from service_account_refs(inner)


def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc.get("kind") == "Pod":
        return spec
    if doc.get("kind") == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def check_sync_order(overlay, docs, create_namespace):
    """Orders `docs` as Argo CD syncs them and fails when an object needs a Namespace,
    ConfigMap, Secret, ServiceAccount or PVC that the same render creates only later.
    An object applied in the same phase and wave but earlier in kind order exists in
    time (one apply, in that order). A Secret made by an ExternalSecret exists only
    once Argo CD has seen the ExternalSecret healthy, which it waits for at the end of
    that wave: it must be in an earlier wave or phase. A referenced object the render
    does not create at all is a prerequisite made by hand (docs/deployment.md) and is
    not checked here."""
    failed_before = len(failures)
    created = {}
    for doc in docs:
        step = argo_step(doc)
        created[(doc["kind"], doc["metadata"]["name"])] = (step, False)
        if doc["kind"] == "ExternalSecret":
            target = doc["spec"].get("target", {}).get("name", doc["metadata"]["name"])
            created[("Secret", target)] = (step, True)
    for doc in sorted(docs, key=argo_step):
        step = argo_step(doc)
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        needs = []
        namespace = doc["metadata"].get("namespace")
        if namespace and not create_namespace:
            needs.append(("Namespace", namespace))
        spec = pod_spec(doc) if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet",
                                                  "Job", "CronJob", "Pod") else None
        if spec:
            needs += pod_references(spec)
        if doc["kind"] == "ExternalSecret":
            store = doc["spec"].get("secretStoreRef", {})
            needs.append((store.get("kind", "SecretStore"), store.get("name")))
        if doc["kind"] in ("SecretStore", "ExternalSecret"):
            needs += service_account_refs(doc.get("spec", {}))
        for need in needs:
            if need not in created:
                continue
            made_at, after_health = created[need]
            in_time = made_at[:2] < step[:2] if after_health else made_at < step
            if not in_time:
                phase = {v: k for k, v in ARGO_PHASES.items()}
                fail(f"{where} (phase {phase[step[0]]}, wave {step[1]}) needs "
                     f"{need[0]}/{need[1]}, which Argo CD creates "
                     + ("only once its ExternalSecret is healthy, "
                        if after_health else "")
                     + f"in phase {phase[made_at[0]]}, wave {made_at[1]}: not before it")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: Argo CD sync order (phases, waves, kinds) creates what each "
              f"object needs before it")


def check_hand_apply(overlay, docs):
    """Models `kubectl apply -k` run again right after a release: the second render
    differs from the first in the image (and, with a config change, in the hashed
    ConfigMap's name). Every object the first apply made is patched, and a Job still in
    the cluster cannot take a new pod template ("field is immutable"). A finished Job
    stays until its `ttlSecondsAfterFinished` runs out (for ever when unset), so the
    next apply works at once only if that is 0."""
    failed_before = len(failures)
    for doc in docs:
        if doc["kind"] != "Job" or "generateName" in doc["metadata"]:
            continue
        released = copy.deepcopy(doc)
        for container in pod_spec(released).get("containers", []):
            container["image"] = container["image"].split("@")[0].split(":")[0] + ":next"
        if released["spec"]["template"] == doc["spec"]["template"]:
            continue
        ttl = doc["spec"].get("ttlSecondsAfterFinished")
        if ttl != 0:
            left = "until deleted by hand" if ttl is None else f"for {ttl} s"
            fail(f"{overlay}: Job/{doc['metadata']['name']} stays {left} after it "
                 "finishes, so the next `kubectl apply -k` with a new image fails on its "
                 "immutable pod template (set ttlSecondsAfterFinished: 0)")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: a second `kubectl apply -k` with a new image finds no "
              "finished Job in its way")


def check_autoscaled_replicas(overlay, docs):
    """A Deployment an HPA or a KEDA ScaledObject scales must not set `replicas`: every
    sync (and every `kubectl apply -k`) would reset what the autoscaler chose."""
    failed_before = len(failures)
    scaled = set()
    for doc in docs:
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            scaled.add((target["kind"], target["name"]))
        if doc["kind"] == "ScaledObject":
            target = doc["spec"]["scaleTargetRef"]
            scaled.add((target.get("kind", "Deployment"), target["name"]))
    for doc in docs:
        if (doc["kind"], doc["metadata"]["name"]) in scaled and "replicas" in doc["spec"]:
            fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} sets replicas "
                 f"({doc['spec']['replicas']}) although an autoscaler owns them")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: no replicas on what an autoscaler scales")


CLOUD_IDENTITY = ("iam.gke.io/gcp-service-account", "eks.amazonaws.com/role-arn",
                  "azure.workload.identity/client-id")


def check_service_accounts(overlay, docs):
    """Each workload runs as a ServiceAccount of its own, and only those that reach the
    bucket (the API, the worker) carry a cloud identity: the gateway and the migration
    Job must not inherit one."""
    failed_before = len(failures)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    users = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        if doc["metadata"]["name"] in ("postgres", "redis"):
            continue  # the dev overlay's data services
        account = pod_spec(doc).get("serviceAccountName", "default")
        users.setdefault(account, []).append(doc["metadata"]["name"])
        annotations = accounts.get(account, {}).get("metadata", {}).get("annotations") or {}
        identity = [key for key in CLOUD_IDENTITY if key in annotations]
        if doc["metadata"]["name"] in ("gateway", "migrate") and identity:
            fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} runs as "
                 f"{account}, which carries a cloud identity ({identity[0]})")
    for account, workloads in users.items():
        if len(workloads) > 1:
            fail(f"{overlay}: {', '.join(workloads)} share the ServiceAccount {account}")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: one ServiceAccount per workload; cloud identity only "
              f"where the bucket is used")


RUNBOOKS = "docs/runbooks.md"
RUNBOOK_BASE = "https://github.com/mobile-backend/mobile-backend/blob/main/" + RUNBOOKS


def check_alerts(rendered):
    """The alert rules as Prometheus loads them: `promtool check rules`; their unit
    tests, `.ci/alerts-test.yaml`, with `promtool test rules` (annotations stripped:
    promtool compares them exactly); every alert with a case that fires and one that
    stays quiet, and a runbook_url into docs/runbooks.md that names it; and the
    `release` label kube-prometheus-stack selects on."""
    failed_before = len(failures)
    rules = [d for _, docs in rendered.values() for d in docs if d["kind"] == "PrometheusRule"]
    if not rules:
        fail("no PrometheusRule in any overlay")
        return
    spec = rules[0]["spec"]
    alerts = [r for g in spec["groups"] for r in g["rules"] if "alert" in r]
    runbooks = (ROOT / RUNBOOKS).read_text() if (ROOT / RUNBOOKS).exists() else ""
    for alert in alerts:
        name = alert["alert"]
        url = alert.get("annotations", {}).get("runbook_url", "")
        if url != f"{RUNBOOK_BASE}#{name.lower()}":
            fail(f"alert {name}: runbook_url should be {RUNBOOK_BASE}#{name.lower()}, is {url!r}")
        if f"\n## {name}\n" not in runbooks:
            fail(f"alert {name}: {RUNBOOKS} has no section '## {name}'")
    tests = yaml.safe_load((ROOT / ".ci/alerts-test.yaml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in alerts:
        name = alert["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        if not any(case.get("exp_alerts") for case in mine):
            fail(f"alert {name}: no test in .ci/alerts-test.yaml where it fires")
        if not any(not case.get("exp_alerts") for case in mine):
            fail(f"alert {name}: no test in .ci/alerts-test.yaml where it stays quiet")
    for overlay, (_, docs) in rendered.items():
        for doc in docs:
            if doc["kind"] in ("ServiceMonitor", "PrometheusRule") and \
                    "release" not in (doc["metadata"].get("labels") or {}):
                fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} has no `release` "
                     f"label: a default kube-prometheus-stack ignores it")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "rules-full.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        stripped = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"}
                                               for r in g["rules"]]} for g in spec["groups"]]}
        (tmp / "rules.yaml").write_text(yaml.safe_dump(stripped, sort_keys=False))
        (tmp / "alerts-test.yaml").write_text((ROOT / ".ci/alerts-test.yaml").read_text())
        for args in (["promtool", "check", "rules", "rules-full.yaml"],
                     ["promtool", "test", "rules", "alerts-test.yaml"]):
            try:
                result = run(args, cwd=tmp)
            except FileNotFoundError:
                fail("promtool not found (Debian package prometheus)")
                return
            if result.returncode != 0:
                fail(f"{' '.join(args[:3])}: {(result.stdout + result.stderr).strip()}")
    if len(failures) == failed_before:
        print(f"ok   {len(alerts)} alerts: promtool check and unit tests (each fires and stays "
              f"quiet), runbooks, the release label")


def check_adapter_rule(rendered):
    """The prometheus-adapter values serve every Pods metric an HPA scales on, and the
    gateway exports it."""
    failed_before = len(failures)
    values = yaml.safe_load((ROOT / "k8s/components/hpa-gateway-connections/"
                             "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    exported = (ROOT / "crates/gateway/src/metrics.rs").read_text()
    for overlay, (_, docs) in rendered.items():
        for doc in docs:
            if doc["kind"] != "HorizontalPodAutoscaler":
                continue
            for metric in doc["spec"].get("metrics", []):
                if metric["type"] != "Pods":
                    continue
                name = metric["pods"]["metric"]["name"]
                if name not in served:
                    fail(f"{overlay}: HPA {doc['metadata']['name']} scales on {name}, which "
                         f"the prometheus-adapter values do not serve")
                if f'"{name}"' not in exported:
                    fail(f"{overlay}: HPA {doc['metadata']['name']} scales on {name}, which "
                         f"the gateway does not export")
    if len(failures) == failed_before:
        print("ok   prometheus-adapter serves every per-pod metric an HPA scales on")


def selects(selector, labels):
    """Whether a label selector (matchLabels, matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer, address, namespace_labels):
    """Whether a NetworkPolicy peer admits a host at `address` (an IPv4 string), in a
    namespace labelled `namespace_labels` (None: not a pod, such as a load balancer's
    proxy or a node-local address)."""
    if "ipBlock" in peer:
        block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        ip = ipaddress.ip_address(address)
        return ip in block and not any(ip in ipaddress.ip_network(e)
                                       for e in peer["ipBlock"].get("except", []))
    if namespace_labels is None:
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], namespace_labels):
        return False
    # A podSelector alone means this namespace; the model's peers are not pods here.
    return "podSelector" not in peer


def port_matches(ports, port, protocol):
    """A rule's ports: a number, a range (`endPort`), or any. A named port (a container
    port's name) is not modelled: it fails the check rather than guess."""
    if not ports:
        return True
    for p in ports:
        if isinstance(p.get("port"), str):
            fail(f"NetworkPolicy port {p['port']!r}: named ports are not modelled here")
            return False
    return any(p.get("protocol", "TCP") == protocol
               and (p.get("port") is None
                    or p["port"] <= port <= p.get("endPort", p["port"]))
               for p in ports)


def policy_types(policy):
    """Kubernetes' default when `policyTypes` is unset: Ingress, plus Egress if the
    policy has egress rules."""
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def allowed(docs, pod_labels, direction, address, port, protocol="TCP",
            namespace_labels=None):
    """Whether the NetworkPolicies in `docs` let a pod labelled `pod_labels` receive
    (direction "Ingress") or send ("Egress") a connection from or to `address`:`port`.
    Kubernetes' semantics: a pod no policy selects for a direction is open; once any
    selects it, only what one of them allows gets through."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and selects(d["spec"]["podSelector"], pod_labels)
                and direction in policy_types(d)]
    if not policies:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            if not port_matches(rule.get("ports"), port, protocol):
                continue
            if not peers or any(peer_matches(p, address, namespace_labels) for p in peers):
                return True
    return False


# The network paths a GKE cluster needs, as (workloads, direction, address, port,
# protocol, why). Addresses stand for their ranges: a Google front end or health
# checker, NodeLocal DNSCache, the metadata server, the GKE metadata server, a
# Memorystore instance on a private address.
GKE_PATHS = [
    (["api", "gateway"], "Ingress", "35.191.4.20", None, "TCP",
     "Google's load balancer and health checks (35.191.0.0/16)"),
    (["api", "gateway"], "Ingress", "130.211.1.9", None, "TCP",
     "Google's load balancer and health checks (130.211.0.0/22)"),
    (["api", "gateway", "worker", "migrate"], "Egress", "169.254.20.10", 53, "UDP",
     "NodeLocal DNSCache"),
    (["api", "gateway", "worker", "migrate"], "Egress", "169.254.169.254", 53, "UDP",
     "Cloud DNS through the metadata server"),
    (["api", "worker"], "Egress", "169.254.169.254", 80, "TCP",
     "Workload Identity tokens (metadata server)"),
    (["api", "worker"], "Egress", "169.254.169.252", 988, "TCP",
     "Workload Identity tokens (GKE metadata server)"),
    (["api", "gateway", "worker"], "Egress", "10.20.0.3", 6378, "TCP",
     "Memorystore with in-transit encryption"),
]
EKS_PATHS = [
    (["api", "gateway"], "Ingress", "10.0.3.7", None, "TCP",
     "the ALB's nodes in the VPC (IP targets)"),
    (["api", "worker"], "Egress", "169.254.170.23", 80, "TCP",
     "EKS Pod Identity's agent"),
    (["api", "worker"], "Egress", "52.94.0.10", 443, "TCP", "STS (IRSA) and S3"),
    (["api", "gateway", "worker"], "Egress", "10.0.9.5", 6379, "TCP",
     "ElastiCache (TLS on 6379)"),
]
AKS_PATHS = [
    (["api", "gateway"], "Ingress", "10.225.0.10", None, "TCP",
     "Application Gateway for Containers from its association subnet"),
    (["api", "worker"], "Egress", "20.190.128.1", 443, "TCP",
     "Microsoft Entra ID (Workload ID tokens) and Blob Storage"),
    (["api", "gateway", "worker"], "Egress", "10.1.0.4", 6380, "TCP",
     "Azure Cache for Redis (TLS on 6380)"),
]
# What every cluster needs whatever its cloud: the worker's mail leaves by SMTP
# submission to a provider outside (SES, SendGrid, ...), on 587 (STARTTLS) or 465 (TLS);
# port 25 is blocked by the clouds themselves.
SMTP_PATHS = [
    (["worker"], "Egress", "203.0.113.25", 587, "TCP", "SMTP submission (STARTTLS)"),
    (["worker"], "Egress", "203.0.113.25", 465, "TCP", "SMTP submission (TLS)"),
]
GKE_PATHS += SMTP_PATHS
EKS_PATHS += SMTP_PATHS
AKS_PATHS += SMTP_PATHS
# Per cloud: the paths, the address of the endpoint that hands out a cloud identity
# (the gateway must not reach it), and how many X-Forwarded-For entries its load
# balancer appends.
CLOUDS = {
    "gke": (GKE_PATHS, ("169.254.169.254", 80), "2"),
    "eks": (EKS_PATHS, ("169.254.170.23", 80), "1"),
    "aks": (AKS_PATHS, ("169.254.169.254", 80), "1"),
}
SERVING_PORT = {"api": 8080, "gateway": 8081}


def cloud_of(docs):
    """Which cloud an overlay is for, from what its load balancer needs."""
    groups = {d["apiVersion"].rpartition("/")[0] for d in docs}
    if "networking.gke.io" in groups:
        return "gke"
    if "alb.networking.azure.io" in groups:
        return "aks"
    if any(d["kind"] == "Ingress" and d["spec"].get("ingressClassName") == "alb" for d in docs):
        return "eks"
    return None


def check_network_paths(overlay, docs):
    """Replays the paths a cloud needs against the overlay's NetworkPolicies (for the
    overlays made for a cloud: `cloud_of`), and checks the gateway, which needs no
    cloud identity, cannot reach the endpoint that hands one out."""
    cloud = cloud_of(docs)
    if cloud is None:
        return
    paths, (identity_address, identity_port), _ = CLOUDS[cloud]
    failed_before = len(failures)
    for workloads, direction, address, port, protocol, why in paths:
        for workload in workloads:
            labels = {"app.kubernetes.io/name": workload}
            at = port or SERVING_PORT[workload]
            if not allowed(docs, labels, direction, address, at, protocol):
                fail(f"{overlay}: NetworkPolicies block {why}: {direction.lower()} "
                     f"{address}:{at}/{protocol} for {workload}")
    if allowed(docs, {"app.kubernetes.io/name": "gateway"}, "Egress", identity_address,
               identity_port):
        fail(f"{overlay}: the gateway can reach {identity_address}:{identity_port}, where "
             f"{cloud.upper()} hands out cloud identities")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: NetworkPolicies open the paths {cloud.upper()} needs (load "
              f"balancer, identity, managed Redis, SMTP) and keep the gateway off the identity "
              f"endpoint")


# How long a WebSocket may live behind a proxy: the gateway's clients reconnect and
# resume after it, so an hour is the floor every proxy in front must allow.
WEBSOCKET_FLOOR = 3600


def check_cloud_load_balancer(overlay, docs, limits, ready):
    """The cloud's load balancer health-checks the readiness path of every Service it
    sends to (GKE and AGC check `/` otherwise: 404 here, every backend unhealthy), lets
    its longest request finish (an upload for the API, an hour-long WebSocket for the
    gateway; GKE's default is 30 s, AGC's 60 s, an ALB's idle timeout 60 s), and the
    X-Forwarded-For entries it appends are the TRUSTED_PROXY_HOPS the services trust."""
    cloud = cloud_of(docs)
    if cloud is None:
        return
    failed_before = len(failures)
    floors = {"api": limits["upload"] + 1, "gateway": WEBSOCKET_FLOOR}
    hops = CLOUDS[cloud][2]
    for config in (d for d in docs if d["kind"] == "ConfigMap"
                   and d["metadata"]["name"].startswith("mobile-config")):
        if config.get("data", {}).get("TRUSTED_PROXY_HOPS") != hops:
            fail(f"{overlay}: TRUSTED_PROXY_HOPS is "
                 f"{config.get('data', {}).get('TRUSTED_PROXY_HOPS')}, but {cloud.upper()}'s "
                 f"load balancer appends {hops} X-Forwarded-For entries")
    if cloud == "eks":
        for doc in (d for d in docs if d["kind"] == "Ingress"):
            notes = doc["metadata"].get("annotations", {})
            path = notes.get("alb.ingress.kubernetes.io/healthcheck-path", "/")
            if path != ready:
                fail(f"{overlay}: the ALB health checks ask {path}, not {ready}")
            attributes = notes.get("alb.ingress.kubernetes.io/load-balancer-attributes", "")
            idle = re.search(r"idle_timeout\.timeout_seconds=(\d+)", attributes)
            if not idle or int(idle.group(1)) < WEBSOCKET_FLOOR:
                fail(f"{overlay}: the ALB's idle timeout must be at least {WEBSOCKET_FLOOR} s "
                     f"(default 60) for WebSockets")
    else:
        group = "networking.gke.io" if cloud == "gke" else "alb.networking.azure.io"
        backends = {ref["name"] for d in docs if d["kind"] == "HTTPRoute"
                    for rule in d["spec"].get("rules", []) for ref in rule.get("backendRefs", [])}
        policies = {(d["kind"], d["spec"]["targetRef"]["name"]): d["spec"]["default"]
                    for d in docs if d["apiVersion"].startswith(group + "/")}
        for service in sorted(backends):
            check = policies.get(("HealthCheckPolicy", service)) or {}
            path = (check.get("config", {}).get("httpHealthCheck", {}).get("requestPath")
                    if cloud == "gke" else check.get("http", {}).get("path"))
            if path != ready:
                fail(f"{overlay}: Service {service}: {cloud.upper()} health checks ask "
                     f"{path or '/'}, not {ready}")
            if cloud == "gke":
                timeout = policies.get(("GCPBackendPolicy", service), {}).get("timeoutSec", 30)
            else:
                route = next((p for (kind, _), p in policies.items() if kind == "RoutePolicy"), {})
                timeout = seconds(route.get("timeouts", {}).get("routeTimeout", "60s"))
            if timeout < floors.get(service, limits["request"]):
                fail(f"{overlay}: Service {service}: {cloud.upper()}'s timeout {timeout} s is "
                     f"under {floors.get(service, limits['request'])} s")
    if len(failures) == failed_before:
        print(f"ok   {overlay}: {cloud.upper()}'s load balancer checks {ready}, lets uploads "
              f"and WebSockets finish, and appends the {hops} X-Forwarded-For "
              f"entries trusted")

def check_image_pipeline():
    """What the schema cannot see in the image workflow: it runs only after the tests
    passed on main, builds only when the image's inputs changed, no job holds both
    write permissions, it builds amd64 and arm64 with an SBOM and provenance, signs the
    image, and pins the overlay to a digest, retrying when main moved."""
    failed_before = len(failures)
    path = ROOT / ".github/workflows/image.yml"
    text = path.read_text()
    workflow = yaml.safe_load(text)
    triggers = workflow.get(True, workflow.get("on", {}))  # YAML reads `on` as True
    run = triggers.get("workflow_run", {}) if isinstance(triggers, dict) else {}
    if set(triggers) - {"workflow_run", "workflow_dispatch"} or run.get("workflows") != ["ci"]:
        fail(f"{path.name}: must run only after the ci workflow (workflow_run), not on push")
    if "conclusion == 'success'" not in text:
        fail(f"{path.name}: must build only when the ci run succeeded")
    if workflow.get("permissions") != {}:
        fail(f"{path.name}: top-level permissions must be {{}} (each job asks for its own)")
    for name, job in workflow["jobs"].items():
        granted = job.get("permissions", {})
        if granted.get("contents") == "write" and granted.get("packages") == "write":
            fail(f"{path.name}: job {name} holds both contents: write and packages: write")
    for needle, why in (("git diff --quiet", "build only when the image's inputs changed"),
                        ("linux/arm64", "build arm64"), ("linux/amd64", "build amd64"),
                        ("sbom: true", "attach an SBOM"), ("provenance: mode=max", "attach provenance"),
                        ("cosign sign", "sign the image"), ("digest: $DIGEST", "pin the digest"),
                        ("for attempt in", "retry the bump when main moved")):
        if needle not in text:
            fail(f"{path.name}: does not {why} ({needle!r})")
    if len(failures) == failed_before:
        print(f"ok   {path.name}: after the tests, only on changed inputs, least privilege, "
              f"amd64 and arm64, SBOM, provenance, signed, pinned by digest")


def check_dev_data_services(rendered):
    """checkov on the dev overlay: its PostgreSQL and Redis pass every check the
    services' own workloads pass, or a waiver in .ci/checkov-waivers.yaml says why not."""
    if "dev" not in rendered:
        return
    failed_before = len(failures)
    path, _ = rendered["dev"]
    try:
        result = run(["checkov", "-f", str(path), "--framework", "kubernetes", "-o", "json"])
    except FileNotFoundError:
        fail("checkov not found (.ci/run installs it)")
        return
    report = json.loads(result.stdout)
    results = (report[0] if isinstance(report, list) else report)["results"]
    passed, failed = {}, {}
    for key, into in (("passed_checks", passed), ("failed_checks", failed)):
        for check in results[key]:
            into.setdefault(check["resource"], set()).add(check["check_id"])
    ours = ["Deployment.mobile.api", "Deployment.mobile.gateway", "Deployment.mobile.worker",
            "Job.mobile.migrate"]
    bar = set.intersection(*(passed.get(r, set()) for r in ours))
    waivers = {(w["resource"], w["check"]) for w in
               yaml.safe_load((ROOT / ".ci/checkov-waivers.yaml").read_text())}
    for resource in ("StatefulSet.mobile.postgres", "Deployment.mobile.redis"):
        if resource not in passed and resource not in failed:
            fail(f"dev: checkov did not see {resource}")
        for check in sorted(failed.get(resource, set()) & bar):
            if (resource, check) not in waivers:
                fail(f"dev: {resource} fails checkov {check}, which the services pass "
                     f"(fix it, or waive it with a reason in .ci/checkov-waivers.yaml)")
    for resource, check in sorted(waivers):
        if check not in failed.get(resource, set()) or check not in bar:
            fail(f"dev: the waiver of {check} for {resource} no longer applies: remove it")
    if len(failures) == failed_before:
        print(f"ok   dev: PostgreSQL and Redis pass the {len(bar)} checkov checks the "
              f"services pass ({len(waivers)} waived with a reason)")


def argo_applications():
    """overlay name -> whether its Argo CD Application creates the namespace."""
    apps = {}
    for path in sorted((ROOT / "k8s/argocd").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Application":
                continue
            overlay = pathlib.PurePosixPath(doc["spec"]["source"]["path"]).name
            options = doc["spec"].get("syncPolicy", {}).get("syncOptions", [])
            apps[overlay] = "CreateNamespace=true" in options
    return apps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas", default=str(ROOT.parent / "shared/schemas"))
    parser.add_argument("--kubernetes-version", default="1.31.0")
    args = parser.parse_args()
    schemas = pathlib.Path(args.schemas)
    if not schemas.is_dir():
        sys.exit(f"no custom resource schemas at {schemas} (--schemas DIR)")

    defaults, shutdown, longest_job, live, ready = binary_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp)
        rendered = render_overlays(out_dir)
        validate_builtin(rendered, args.kubernetes_version)
        validate_custom(rendered, schemas)
        validate_workflows()
        check_image_pipeline()
        check_deployments(rendered, defaults, shutdown, longest_job, live, ready)
        limits = api_limits()
        applications = argo_applications()
        for overlay, (_, docs) in rendered.items():
            check_timeouts(overlay, docs, limits)
            check_sync_order(overlay, docs, applications.get(overlay, False))
            check_autoscaled_replicas(overlay, docs)
            check_hand_apply(overlay, docs)
            check_service_accounts(overlay, docs)
            check_network_paths(overlay, docs)
            check_cloud_load_balancer(overlay, docs, limits, ready)
        check_alerts(rendered)
        check_adapter_rule(rendered)
        check_dev_data_services(rendered)
        check_compose(defaults, shutdown)
    if failures:
        sys.exit(f"\n{len(failures)} deployment check(s) failed")
    print("\ndeployment files: all checks passed")


if __name__ == "__main__":
    main()
