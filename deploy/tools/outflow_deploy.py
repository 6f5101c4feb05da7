"""Renders and validates outflow's deployment files; run by tests/tests/deploy.rs with the
venv that `cargo xtask setup` makes (helm-python-sdk, kubernetes-validate).

  render CHART NAME NAMESPACE [VALUES.yaml]  print the rendered chart as JSON:
                                             [{"template": path, "docs": [object, ...]}]
  render-text CHART NAME NAMESPACE VALUES|- [TEMPLATE...]
                                             print the rendered YAML (of these templates only,
                                             when named), as `helm template` does
  load FILE...                               print the YAML documents of each file as JSON:
                                             [{"template": file, "docs": [...]}]
  validate VERSION FILE...                   validate every object of the files: Kubernetes
                                             kinds against VERSION's schemas (strict),
                                             prometheus-operator kinds structurally
  lint CHART [VALUES.yaml]                   helm lint --strict; prints the findings

Exit status 0 when all is well; otherwise one line per problem on stderr.
"""
import json
import sys

import yaml


def docs_of(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def values_of(path):
    if path is None:
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def render(chart_dir, name, namespace, values_path=None):
    from helm_python import Chart

    with Chart.load(chart_dir) as chart:
        out = chart.render(
            values=values_of(values_path), name=name, namespace=namespace, is_install=True
        )
    return [
        {"template": path, "docs": docs_of(text)}
        for path, text in sorted(out.items())
        if path.endswith((".yaml", ".yml")) and docs_of(text)
    ]


def render_text(chart_dir, name, namespace, values_path, only):
    from helm_python import Chart

    with Chart.load(chart_dir) as chart:
        out = chart.render(
            values=values_of(values_path), name=name, namespace=namespace, is_install=True
        )
    parts = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")) or not docs_of(text):
            continue
        if only and path.split("/")[-1] not in only:
            continue
        parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


def load(paths):
    out = []
    for path in paths:
        with open(path) as f:
            out.append({"template": path, "docs": docs_of(f.read())})
    return out


# The parts of prometheus-operator's PodMonitor and ServiceMonitor (monitoring.coreos.com/v1)
# these files use, as the operator's CRDs define them; unknown fields are refused, as the API
# server's structural schemas prune or refuse them.
_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": _NAME,
        "path": {"type": "string", "pattern": "^/"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "scheme": {"enum": ["http", "https"]},
        "relabelings": {"type": "array", "items": _RELABEL},
    },
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["matchLabels"],
    "properties": {"matchLabels": _LABELS},
}
_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "namespace"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _LABELS, "annotations": _LABELS},
}


def _monitor(kind, endpoints):
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    "selector": _SELECTOR,
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


CRD_SCHEMAS = {
    "PodMonitor": _monitor("PodMonitor", "podMetricsEndpoints"),
    "ServiceMonitor": _monitor("ServiceMonitor", "endpoints"),
}


def validate(version, paths):
    import jsonschema
    import kubernetes_validate

    problems = []
    count = 0
    for path in paths:
        with open(path) as f:
            docs = docs_of(f.read())
        if not docs:
            problems.append(f"{path}: no Kubernetes object")
        for doc in docs:
            count += 1
            what = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            try:
                if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                    schema = CRD_SCHEMAS.get(doc.get("kind"))
                    if schema is None:
                        raise ValueError(f"no schema for kind {doc.get('kind')}")
                    jsonschema.Draft202012Validator(schema).validate(doc)
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                at = "/".join(str(p) for p in e.absolute_path)
                problems.append(f"{what}: at {at or '(top)'}: {e.message}")
            except Exception as e:  # an unknown kind or version
                problems.append(f"{what}: {type(e).__name__}: {e}")
    for p in problems:
        print(p, file=sys.stderr)
    print(json.dumps({"objects": count, "problems": len(problems)}))
    return 1 if problems else 0


def lint(chart_dir, values_path=None):
    from helm_python import lint as helm_lint

    report = helm_lint(chart_dir, values_of(values_path), strict=True, kube_version="v1.33.0")
    print(json.dumps(report))
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return 1 if bad or report.get("errors") else 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "render" and len(args) in (3, 4):
        print(json.dumps(render(*args)))
        return 0
    if cmd == "render-text" and len(args) >= 4:
        chart_dir, name, namespace, values_path = args[:4]
        sys.stdout.write(
            render_text(chart_dir, name, namespace, None if values_path == "-" else values_path, args[4:])
        )
        return 0
    if cmd == "load" and args:
        print(json.dumps(load(args)))
        return 0
    if cmd == "validate" and len(args) >= 2:
        return validate(args[0], args[1:])
    if cmd == "lint" and len(args) in (1, 2):
        return lint(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
