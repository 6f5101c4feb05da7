//! The deployment files under deploy/: the Helm chart renders (default values, and every
//! optional part on) and every object it renders, and every plain manifest, is valid against
//! the Kubernetes schemas of [`KUBERNETES`] (strict: unknown fields refused); the plain
//! manifests are the chart rendered; the monitors select what they scrape; the alert rules pass
//! `promtool check rules` and their unit tests; the dashboard and the rules use only documented
//! metrics; and the agent, started with exactly the capabilities the rendered DaemonSet grants,
//! attaches and counts exactly.
//!
//! Tools: the venv `cargo xtask setup` makes (helm-python-sdk renders the chart with Helm's own
//! Go library, shipped in the wheel; kubernetes-validate has the schemas), Debian's `promtool`
//! and `setpriv`. A missing tool fails the test naming `cargo xtask setup`: nothing skips.
//! The kernel test needs root (CI runs it as root).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use outflow_tests::{
    agent::{Agent, PinDir, agent_bin, run_bin_to_completion, run_to_completion},
    cgroup::TestCgroup,
    netns::NetnsPair,
    peer::Outcome,
    peer::{Client, Server},
    records::{ConnRecord, ConnTotals, Role, conn_records},
    testpeer_bin,
    tools::{program, run_ok, venv_python, workspace_root},
};
use serde_json::Value;

/// The Kubernetes release whose schemas the objects must satisfy (the chart's `kubeVersion`
/// asks for 1.30 or later; 1.33 is the oldest release still supported upstream).
const KUBERNETES: &str = "1.33.0";
/// Release name and namespace the chart is rendered with (those of the plain manifests).
const RELEASE: &str = "outflow";
const NAMESPACE: &str = "outflow";

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn chart() -> PathBuf {
    deploy("helm/outflow")
}

fn everything_values() -> PathBuf {
    chart().join("ci/everything-values.yaml")
}

/// Runs deploy/tools/outflow_deploy.py with the tools venv's python.
fn deploy_tool(what: &str, args: &[&str]) -> String {
    let python = venv_python(&["helm_python", "kubernetes_validate", "yaml"]);
    let out = run_ok(
        what,
        Command::new(python)
            .arg(deploy("tools/outflow_deploy.py"))
            .args(args),
    );
    String::from_utf8(out.stdout).expect("the tool prints UTF-8")
}

/// One rendered template or file: its objects.
struct Source {
    template: String,
    docs: Vec<Value>,
}

fn sources(json: &str) -> Vec<Source> {
    let v: Value = serde_json::from_str(json).expect("the tool prints JSON");
    v.as_array()
        .expect("a list of sources")
        .iter()
        .map(|s| Source {
            template: s["template"].as_str().expect("template").to_string(),
            docs: s["docs"].as_array().expect("docs").clone(),
        })
        .collect()
}

