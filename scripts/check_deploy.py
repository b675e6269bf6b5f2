#!/usr/bin/env python3
"""Static checks of the deployment and monitoring files, run by scripts/check-deploy.sh with
the tools' venv (PyYAML). Each subcommand prints what it checked and exits 1 naming every
problem it found.

    check_deploy.py manifests RENDERED.yaml OUTDIR NAME
        Splits a `kubectl kustomize` rendering: built-in kinds go to OUTDIR/NAME.builtin.yaml
        for kubernetes-validate, the PrometheusRule's spec to OUTDIR/NAME.rules.yml for
        promtool. Checks what no schema can: the Deployment's contract with the relay (no
        service links, replica id, probes, Pod Security "restricted", grace period longer
        than relay.drain_timeout, config and secret files mounted where the TOML names
        them) and that the Service, PodDisruptionBudget, NetworkPolicy, ServiceMonitor and
        PrometheusRule point at what they should.
    check_deploy.py alerts
        Every alert has a summary, a description and a runbook_url whose anchor exists in
        docs/runbooks.md, and has firing and non-firing cases in the promtool tests.
    check_deploy.py envfile PATH
        The relay accepts the OUTBOX_RELAY_* variables of a systemd EnvironmentFile.

The configuration itself (the ConfigMap's TOML with the Deployment's variables, the
EnvironmentFile) is judged by the relay, `outbox-relay check --config-only` (the binary
$OUTBOX_RELAY_BIN), never by a copy of its keys here.
    check_deploy.py dashboard OUT_RULES.yml
        deploy/grafana/outbox-relay.json: datasource variable, job/instance variables, every
        panel's datasource and targets, every outbox_relay_* name among the relay's metrics.
        Writes each query as a recording rule to OUT_RULES.yml for `promtool check rules`.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/outbox-relay.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/outbox-relay.rules.test.yml"
RUNBOOKS = ROOT / "docs/runbooks.md"
DASHBOARD = ROOT / "deploy/grafana/outbox-relay.json"

ALERT_JOB = "outbox-relay"  # the job the alert rules select on
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

# Every metric the relay exports (src/telemetry.rs and the librdkafka statistics gauges).
COUNTERS = {
    "outbox_relay_rows_published_total",
    "outbox_relay_rows_marked_total",
    "outbox_relay_rows_parked_total",
    "outbox_relay_publish_errors_total",
    "outbox_relay_database_errors_total",
    "outbox_relay_producer_rebuilds_total",
    "outbox_relay_doorbell_notifications_total",
    "outbox_relay_lease_renewals_total",
    "outbox_relay_lease_renewal_failures_total",
    "outbox_relay_rebalances_total",
    "outbox_relay_rows_fenced_total",
    "outbox_relay_audit_checked_total",
    "outbox_relay_audit_mismatches_total",
    "outbox_relay_audit_unchecked_total",
}
HISTOGRAMS = {
    "outbox_relay_batch_size_rows",
    "outbox_relay_batch_duration_seconds",
    "outbox_relay_end_to_end_latency_seconds",
}
GAUGES = {
    "outbox_relay_pending_rows",
    "outbox_relay_parked_rows",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_in_flight_rows",
    "outbox_relay_stalled",
    "outbox_relay_ready",
    "outbox_relay_shards_owned",
    "outbox_relay_producer_queue_messages",
    "outbox_relay_producer_queue_bytes",
    "outbox_relay_broker_rtt_avg_seconds",
    "outbox_relay_broker_rtt_p99_seconds",
    "outbox_relay_producer_batch_avg_bytes",
    "outbox_relay_producer_batch_p99_bytes",
    "outbox_relay_build_info",
    "outbox_relay_audit_running",
}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | HISTOGRAMS
    | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
METRIC_NAME = re.compile(r"\boutbox_relay_[a-zA-Z0-9_]*")


class Problems:
    def __init__(self, what: str):
        self.what = what
        self.items: list[str] = []
        self.checked: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.items.append(message)
        return ok

    def done(self) -> int:
        for line in self.checked:
            print(f"  ok: {line}")
        if self.items:
            print(f"FAILED: {self.what}:", file=sys.stderr)
            for item in self.items:
                print(f"  - {item}", file=sys.stderr)
            return 1
        return 0


# ----------------------------------------------------------------------------- helpers


# humantime's units, as the relay reads durations ("500ms", "10s", "1min", "2d", "1h 30m").
DURATION_UNITS = {
    "ns": 1e-9, "nsec": 1e-9, "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}


def parse_duration(text: str) -> float:
    """Seconds in a duration the relay accepts (checked by the relay first)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or not re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]+)+\s*", text):
        raise ValueError(f"cannot parse duration {text!r}")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def relay_refusal(toml_text: str | None, env: dict[str, str]) -> str | None:
    """Why `outbox-relay check --config-only` refuses this configuration, or None."""
    relay = os.environ.get("OUTBOX_RELAY_BIN")
    if not relay:
        return "OUTBOX_RELAY_BIN is not set: scripts/check-deploy.sh builds the relay and sets it"
    with tempfile.TemporaryDirectory() as work:
        args = [relay]
        if toml_text is not None:
            config = Path(work) / "outbox-relay.toml"
            config.write_text(toml_text, encoding="utf-8")
            args += ["--config", str(config)]
        done = subprocess.run(
            args + ["check", "--config-only"],
            env={"PATH": os.environ.get("PATH", "")} | env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=60,
        )
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip()


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def load_rule_groups(path: Path) -> list:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]


