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
"""

import argparse
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
        elif doc["kind"] == "Ingress":
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
        print(f"ok   kubectl kustomize {overlay.relative_to(ROOT)} "
              f"({len(rendered[overlay.name][1])} objects)")
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
            label = f"{name}: {kind} {doc['metadata']['name']} ({doc['apiVersion']})"
            if not schema.exists():
                fail(f"{label}: no schema at {schema}")
                continue
            errors = schema_errors(json.loads(schema.read_text()), doc)
            if errors:
                fail(f"{label}:\n  " + "\n  ".join(errors))
            else:
                print(f"ok   {label} against {schema.relative_to(schemas.parent)}")


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
        check_deployments(rendered, defaults, shutdown, longest_job, live, ready)
        limits = api_limits()
        for overlay, (_, docs) in rendered.items():
            check_timeouts(overlay, docs, limits)
        check_compose(defaults, shutdown)
    if failures:
        sys.exit(f"\n{len(failures)} deployment check(s) failed")
    print("\ndeployment files: all checks passed")


if __name__ == "__main__":
    main()