/// The chart rendered with `values` (a file) or its defaults.
fn render(values: Option<&Path>) -> Vec<Source> {
    let mut args = vec![
        "render".to_string(),
        chart().display().to_string(),
        RELEASE.into(),
        NAMESPACE.into(),
    ];
    args.extend(values.map(|v| v.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sources(&deploy_tool("helm render", &args))
}

fn objects(sources: &[Source]) -> Vec<&Value> {
    sources.iter().flat_map(|s| &s.docs).collect()
}

fn object<'a>(objects: &[&'a Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the rendered objects"))
}

/// Validates the files (Kubernetes kinds against [`KUBERNETES`]'s schemas, strict;
/// prometheus-operator kinds structurally); returns how many objects they hold.
fn validate(files: &[PathBuf]) -> u64 {
    let mut args = vec!["validate".to_string(), KUBERNETES.to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = deploy_tool("kubernetes-validate", &args);
    let report: Value = serde_json::from_str(&out).expect("a JSON report");
    assert_eq!(report["problems"], 0, "{out}");
    report["objects"].as_u64().expect("objects")
}

/// Renders the chart as text into a temporary file and validates it.
fn render_and_validate(tag: &str, values: Option<&Path>) -> u64 {
    let values = values.map_or_else(|| "-".to_string(), |v| v.display().to_string());
    let text = deploy_tool(
        "helm template",
        &[
            "render-text",
            &chart().display().to_string(),
            RELEASE,
            NAMESPACE,
            &values,
        ],
    );
    let dir = std::env::temp_dir().join(format!("outflow-deploy-{}-{tag}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("rendered.yaml");
    fs::write(&file, text).expect("write the render");
    let n = validate(std::slice::from_ref(&file));
    fs::remove_dir_all(&dir).ok();
    n
}

/// The agent container of the rendered DaemonSet.
fn agent_container(objects: &[&Value]) -> Value {
    let ds = object(objects, "DaemonSet", "outflow-agent");
    ds["spec"]["template"]["spec"]["containers"][0].clone()
}

/// The capabilities the container adds, as Kubernetes names them (`BPF`, `NET_ADMIN`).
fn added_capabilities(container: &Value) -> Vec<String> {
    container["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_string())
        .collect()
}

#[test]
fn the_chart_renders_valid_objects_with_its_default_values() {
    let n = render_and_validate("default", None);
    assert_eq!(
        n, 6,
        "two ConfigMaps, a DaemonSet, two Services, a StatefulSet"
    );
    let rendered = render(None);
    let objects = objects(&rendered);
    assert!(
        objects
            .iter()
            .all(|o| !o["apiVersion"].as_str().unwrap_or("").contains("coreos")),
        "the monitors (CRD kinds) are off by default"
    );
}

#[test]
fn the_chart_renders_valid_objects_with_everything_turned_on() {
    let n = render_and_validate("everything", Some(&everything_values()));
    assert_eq!(
        n, 8,
        "the default objects, a PodMonitor and a ServiceMonitor"
    );
    let rendered = render(Some(&everything_values()));
    let objects = objects(&rendered);
    object(&objects, "PodMonitor", "outflow-agent");
    object(&objects, "ServiceMonitor", "outflow-collector");
    let caps = added_capabilities(&agent_container(&objects));
    assert!(caps.contains(&"SYS_RESOURCE".to_string()), "{caps:?}");
    let config = object(&objects, "ConfigMap", "outflow-agent")["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml");
    for line in [
        "[export.labels]",
        "[attribution]",
        "local_ports = [8000, 8080]",
    ] {
        assert!(config.contains(line), "{line:?} in\n{config}");
    }
}

#[test]
fn the_chart_is_lint_clean() {
    for values in [None, Some(everything_values())] {
        let mut args = vec!["lint".to_string(), chart().display().to_string()];
        args.extend(values.as_ref().map(|v| v.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        deploy_tool("helm lint --strict", &args);
    }
}

/// The plain manifests are valid, and are the chart rendered: outflow.yaml with the default
/// values, monitoring.yaml the monitors of ci/monitors-values.yaml (object by object, comments
/// and layout aside).
#[test]
fn the_plain_manifests_are_valid_and_are_the_chart_rendered() {
    let dir = deploy("kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["monitoring.yaml", "namespace.yaml", "outflow.yaml"],
        "the files this test knows"
    );
    assert_eq!(validate(&files), 9);

    let load = |file: &str| -> Vec<Value> {
        let path = dir.join(file).display().to_string();
        sources(&deploy_tool("load", &["load", &path]))
            .into_iter()
            .flat_map(|s| s.docs)
            .collect()
    };
    let rendered: Vec<Value> = render(None).into_iter().flat_map(|s| s.docs).collect();
    assert!(
        load("outflow.yaml") == rendered,
        "deploy/kubernetes/outflow.yaml is not the chart rendered with its default values: \
         render it again (deploy/kubernetes/README.md)"
    );
    let monitors: Vec<Value> = render(Some(&chart().join("ci/monitors-values.yaml")))
        .into_iter()
        .filter(|s| s.template.ends_with("/monitors.yaml"))
        .flat_map(|s| s.docs)
        .collect();
    assert!(
        load("monitoring.yaml") == monitors,
        "deploy/kubernetes/monitoring.yaml is not the chart's monitors rendered: render it again \
         (deploy/kubernetes/README.md)"
    );
    let ns = load("namespace.yaml");
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0]["kind"], "Namespace");
    assert_eq!(ns[0]["metadata"]["name"], NAMESPACE);
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("a label value").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn port_names(container: &Value) -> BTreeSet<String> {
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["name"].as_str().expect("a named port").to_string())
        .collect()
}

/// What the schemas cannot see: selectors and port names agree between the objects.
#[test]
fn services_and_monitors_select_the_pods_and_ports_they_mean() {
    let rendered = render(Some(&everything_values()));
    let objects = objects(&rendered);
    let ds = object(&objects, "DaemonSet", "outflow-agent");
    let sts = object(&objects, "StatefulSet", "outflow-collector");
    let agent_pod = labels(&ds["spec"]["template"]["metadata"]["labels"]);
    let collector_pod = labels(&sts["spec"]["template"]["metadata"]["labels"]);
    assert!(selects(
        &labels(&ds["spec"]["selector"]["matchLabels"]),
        &agent_pod
    ));
    assert!(selects(
        &labels(&sts["spec"]["selector"]["matchLabels"]),
        &collector_pod
    ));
    assert!(
        !selects(&labels(&sts["spec"]["selector"]["matchLabels"]), &agent_pod),
        "the collector's selector must not take the agents"
    );
    let agent_ports = port_names(&ds["spec"]["template"]["spec"]["containers"][0]);
    let collector_ports = port_names(&sts["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(agent_ports, BTreeSet::from(["metrics".to_string()]));

    let svc = object(&objects, "Service", "outflow-collector");
    assert!(selects(&labels(&svc["spec"]["selector"]), &collector_pod));
    let svc_ports: BTreeSet<String> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            let target = p["targetPort"].as_str().expect("a named target port");
            assert!(collector_ports.contains(target), "{p}");
            p["name"].as_str().expect("name").to_string()
        })
        .collect();
    assert_eq!(
        svc_ports,
        BTreeSet::from(["grpc".to_string(), "metrics".to_string()])
    );
    let headless = object(&objects, "Service", "outflow-collector-headless");
    assert_eq!(sts["spec"]["serviceName"], "outflow-collector-headless");
    assert!(selects(
        &labels(&headless["spec"]["selector"]),
        &collector_pod
    ));

    // The agents' collector URL names the Service and its gRPC port.
    let config = object(&objects, "ConfigMap", "outflow-agent")["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml");
    let default_objects = render(None);
    let default_config = object(
        &self::objects(&default_objects),
        "ConfigMap",
        "outflow-agent",
    )["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml")
        .to_string();
    assert!(
        default_config.contains("collector = \"https://outflow-collector.outflow.svc:7411\""),
        "{default_config}"
    );
    assert!(config.contains("collector.example.internal"), "{config}");

    // Probes reach the ports the processes listen on.
    for (container, port) in [
        (&ds["spec"]["template"]["spec"]["containers"][0], "metrics"),
        (&sts["spec"]["template"]["spec"]["containers"][0], "metrics"),
    ] {
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], port);
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], port);
    }
    assert!(
        default_config.contains("metrics_listen = \"0.0.0.0:9410\""),
        "{default_config}"
    );
    let ds_port = &ds["spec"]["template"]["spec"]["containers"][0]["ports"][0];
    assert_eq!(ds_port["containerPort"], 9410);

    let pm = object(&objects, "PodMonitor", "outflow-agent");
    assert!(selects(
        &labels(&pm["spec"]["selector"]["matchLabels"]),
        &agent_pod
    ));
    for e in pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("endpoints")
    {
        assert!(
            agent_ports.contains(e["port"].as_str().expect("port")),
            "{e}"
        );
    }
    let sm = object(&objects, "ServiceMonitor", "outflow-collector");
    assert!(selects(
        &labels(&sm["spec"]["selector"]["matchLabels"]),
        &labels(&svc["metadata"]["labels"])
    ));
    for e in sm["spec"]["endpoints"].as_array().expect("endpoints") {
        assert!(svc_ports.contains(e["port"].as_str().expect("port")), "{e}");
    }
}

/// The DaemonSet grants the capabilities `outflow-agent check` asks for and nothing else:
/// not privileged, everything else dropped, no host namespaces, no tracefs.
#[test]
fn the_daemonset_grants_exactly_what_the_agent_checks_for() {
    let rendered = render(None);
    let objects = objects(&rendered);
    let container = agent_container(&objects);
    let sc = &container["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let granted: BTreeSet<String> = added_capabilities(&container).into_iter().collect();

    // The capability rows of `outflow-agent check`: "capability CAP_X (or CAP_SYS_ADMIN)".
    // CAP_SYS_ADMIN alone is asked for only to mount bpffs where none is: the DaemonSet mounts
    // the host's.
    let (status, out, err) = run_to_completion(&["check", "--output", "json"]);
    assert!(status.success(), "outflow-agent check: {err}");
    let report: Value = serde_json::from_str(&out).expect("check prints JSON");
    let wanted: BTreeSet<String> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["feature"].as_str()?.strip_prefix("capability CAP_"))
        .filter(|f| !f.starts_with("SYS_ADMIN"))
        .map(|f| f.split_whitespace().next().expect("a name").to_string())
        .collect();
    assert_eq!(
        wanted,
        BTreeSet::from(["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]),
        "{out}"
    );
    assert_eq!(granted, wanted, "the DaemonSet's capabilities");

    let pod = &object(&objects, "DaemonSet", "outflow-agent")["spec"]["template"]["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[host].is_null() || pod[host] == false, "{host}: {pod}");
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    let host_paths: BTreeSet<&str> = volumes
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/outflow"]),
        "bpffs, cgroup2 and the state directory; no tracefs"
    );
    // Secret files the agent refuses unless only their owner may read them.
    let token = volumes
        .iter()
        .find(|v| v["name"] == "token")
        .expect("token volume");
    assert_eq!(token["secret"]["defaultMode"], 0o400);
}

/// The ConfigMaps' agent.toml and collector.toml are configurations the programs accept.
#[test]
fn the_rendered_configurations_are_accepted_by_the_agent_and_the_collector() {
    for values in [None, Some(everything_values())] {
        let rendered = render(values.as_deref());
        let objects = objects(&rendered);
        let agent_toml = object(&objects, "ConfigMap", "outflow-agent")["data"]["agent.toml"]
            .as_str()
            .expect("agent.toml");
        let config = outflow_agent::config::Config::parse(agent_toml).unwrap_or_else(|e| {
            panic!("the agent refuses the ConfigMap's agent.toml: {e}\n{agent_toml}")
        });
        config
            .validate()
            .unwrap_or_else(|e| panic!("the agent refuses the ConfigMap's agent.toml: {e}"));
        assert_eq!(
            config.cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/kubepods.slice"))
        );

        let collector_toml =
            object(&objects, "ConfigMap", "outflow-collector")["data"]["collector.toml"]
                .as_str()
                .expect("collector.toml");
        let dir =
            std::env::temp_dir().join(format!("outflow-deploy-config-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join(format!("collector-{}.toml", values.is_some()));
        fs::write(&file, collector_toml).expect("write collector.toml");
        run_ok(
            "outflow-collector print-config with the ConfigMap's collector.toml",
            Command::new(collector_bin())
                .args(["print-config", "--config"])
                .arg(&file),
        );
        fs::remove_file(&file).ok();
    }
}

/// `outflow-collector` beside the agent binary (the same cargo profile directory).
fn collector_bin() -> PathBuf {
    let bin = agent_bin().with_file_name("outflow-collector");
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build -p outflow-collector`",
        bin.display()
    );
    bin
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let promtool = program("promtool", "prometheus");
    let dir = deploy("prometheus");
    let out = run_ok(
        "promtool check rules",
        Command::new(&promtool)
            .args(["check", "rules", "rules.yaml"])
            .current_dir(&dir),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 13 rules found"), "{text}");
    let out = run_ok(
        "promtool test rules",
        Command::new(&promtool)
            .args(["test", "rules", "rules_test.yaml"])
            .current_dir(&dir),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");

    // Every rule has a unit test: an alert_rule_test names it.
    let rules = fs::read_to_string(dir.join("rules.yaml")).expect("rules.yaml");
    let tests = fs::read_to_string(dir.join("rules_test.yaml")).expect("rules_test.yaml");
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 13, "{names:?}");
    for name in names {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "no unit test for {name}"
        );
    }
}

/// Metric names of a doc table: lines "//! | `name{labels}` | type | meaning |".
fn documented_metrics(file: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the metric table of the operator interface belongs at the top of this \
             file (the collector's format: //! | `name{{labels}}` | type | meaning |)",
            file.display()
        )
    });
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("//! | `"))
        .filter_map(|l| l.split('`').next())
        .map(|n| n.split('{').next().unwrap_or(n).to_string())
        .collect();
    assert!(!names.is_empty(), "{}: no metric table", file.display());
    names
}

/// The `outflow_agent_*` and `outflow_collector_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["outflow_agent_", "outflow_collector_"] {
        for (at, _) in text.match_indices(prefix) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// A name used in a query is documented, or is a documented histogram's series.
fn undocumented(used: &BTreeSet<String>, documented: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|n| {
            !documented.contains(*n)
                && !["_bucket", "_sum", "_count"].iter().any(|s| {
                    n.strip_suffix(s)
                        .is_some_and(|base| documented.contains(base))
                })
        })
        .cloned()
        .collect()
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "expr" {
                    out.push(v.as_str().expect("expr is a string").to_string());
                } else {
                    exprs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_is_valid_json_with_a_query_in_every_panel() {
    let text = fs::read_to_string(deploy("grafana/outflow.json")).expect("the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("an id")),
            "id twice: {p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert!(!t["expr"].as_str().expect("expr").is_empty(), "{t}");
        }
    }
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    // Clients only through the bounded top-N, never one series per client: a query that
    // names the `client` label is one of the top-N metric.
    for e in &all {
        let names_client = e.match_indices("client").any(|(at, w)| {
            let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            !e[..at].chars().next_back().is_some_and(word)
                && !e[at + w.len()..].chars().next().is_some_and(word)
        });
        if names_client {
            assert!(
                e.contains("outflow_collector_top_client_response_bytes"),
                "clients only from the top-N: {e}"
            );
        }
    }
    let sections: BTreeSet<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(sections.len(), 4, "{sections:?}");
}

/// Every metric the dashboard's queries and the rules use is in a documented table: the
/// collector's at the top of collector/src/metrics.rs, the agent's at the top of
/// agent/src/metrics.rs (the operator interface's table, in the same format).
#[test]
fn the_dashboard_and_the_rules_use_only_documented_metrics() {
    let root = workspace_root();
    let collector = documented_metrics(&root.join("collector/src/metrics.rs"));
    let agent = documented_metrics(&root.join("agent/src/metrics.rs"));
    assert!(
        collector
            .iter()
            .all(|n| n.starts_with("outflow_collector_"))
    );
    assert!(agent.iter().all(|n| n.starts_with("outflow_agent_")));
    let documented: BTreeSet<String> = collector.union(&agent).cloned().collect();

    let dash: Value =
        serde_json::from_str(&fs::read_to_string(deploy("grafana/outflow.json")).expect("read"))
            .expect("JSON");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let in_dashboard = metric_names(&all.join("\n"));
    let in_rules =
        metric_names(&fs::read_to_string(deploy("prometheus/rules.yaml")).expect("rules.yaml"));
    assert!(in_dashboard.len() > 20 && in_rules.len() > 8);
    assert!(in_dashboard.contains("outflow_collector_top_client_response_bytes"));
    let missing: Vec<(&str, Vec<String>)> = [
        (
            "deploy/grafana/outflow.json",
            undocumented(&in_dashboard, &documented),
        ),
        (
            "deploy/prometheus/rules.yaml",
            undocumented(&in_rules, &documented),
        ),
    ]
    .into_iter()
    .filter(|(_, m)| !m.is_empty())
    .collect();
    assert!(
        missing.is_empty(),
        "metrics used but in no doc table (collector/src/metrics.rs, agent/src/metrics.rs): {missing:?}"
    );
}

/// Capability numbers (include/uapi/linux/capability.h) of the names a DaemonSet may add.
fn capability_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number here"),
    }
}

/// A set line of /proc/PID/status ("CapEff:\t00000000000000c0") as a mask.
fn status_caps(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("a hex mask")
}

/// `setpriv` arguments that run `bin` as root with exactly `caps` (Kubernetes names) in the
/// bounding, inheritable and ambient sets (so in the permitted and effective sets after exec),
/// and no new privileges.
fn setpriv_args(caps: &[String], bin: &Path) -> Vec<String> {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let sets = format!("-all,{}", list.join(","));
    vec![
        format!("--bounding-set={sets}"),
        format!("--inh-caps={sets}"),
        format!("--ambient-caps={sets}"),
        "--no-new-privs".into(),
        "--".into(),
        bin.to_str().expect("a UTF-8 path").into(),
    ]
}

/// None of the DaemonSet's capabilities is one too many: without any one of them the agent
/// refuses to start, in one line naming it.
#[test]
fn the_agent_refuses_to_start_without_any_one_of_the_daemonsets_capabilities() {
    let rendered = render(None);
    let caps = added_capabilities(&agent_container(&objects(&rendered)));
    let setpriv = program("setpriv", "util-linux");
    let pin = PinDir::new("deploy-fewer-caps");
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let mut args = setpriv_args(&fewer, &agent_bin());
        args.extend(
            ["--pin-dir", pin.as_arg(), "--metrics-listen", "127.0.0.1:0"].map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, stderr) = run_bin_to_completion(&setpriv, &args);
        assert!(!status.success(), "started without {dropped}: {stderr}");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: missing capability")
                    && l.contains(&format!("CAP_{dropped}"))),
            "without {dropped}: {stderr}"
        );
        assert!(!pin.path().exists(), "nothing pinned without {dropped}");
    }
}

