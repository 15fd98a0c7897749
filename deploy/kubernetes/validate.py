#!/usr/bin/env python3
"""Validates the manifests under deploy/kubernetes offline, overlay by overlay.

- Each overlay's resources are gathered by following its kustomization's `resources`
  (directories and files), as kustomize does.
- Core kinds are checked against the Kubernetes schemas (kubernetes-validate, strict: no
  unknown fields).
- InferencePool (inference.networking.k8s.io/v1) and HTTPRoute (gateway.networking.k8s.io/v1)
  are checked against the fields their v1 APIs define (written out below), and the
  endpoint picker's EndpointPickerConfig against its plugin references.
- Cross-references: the pool selects the Starling pods and targets their port, its picker
  reference names the picker's Service and port, the route points at the pool, the probes
  use Starling's health routes, and the grace period outlasts the server's own.

Writes each overlay's Starling config (from the ConfigMap) to OUT/<overlay>.yaml so the
caller can load it with Starling's own parser. Exit status 0 when everything holds.

Usage: validate.py OUT_DIR   (run with target/test-venv/bin/python; scripts/test-deps.sh)
"""
import json
import pathlib
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent
K8S_VERSION = "1.37.0"

LABELS = {"type": "object", "minProperties": 1, "maxProperties": 64,
          "additionalProperties": {"type": "string", "maxLength": 63}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
META = {"type": "object", "required": ["name"]}

INFERENCE_POOL = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": META,
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": LABELS}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True,
                                "items": {"type": "object", "required": ["number"], "additionalProperties": False,
                                          "properties": {"number": PORT}}},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1},
                        "port": {"type": "object", "required": ["number"], "additionalProperties": False,
                                 "properties": {"number": PORT}},
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}

BACKEND_REF = {"type": "object", "required": ["name"], "additionalProperties": False,
               "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                              "namespace": {"type": "string"}, "port": PORT, "weight": {"type": "integer"}}}
HTTP_ROUTE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": META,
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                                   "namespace": {"type": "string"}, "sectionName": {"type": "string"},
                                   "port": PORT}}},
                "hostnames": {"type": "array", "items": {"type": "string"}},
                "rules": {"type": "array", "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "matches": {"type": "array"},
                        "filters": {"type": "array"},
                        "backendRefs": {"type": "array", "items": BACKEND_REF},
                        "timeouts": {"type": "object", "additionalProperties": False,
                                     "properties": {"request": {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                                                    "backendRequest": {"type": "string"}}},
                    }}},
            },
        },
    },
}

CUSTOM = {("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
          ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE}


def gather(directory):
    """Every resource document of the kustomization in `directory`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += gather(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def check_overlay(name, docs, out):
    errors = []

    def expect(cond, message):
        if not cond:
            errors.append(message)

    for d in docs:
        key = (d["apiVersion"], d["kind"])
        where = f"{d['kind']}/{d['metadata']['name']}"
        if key in CUSTOM:
            for e in jsonschema.Draft202012Validator(CUSTOM[key]).iter_errors(d):
                errors.append(f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        else:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{where}: {'/'.join(map(str, e.path))}: {e.message}")

    if errors:
        # The references below assume well-formed objects.
        return errors
    starling = by_kind(docs, "Deployment", "starling")[0]
    pod = starling["spec"]["template"]
    container = pod["spec"]["containers"][0]
    expect(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe is not /readyz")
    expect(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe is not /healthz")
    config_map = by_kind(docs, "ConfigMap", "starling-config")[0]
    config_text = config_map["data"]["starling.yaml"]
    config = yaml.safe_load(config_text)
    grace = config.get("server", {}).get("shutdown_grace_secs", 10)
    expect(pod["spec"]["terminationGracePeriodSeconds"] > grace,
           f"terminationGracePeriodSeconds must outlast server.shutdown_grace_secs ({grace})")
    bind_port = int(config["server"]["bind"].rsplit(":", 1)[1])
    expect(container["ports"][0]["containerPort"] == bind_port, "the container port is not the server's bind port")
    (out / f"{name}.yaml").write_text(config_text)

    for pool in by_kind(docs, "InferencePool"):
        labels = pool["spec"]["selector"]["matchLabels"]
        expect(all(pod["metadata"]["labels"].get(k) == v for k, v in labels.items()),
               "the InferencePool selector does not select the Starling pods")
        expect([p["number"] for p in pool["spec"]["targetPorts"]] == [bind_port],
               "the InferencePool does not target the server's port")
        ref = pool["spec"].get("endpointPickerRef")
        expect(ref is not None, "the InferencePool names no endpoint picker")
        services = by_kind(docs, "Service", ref["name"]) if ref else []
        expect(len(services) == 1, f"no Service {ref and ref['name']} for the endpoint picker")
        if services:
            ports = [p["port"] for p in services[0]["spec"]["ports"]]
            expect(ref["port"]["number"] in ports, "the picker reference's port is not a port of its Service")
        epp = by_kind(docs, "Deployment", "starling-epp")[0]
        args = " ".join(epp["spec"]["template"]["spec"]["containers"][0]["args"])
        expect(f"--pool-name={pool['metadata']['name']}" in args, "the picker is not given the pool's name")
        expect(not re.search(r"--(total-queued-requests|total-running-requests|kv-cache-usage-percentage)-metric",
                             args), "deprecated metric flags stop the picker from starting")
        picker = yaml.safe_load(by_kind(docs, "ConfigMap", "starling-epp-config")[0]["data"]["default-plugins.yaml"])
        expect(picker["kind"] == "EndpointPickerConfig", "the picker config is not an EndpointPickerConfig")
        defined = {p.get("name", p["type"]) for p in picker["plugins"]}
        for profile in picker["schedulingProfiles"]:
            for p in profile["plugins"]:
                expect(p["pluginRef"] in defined, f"profile {profile['name']} refers to undefined {p['pluginRef']}")
        for route in by_kind(docs, "HTTPRoute"):
            refs = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
            expect(all(b.get("kind") == "InferencePool" and b.get("group") == "inference.networking.k8s.io"
                       and b["name"] == pool["metadata"]["name"] for b in refs),
                   "the HTTPRoute does not send its traffic to the InferencePool")
    return errors


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    report, failed = {}, False
    for name in ["base", "overlays/autoscale", "overlays/gie"]:
        docs = gather(ROOT / name)
        errors = check_overlay(name.replace("/", "-"), docs, out)
        report[name] = {"resources": sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs), "errors": errors}
        failed |= bool(errors)
    print(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