def alerts_of(groups: list) -> list[dict]:
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# ----------------------------------------------------------------------------- manifests


def check_manifests(rendered: Path, outdir: Path, name: str) -> int:
    p = Problems(f"manifests of {name}")
    docs = [d for d in yaml.safe_load_all(rendered.read_text(encoding="utf-8")) if d]
    by_kind: dict[str, list[dict]] = {}
    builtin, crds = [], []
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        (crds if (doc.get("apiVersion"), doc["kind"]) in CRD_KINDS else builtin).append(doc)
    (outdir / f"{name}.builtin.yaml").write_text(
        yaml.safe_dump_all(builtin, sort_keys=False), encoding="utf-8"
    )
    p.checked.append(
        f"{len(docs)} objects: {len(builtin)} built-in for kubernetes-validate, "
        f"{len(crds)} Prometheus Operator objects checked here "
        f"({', '.join(sorted(d['kind'] for d in crds))})"
    )

    def one(kind: str) -> dict:
        found = by_kind.get(kind, [])
        p.check(len(found) == 1, f"expected exactly one {kind}, found {len(found)}")
        return found[0] if found else {}

    deployment = one("Deployment")
    service = one("Service")
    pdb = one("PodDisruptionBudget")
    netpol = one("NetworkPolicy")
    monitor = one("ServiceMonitor")
    rule = one("PrometheusRule")
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    if p.items:
        return p.done()

    # --- Deployment: the relay's contract
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    p.check(
        labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels),
        "Deployment selector does not match its pod labels",
    )
    p.check(
        pod.get("enableServiceLinks") is False,
        "Deployment: enableServiceLinks must be false (service links inject OUTBOX_RELAY_* "
        "variables the relay refuses as unknown configuration keys)",
    )
    p.check(
        pod.get("automountServiceAccountToken") is False,
        "Deployment: automountServiceAccountToken must be false",
    )
    containers = pod["containers"]
    p.check(len(containers) == 1, "Deployment: expected one container")
    c = containers[0]
    env = {e["name"]: e for e in c.get("env", [])}
    replica = env.get("OUTBOX_RELAY_RELAY__REPLICA_ID", {})
    p.check(
        replica.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "Deployment: OUTBOX_RELAY_RELAY__REPLICA_ID must come from the pod name (fieldRef metadata.name)",
    )
    p.check(
        env.get("OUTBOX_RELAY_LOG__FORMAT", {}).get("value") == "json",
        "Deployment: OUTBOX_RELAY_LOG__FORMAT must be json",
    )
    # The relay judges its variables with the ConfigMap's TOML (below); those set from a
    # Secret or the pod's fields stand in as placeholders.
    relay_env = {
        var: spec.get("value", "postgres://placeholder@localhost/placeholder" if var.endswith("URL") else "placeholder")
        for var, spec in env.items()
        if var.startswith("OUTBOX_RELAY_")
    }

    ports = {port["name"]: port["containerPort"] for port in c.get("ports", [])}
    p.check("metrics" in ports, "Deployment: no container port named metrics")
    probes = {k: c.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = probes[probe]
        p.check(get.get("path") == path, f"Deployment: {probe} must GET {path}")
        p.check(
            get.get("port") in ports or get.get("port") in ports.values(),
            f"Deployment: {probe} port {get.get('port')!r} is not a container port",
        )
    resources = c.get("resources", {})
    for kind_ in ("requests", "limits"):
        p.check("memory" in resources.get(kind_, {}), f"Deployment: no memory {kind_}")
    p.check("cpu" in resources.get("requests", {}), "Deployment: no cpu request")

    # Pod Security "restricted"
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    run_as_non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    p.check(run_as_non_root is True, "restricted: runAsNonRoot must be true")
    p.check(
        csc.get("runAsUser", psc.get("runAsUser")) == 65532, "runAsUser must be 65532 (distroless nonroot)"
    )
    p.check(
        csc.get("allowPrivilegeEscalation") is False, "restricted: allowPrivilegeEscalation must be false"
    )
    p.check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    p.check(csc.get("capabilities", {}).get("drop") == ["ALL"], "restricted: capabilities must drop ALL")
    p.check(csc.get("capabilities", {}).get("add") in (None, []), "restricted: no capabilities may be added")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    p.check(seccomp in ("RuntimeDefault", "Localhost"), "restricted: seccompProfile must be RuntimeDefault")
    for volume in pod.get("volumes", []):
        allowed = {
            "configMap",
            "secret",
            "emptyDir",
            "projected",
            "downwardAPI",
            "csi",
            "ephemeral",
            "persistentVolumeClaim",
        }
        p.check(
            any(k in volume for k in allowed),
            f"restricted: volume {volume.get('name')} is of a kind the restricted profile forbids",
        )

    # The config file and the secrets, where the TOML says
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_volume = volumes.get(mounts.get("/etc/outbox-relay", ""), {})
    cm_name = config_volume.get("configMap", {}).get("name")
    p.check(cm_name in configmaps, "Deployment: /etc/outbox-relay must mount a ConfigMap of this rendering")
    toml_text = configmaps.get(cm_name, {}).get("data", {}).get("outbox-relay.toml")
    p.check(toml_text is not None, f"ConfigMap {cm_name}: no outbox-relay.toml key")
    if toml_text is not None:
        try:
            config = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            p.check(False, f"ConfigMap {cm_name}: outbox-relay.toml is not valid TOML: {e}")
            config = {}

        refusal = relay_refusal(toml_text, relay_env)
        if p.check(
            refusal is None,
            f"ConfigMap {cm_name}'s outbox-relay.toml with the Deployment's variables: the relay refuses it: {refusal}",
        ):
            p.checked.append(
                f"ConfigMap {cm_name}'s outbox-relay.toml and the Deployment's OUTBOX_RELAY_* variables pass `outbox-relay check --config-only`"
            )
        relay = config.get("relay", {})
        drain = parse_duration(relay.get("drain_timeout", "10s"))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        p.check(
            grace > drain + 10,
            f"Deployment: terminationGracePeriodSeconds {grace} must exceed relay.drain_timeout ({drain:g}s) plus 10 s (the last mark and the hand-over)",
        )
        listen = config.get("http", {}).get("listen", "0.0.0.0:9743")
        p.check(
            int(listen.rsplit(":", 1)[1]) == ports.get("metrics"),
            f"http.listen {listen} and the metrics container port {ports.get('metrics')} differ",
        )
        # Files the relay reads: each must be a key of a Secret mounted at its directory.
        files = [
            ("database.url_file", config.get("database", {}).get("url_file")),
            ("database.password_file", config.get("database", {}).get("password_file")),
        ] + [
            (f'kafka.secret_files."{k}"', v)
            for k, v in config.get("kafka", {}).get("secret_files", {}).items()
        ]
        for key, path in files:
            if path is None:
                continue
            directory, _, filename = path.rpartition("/")
            volume = volumes.get(mounts.get(directory, ""), {})
            secret_name = volume.get("secret", {}).get("secretName")
            secret = secrets.get(secret_name)
            p.check(
                secret is not None,
                f"{key} = {path}: no Secret of this rendering is mounted at {directory}",
            )
            if secret is not None:
                keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
                p.check(filename in keys, f"{key} = {path}: Secret {secret_name} has no key {filename}")
    p.checked.append(
        "Deployment: no service links, replica id from the pod name, JSON logs, probes "
        "/healthz /readyz on the metrics port, requests and limits, Pod Security restricted, "
        "grace period > relay.drain_timeout, TOML keys known, secret files mounted"
    )

    # --- Service, PDB, NetworkPolicy
    p.check(
        labels_match(service["spec"].get("selector", {}), pod_labels),
        "Service selector does not match the pods",
    )
    service_ports = {sp["name"]: sp for sp in service["spec"]["ports"]}
    p.check(
        service_ports.get("metrics", {}).get("targetPort") in ("metrics", ports.get("metrics")),
        "Service: port metrics must target the container's metrics port",
    )
    p.check(
        labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "PodDisruptionBudget selector does not match the pods",
    )
    p.check(pdb["spec"].get("minAvailable") == 1, "PodDisruptionBudget: minAvailable must be 1")
    p.check(
        labels_match(netpol["spec"]["podSelector"].get("matchLabels", {}), pod_labels),
        "NetworkPolicy podSelector does not match the pods",
    )
    p.check(
        set(netpol["spec"].get("policyTypes", [])) == {"Ingress", "Egress"},
        "NetworkPolicy must restrict Ingress and Egress",
    )
    ingress_ports = {
        port.get("port") for r in netpol["spec"].get("ingress", []) for port in r.get("ports", [{}])
    }
    p.check(
        ingress_ports <= {"metrics", ports.get("metrics")} and ingress_ports,
        f"NetworkPolicy: ingress must allow the metrics port only, allows {sorted(map(str, ingress_ports))}",
    )
    egress = {
        (port.get("port"), port.get("protocol", "TCP"))
        for r in netpol["spec"].get("egress", [])
        for port in r.get("ports", [])
    }
    for needed in ((5432, "TCP"), (9092, "TCP"), (9093, "TCP"), (53, "UDP"), (53, "TCP")):
        p.check(needed in egress, f"NetworkPolicy: egress to {needed[0]}/{needed[1]} missing")
    p.checked.append("Service, PodDisruptionBudget and NetworkPolicy select the relay's pods; ports agree")

    # --- ServiceMonitor and PrometheusRule
    spec = monitor["spec"]
    service_labels = service["metadata"].get("labels", {})
    p.check(
        labels_match(spec["selector"].get("matchLabels", {}), service_labels),
        "ServiceMonitor selector does not match the Service",
    )
    for endpoint in spec.get("endpoints", []):
        p.check(
            endpoint.get("port") in service_ports,
            f"ServiceMonitor endpoint port {endpoint.get('port')} is not a Service port",
        )
        p.check(
            endpoint.get("path", "/metrics") == "/metrics", "ServiceMonitor endpoint path must be /metrics"
        )
    job = service_labels.get(spec.get("jobLabel", ""), service["metadata"]["name"])
    p.check(
        job == ALERT_JOB,
        f"ServiceMonitor gives the scrape job {job!r}; the alert rules select job={ALERT_JOB!r}",
    )
    p.check(
        rule.get("spec") == {"groups": load_rule_groups(RULES)},
        f"PrometheusRule spec differs from {RULES.relative_to(ROOT)}",
    )
    (outdir / f"{name}.rules.yml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False), encoding="utf-8")
    p.checked.append(
        f"ServiceMonitor scrapes the Service as job {ALERT_JOB!r}; PrometheusRule = the rules file"
    )
    return p.done()


# ----------------------------------------------------------------------------- alerts


def github_anchor(heading: str) -> str:
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def check_alerts() -> int:
    p = Problems("alert rules, runbooks and tests")
    alerts = alerts_of(load_rule_groups(RULES))
    anchors = {
        github_anchor(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+)$", RUNBOOKS.read_text(encoding="utf-8"), re.MULTILINE)
    }
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    for alert in alerts:
        name = alert["alert"]
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            p.check(bool(annotations.get(key)), f"{name}: no {key} annotation")
        p.check(
            alert.get("labels", {}).get("severity") in ("critical", "warning"),
            f"{name}: severity must be critical or warning",
        )
        url = annotations.get("runbook_url", "")
        p.check(
            url.split("#")[0].endswith("docs/runbooks.md") and "#" in url,
            f"{name}: runbook_url {url!r} must point at an anchor of docs/runbooks.md",
        )
        anchor = url.partition("#")[2]
        p.check(anchor in anchors, f"{name}: docs/runbooks.md has no heading with anchor #{anchor}")
        p.check(name in firing, f"{name}: no promtool test case where it fires")
        p.check(name in quiet, f"{name}: no promtool test case where it must not fire")
        for metric in set(METRIC_NAME.findall(alert["expr"])):
            p.check(metric in KNOWN_SERIES, f"{name}: {metric} is not a metric the relay exports")
    p.checked.append(
        f"{len(alerts)} alerts ({', '.join(a['alert'] for a in alerts)}): summary, description, "
        "severity, runbook anchor present in docs/runbooks.md, firing and non-firing test cases, "
        "known metric names"
    )
    return p.done()


# ----------------------------------------------------------------------------- dashboard


def check_dashboard(out_rules: Path) -> int:
    p = Problems(f"dashboard {DASHBOARD.relative_to(ROOT)}")
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        p.check(False, f"not valid JSON: {e}")
        return p.done()
    p.check(
        isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36,
        "schemaVersion missing or older than 36",
    )
    p.check(bool(dashboard.get("uid")) and bool(dashboard.get("title")), "uid and title are required")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    p.check(
        ds.get("type") == "datasource" and ds.get("query") == "prometheus",
        "needs a `datasource` variable of type datasource, query prometheus",
    )
    for name in ("job", "instance"):
        var = variables.get(name, {})
        p.check(var.get("type") == "query", f"needs a `{name}` query variable")
        p.check(
            var.get("datasource", {}).get("uid") == "${datasource}",
            f"variable {name} must use ${{datasource}}",
        )

    def all_panels(panels):
        for panel in panels:
            yield panel
            yield from all_panels(panel.get("panels", []))

    exprs: list[tuple[str, str, str]] = []
    ids: list[int] = []
    names: set[str] = set()
    panels = list(all_panels(dashboard.get("panels", [])))
    for panel in panels:
        ids.append(panel.get("id"))
        title = panel.get("title", "?")
        p.check("gridPos" in panel, f"panel {title!r}: no gridPos")
        if panel.get("type") == "row":
            continue
        p.check(
            panel.get("datasource", {}).get("uid") == "${datasource}",
            f"panel {title!r}: datasource must be ${{datasource}}",
        )
        targets = panel.get("targets", [])
        p.check(bool(targets), f"panel {title!r}: no targets")
        for target in targets:
            expr = target.get("expr", "")
            p.check(bool(expr.strip()), f"panel {title!r} target {target.get('refId')}: empty expr")
            p.check(
                target.get("datasource", {}).get("uid") == "${datasource}",
                f"panel {title!r} target {target.get('refId')}: datasource must be ${{datasource}}",
            )
            for metric in METRIC_NAME.findall(expr):
                names.add(metric)
                p.check(
                    metric in KNOWN_SERIES, f"panel {title!r}: {metric} is not a metric the relay exports"
                )
            slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
            exprs.append(
                (title, f"dashboard:panel_{panel.get('id')}_{slug}:{target.get('refId', 'A')}", expr)
            )
    p.check(len(ids) == len(set(ids)), "panel ids are not unique")
    for var in variables.values():
        for metric in METRIC_NAME.findall(json.dumps(var.get("query", ""))):
            names.add(metric)
            p.check(
                metric in KNOWN_SERIES, f"variable {var['name']}: {metric} is not a metric the relay exports"
            )

    # Every query as a recording rule, for `promtool check rules` to parse the PromQL. The
    # dashboard's variables become what Grafana would put there.
    substitutions = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": "outbox-relay",
        "$instance": ".*",
    }
    rules = []
    for title, record, expr in exprs:
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        p.check("$" not in expr, f"panel {title!r}: unknown variable in {expr!r}")
        rules.append({"record": record, "expr": expr})
    out_rules.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False), encoding="utf-8"
    )
    missing = sorted(n for n in COUNTERS | GAUGES | HISTOGRAMS if not any(x.startswith(n) for x in names))
    p.checked.append(
        f"{len(panels)} panels, {len(exprs)} queries: ${{datasource}} everywhere, job and "
        f"instance variables, {len(names)} distinct outbox_relay_* names all exported by the relay"
        + (f" (not shown: {', '.join(missing)})" if missing else "")
    )
    return p.done()


# ----------------------------------------------------------------------------- env file


def check_envfile(path: Path) -> int:
    p = Problems(f"environment file {path}")
    names = []
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not p.check(bool(sep), f"line {number}: not NAME=value"):
            continue
        names.append(name)
        if name.startswith("OUTBOX_RELAY_"):
            env[name] = value
    refusal = relay_refusal(None, env)
    if p.check(refusal is None, f"{path}: the relay refuses these variables: {refusal}"):
        p.checked.append(f"{path}: {', '.join(names)} pass `outbox-relay check --config-only`")
    return p.done()


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "manifests" and len(argv) == 4:
        return check_manifests(Path(argv[1]), Path(argv[2]), argv[3])
    if argv == ["alerts"]:
        return check_alerts()
    if len(argv) == 2 and argv[0] == "envfile":
        return check_envfile(Path(argv[1]))
    if len(argv) == 2 and argv[0] == "dashboard":
        return check_dashboard(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