const PORT: u16 = 8000;
const WAIT: Duration = Duration::from_secs(90);

/// The agent, started with exactly the capabilities the rendered DaemonSet adds (root, every
/// other capability gone from the bounding, inheritable, ambient, permitted and effective
/// sets, no new privileges, as `allowPrivilegeEscalation: false` gives), attaches and counts
/// every byte of a transfer exactly.
#[test]
fn the_agent_with_exactly_the_daemonsets_capabilities_counts_exactly() {
    let rendered = render(None);
    let caps = added_capabilities(&agent_container(&objects(&rendered)));
    let mask: u64 = caps.iter().map(|c| 1u64 << capability_number(c)).sum();
    let tag = "deploy-caps";
    let pair = NetnsPair::new(tag);
    let cgroup = TestCgroup::new(tag);
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    let client = Client::new(&pair);
    let pin = PinDir::new(tag);
    let bin = agent_bin();
    let mut args = setpriv_args(&caps, &bin);
    args.extend(
        [
            "--cgroup",
            cgroup.as_arg(),
            "--pin-dir",
            pin.as_arg(),
            "--interval",
            "200ms",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start_bin(&program("setpriv", "util-linux"), &args);
    let started = agent.wait_started(WAIT);
    assert_eq!(started["adopted"], false, "{started}");
    for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
        assert_eq!(
            status_caps(agent.pid(), field),
            mask,
            "{field} of the agent: exactly {caps:?}"
        );
    }
    let no_new_privs = fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .expect("status")
        .lines()
        .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]));
    assert!(no_new_privs, "the agent runs with no_new_privs");

    let sizes = [
        (10_000_000, 1_000),
        (1, 1),
        (0, 0),
        (65_536, 65_535),
        (1_448, 1_447),
    ];
    let outcomes = client.request_many(pair.server_v4(PORT), sizes.len(), &sizes, 2);
    let results = server.wait_results(outcomes.len(), WAIT);
    let of = |conns: &[ConnRecord], o: &Outcome| {
        conns
            .iter()
            .filter(|c| c.remote_addr == o.local_addr && c.remote_port == o.local_port)
            .cloned()
            .collect::<Vec<_>>()
    };
    let records = agent.wait_until(WAIT, |r| {
        let conns = conn_records(r);
        outcomes
            .iter()
            .all(|o| of(&conns, o).iter().any(|c| c.closed))
    });
    let conns = conn_records(&records);
    for o in &outcomes {
        let recs = of(&conns, o);
        let mut t = ConnTotals::default();
        recs.iter().for_each(|r| t.add(r));
        let result = o.server_result(&results);
        assert_eq!(t.closed, 1, "closed exactly once: {o:?} {recs:#?}");
        assert_eq!(
            t.bytes_out, o.received,
            "bytes_out vs the client's view: {o:?}"
        );
        assert_eq!(t.bytes_in, o.sent, "bytes_in vs the client's view: {o:?}");
        assert_eq!(t.bytes_out, result.bytes_acked, "vs tcp_info: {result:?}");
        assert_eq!(t.bytes_in, result.bytes_received, "vs tcp_info: {result:?}");
        for r in &recs {
            assert_eq!(r.role, Role::Server, "{r:?}");
            assert_eq!(r.cgroup_id, cgroup.id(), "{r:?}");
            assert_eq!(r.local_port, PORT, "{r:?}");
        }
    }
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}
