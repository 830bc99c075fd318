//! The Helm chart and the container images, checked with the real tools (pinned and installed by
//! scripts/tools.sh into target/tools/): `helm lint --strict` and `helm template` for every value
//! set in charts/egress-gateway/ci/ and the defaults; every rendered object validated against the
//! Kubernetes schemas in strict mode (kubernetes-validate, offline) for the oldest supported and the
//! newest Kubernetes; the rendered configs accepted by the release binaries; the values schema
//! rejecting wrong values; the security settings, RBAC and wiring between objects; hadolint on the
//! Dockerfile.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use egress_e2e::{repo_root, tools_dir};
use serde_json::{Value, json};

const CHART: &str = "charts/egress-gateway";
const NAMESPACE: &str = "egress-system";
/// The oldest Kubernetes the CRDs support (CEL IP/CIDR libraries) and the newest the validator knows.
const KUBE_VERSIONS: [&str; 2] = ["1.31.0", "1.37.0"];

fn tools() -> PathBuf {
    tools_dir(&["helm", "venv/bin/kubernetes-validate", "venv/bin/hadolint"])
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn helm() -> Command {
    let mut c = Command::new(tools().join("helm"));
    c.current_dir(repo_root());
    // No user state: no repositories, no cache, no kubeconfig.
    let home = std::env::temp_dir().join("egress-helm-home");
    c.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", "/dev/null");
    c
}

/// The value sets: the defaults (None) and every file in the chart's ci/ directory.
fn value_sets() -> Vec<Option<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo_root().join(CHART).join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "value sets: {v:?}");
    std::iter::once(None).chain(v.into_iter().map(Some)).collect()
}

fn label(set: &Option<PathBuf>) -> String {
    set.as_ref().map_or("default values".into(), |p| p.file_name().unwrap().to_string_lossy().into_owned())
}

/// `helm template` with the value set (and extra values), every document parsed.
fn render(set: &Option<PathBuf>, extra: &[&str]) -> Result<(String, Vec<Value>), String> {
    let mut c = helm();
    c.args(["template", "egress", CHART, "--namespace", NAMESPACE, "--include-crds"]);
    if let Some(f) = set {
        c.arg("--values").arg(f);
    }
    c.args(extra);
    let out = run(&mut c);
    if !out.status.success() {
        return Err(text(&out));
    }
    let yaml = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("helm output parses"))
        .filter(|v: &Value| !v.is_null())
        .collect();
    Ok((yaml, docs))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn get<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(docs, kind, name).unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn config_map_file(docs: &[Value], name: &str, key: &str) -> String {
    get(docs, "ConfigMap", name)["data"][key].as_str().unwrap_or_else(|| panic!("{name} has no {key}")).to_string()
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

const GATEWAY: &str = "egress-egress-gateway";
const REDIRECTOR: &str = "egress-egress-gateway-node-redirector";

#[test]
fn chart_crds_are_the_repository_crds() {
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        v.sort();
        v
    };
    let (repo, chart) = (repo_root().join("crds"), repo_root().join(CHART).join("crds"));
    assert_eq!(names(&repo), names(&chart), "the chart ships every CRD and only those");
    for n in names(&repo) {
        assert_eq!(
            std::fs::read(repo.join(&n)).unwrap(),
            std::fs::read(chart.join(&n)).unwrap(),
            "{CHART}/crds/{n} differs from crds/{n}: cargo run -p egress-crds --bin crdgen"
        );
    }
}

#[test]
fn every_value_set_lints_renders_and_validates_strictly() {
    let dir = tempfile::tempdir().unwrap();
    for set in value_sets() {
        let what = label(&set);
        let mut lint = helm();
        lint.args(["lint", "--strict", CHART]);
        if let Some(f) = &set {
            lint.arg("--values").arg(f);
        }
        let out = run(&mut lint);
        assert!(out.status.success(), "helm lint --strict ({what}):\n{}", text(&out));

        let (rendered, docs) = render(&set, &[]).unwrap_or_else(|e| panic!("helm template ({what}): {e}"));
        assert!(docs.len() >= 10, "{what}: {} objects", docs.len());
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &rendered).unwrap();
        for version in KUBE_VERSIONS {
            let out = run(Command::new(tools().join("venv/bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file));
            let report = text(&out);
            assert!(out.status.success(), "{what}, Kubernetes {version}:\n{report}");
            // Every object had a schema, except the Prometheus Operator's ServiceMonitor and
            // PrometheusRule (checked for their wiring, and the rules with promtool, elsewhere).
            for line in report.lines().filter(|l| l.starts_with("WARN") || l.starts_with("ERROR")) {
                assert!(
                    line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1")
                        || line.contains("kind PrometheusRule with api version monitoring.coreos.com/v1"),
                    "{what}: {line}"
                );
            }
            let passed = report.lines().filter(|l| l.starts_with("INFO") && l.contains("passed")).count();
            let monitors =
                docs.iter().filter(|d| d["kind"] == "ServiceMonitor" || d["kind"] == "PrometheusRule").count();
            assert_eq!(passed + monitors, docs.len(), "{what}, Kubernetes {version}: every object checked\n{report}");
        }
    }
}

/// The chart can never render a config the binaries reject: each rendered ConfigMap goes through
/// `egress-gateway validate` / `node-redirector validate` of the release build (what the images ship).
#[test]
fn rendered_configs_are_accepted_by_the_release_binaries() {
    let release = release_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut redirector_configs = 0;
    for set in value_sets() {
        let what = label(&set);
        let (_, docs) = render(&set, &[]).unwrap();
        let gw = dir.path().join("gateway.yaml");
        std::fs::write(&gw, config_map_file(&docs, GATEWAY, "gateway.yaml")).unwrap();
        let out = run(Command::new(release.join("egress-gateway")).arg("validate").arg("--config").arg(&gw));
        assert!(out.status.success(), "{what}: egress-gateway validate:\n{}", text(&out));
        if find(&docs, "ConfigMap", REDIRECTOR).is_some() {
            let rd = dir.path().join("node-redirector.yaml");
            std::fs::write(&rd, config_map_file(&docs, REDIRECTOR, "node-redirector.yaml")).unwrap();
            let out = run(Command::new(release.join("node-redirector"))
                .env("NODE_NAME", "node-1")
                .arg("validate")
                .arg("--config")
                .arg(&rd));
            assert!(out.status.success(), "{what}: node-redirector validate:\n{}", text(&out));
            redirector_configs += 1;
        }
    }
    assert!(redirector_configs >= 2, "value sets with the redirector on: {redirector_configs}");
    // And the check itself bites: a config the gateway rejects is reported.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: {http: 0.0.0.0:3128}\nlimits: {maxHeaderBytes: 10}\n").unwrap();
    let out = run(Command::new(release.join("egress-gateway")).arg("validate").arg("--config").arg(&bad));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // The schema only checks that `redirector.coalesce` is a duration; the binary bounds it.
    let bad = dir.path().join("bad-redirector.yaml");
    std::fs::write(
        &bad,
        "nodeName: n\ngateways: [127.0.0.1:1]\nrelay: {coalesce: 1s, addresses: [10.0.0.5, 10.0.0.6, \"::1\"]}\n",
    )
    .unwrap();
    let out = run(Command::new(release.join("node-redirector")).arg("validate").arg("--config").arg(&bad));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for problem in [
        "relay.coalesce: 1s is longer than 100ms",
        "relay.addresses: at most one IPv4 address",
        "relay.addresses: ::1 is not an address forwarded packets can be delivered to",
    ] {
        assert!(text(&out).contains(problem), "{problem}: {}", text(&out));
    }
}

fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("target/<profile>/deps/<test>").to_path_buf();
    let dir = target.join("release");
    for bin in ["egress-gateway", "node-redirector"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run ./scripts/build-release.sh (./scripts/test.sh does)",
            dir.join(bin).display()
        );
    }
    dir
}

#[test]
fn the_values_schema_rejects_wrong_values() {
    // (values file, words the error must contain)
    let cases: &[(&str, &str)] = &[
        ("gateway: {replicas: 0}", "replicas"),
        ("gateway: {replica: 2}", "Additional property replica is not allowed"),
        ("gateway: {defaultAction: allow}", "defaultAction"),
        ("gateway: {bindAddress: 10.0.0.1}", "bindAddress"),
        ("gateway: {ports: {http: 70000}}", "ports.http"),
        ("gateway: {ports: {http: \"3128\"}}", "ports.http"),
        ("gateway: {limits: {connectTimeout: 5}}", "connectTimeout"),
        ("gateway: {limits: {idleTimeout: 5 minutes}}", "idleTimeout"),
        ("gateway: {limits: {maxHeaderBytes: 1024}}", "maxHeaderBytes"),
        ("gateway: {limits: {tunnelCoalesce: 1}}", "tunnelCoalesce"),
        ("redirector: {coalesce: fast}", "coalesce"),
        ("redirector: {probeInterval: 1}", "probeInterval"),
        ("redirector: {relayAddresses: [node-ip]}", "relayAddresses"),
        ("redirector: {cni: {failurePolicy: Allow}}", "failurePolicy"),
        ("redirector: {uninstallTimeout: forever}", "uninstallTimeout"),
        ("redirector: {cni: {binDir: opt/cni/bin}}", "binDir"),
        ("redirector: {relayKey: {key: \"\"}}", "key"),
        ("redirector: {relayKey: {secret: x}}", "Additional property secret is not allowed"),
        ("gateway: {transparent: {relayMaxSkew: 30}}", "relayMaxSkew"),
        ("gateway: {transparent: {firstByteTimeout: soon}}", "firstByteTimeout"),
        ("gateway: {audit: {sinks: []}}", "sinks"),
        ("gateway: {audit: {sinks: [{type: syslog}]}}", "address"),
        ("gateway: {audit: {sinks: [{type: kafka}]}}", "type"),
        ("gateway: {audit: {sinks: [{type: stdout, address: \"a:1\"}]}}", "sinks"),
        ("gateway: {audit: {sinks: [{type: file, format: json}]}}", "path"),
        ("gateway: {audit: {sinks: [{type: stdout, format: xml}]}}", "format"),
        ("gateway: {audit: {onFailure: failSoft}}", "onFailure"),
        ("gateway: {audit: {checkpoint: {every: 0}}}", "every"),
        ("gateway: {audit: {spool: {enabled: true, fsync: sometimes}}}", "fsync"),
        ("gateway: {egressAddresses: {default: [not-an-ip]}}", "egressAddresses"),
        ("gateway: {guard: {allowCidrs: [10.0.0.0]}}", "allowCidrs"),
        ("gateway: {spread: maybe}", "spread"),
        ("gateway: {shutdownGraceSeconds: -1}", "shutdownGraceSeconds"),
        ("gateway: {runAsUser: 0}", "runAsUser"),
        ("gateway: {runAsGroup: 0}", "runAsGroup"),
        (
            "gateway: {policies: [{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {}, spec: {}}]}",
            "policies",
        ),
        ("gateway: {resolver: {nameservers: [10.96.0.10]}}", "nameservers"),
        ("gateway: {resolver: {timeout: 5}}", "timeout"),
        ("gateway: {clients: [{cidr: 10.1.0.0/16, name: vm}]}", "namespace"),
        ("cluster: {podCidrs: [10.244.0.0]}", "podCidrs"),
        ("redirector: {enabled: true}", "nodeCidrs"),
        (
            "redirector: {enabled: true}\ncluster: {podCidrs: [10.244.0.0/16], serviceCidrs: [10.96.0.0/12], nodeCidrs: [192.168.0.0/24], dnsServers: []}",
            "dnsServers",
        ),
        ("redirector: {relayPort: 0}", "relayPort"),
        ("redirector: {adminBindAddress: \"::\"}", "adminBindAddress"),
        ("redirector: {capabilities: [SYS_ADMIN]}", "Additional property capabilities is not allowed"),
        ("imagePullSecrets: [{name: regcred}]", "imagePullSecrets"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (values, needle)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("wrong-{i}.yaml"));
        std::fs::write(&f, values).unwrap();
        let err = match render(&Some(f), &[]) {
            Ok(_) => panic!("accepted: {values}"),
            Err(e) => e,
        };
        assert!(err.contains("don't meet the specifications of the schema"), "{values}: not a schema error: {err}");
        assert!(err.contains(needle), "{values}: the error does not name {needle:?}: {err}");
    }
    // The same values, corrected, render (the cases fail for the reason they name).
    let ok = dir.path().join("ok.yaml");
    std::fs::write(&ok, "gateway: {replicas: 1, resolver: {nameservers: [\"10.96.0.10:53\", \"[fd00::a]:53\"]}}\nimagePullSecrets: [regcred]\n").unwrap();
    render(&Some(ok), &[]).unwrap();
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The volume that holds `file` in container `cname` of `workload` (the deepest mount above it),
/// checked read-only.
fn secret_volume_of<'a>(workload: &'a Value, cname: &str, file: &str) -> &'a Value {
    let mounts = container(workload, cname)["volumeMounts"].as_array().unwrap();
    let mount = mounts
        .iter()
        .filter(|m| file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{file} is not mounted"));
    assert_eq!(mount["readOnly"], true, "{file}");
    let volumes = workload["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    volumes.iter().find(|v| v["name"] == mount["name"]).unwrap()
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.get("value").or(e.get("valueFrom")).cloned().unwrap()))
        .collect()
}

#[test]
fn the_gateway_pod_is_restricted_and_drains_within_its_grace_period() {
    for set in value_sets() {
        let what = label(&set);
        let (_, docs) = render(&set, &[]).unwrap();
        let dep = get(&docs, "Deployment", GATEWAY);
        let pod = &dep["spec"]["template"]["spec"];
        let c = container(dep, "gateway");
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{what}");
        assert!(sc["runAsUser"].as_u64().unwrap() > 0, "{what}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{what}: no capability at all");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
        assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none(), "{what}");
        // Probes on the admin port's /healthz and /readyz.
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
        let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
        let admin = cfg["listen"]["admin"].as_str().unwrap();
        let admin_port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "admin").unwrap();
        assert!(admin.ends_with(&format!(":{}", admin_port["containerPort"])), "{what}: {admin}");
        // The kubelet waits longer than the gateway's own drain.
        let grace: u64 = cfg["shutdown"]["grace"].as_str().unwrap().trim_end_matches('s').parse().unwrap();
        let pod_grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert_eq!(pod_grace, grace + 5, "{what}");
        // Kubernetes mode with the chart's own Lease name (what the Role grants).
        assert_eq!(cfg["kubernetes"]["enabled"], true, "{what}");
        let role = get(&docs, "Role", &format!("{GATEWAY}-lease"));
        assert_eq!(role["rules"][1]["resourceNames"][0], cfg["kubernetes"]["leaseName"], "{what}");
        let env = env_of(c);
        assert_eq!(env["POD_NAMESPACE"]["fieldRef"]["fieldPath"], "metadata.namespace", "{what}");
        // Replicas: spread, and a PDB whenever there is more than one.
        let replicas = dep["spec"]["replicas"].as_u64().unwrap();
        assert_eq!(find(&docs, "PodDisruptionBudget", GATEWAY).is_some(), replicas > 1, "{what}");
        if pod["hostNetwork"] == true {
            assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{what}");
            let anti = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
            assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "{what}: one per node, ports would clash");
            assert!(find(&docs, "NetworkPolicy", GATEWAY).is_none(), "{what}: no NetworkPolicy for host-network Pods");
        } else {
            assert_eq!(pod["topologySpreadConstraints"][0]["topologyKey"], "kubernetes.io/hostname", "{what}");
        }
    }
    // The defaults: two replicas, no host network, the image's non-root uid.
    let (_, docs) = render(&None, &[]).unwrap();
    assert_eq!(get(&docs, "Deployment", GATEWAY)["spec"]["replicas"], 2);
    let sc = &container(get(&docs, "Deployment", GATEWAY), "gateway")["securityContext"];
    assert_eq!((sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()), (Some(65532), Some(65532)));
    // A uid of the gateway's own (pipe memory is counted per uid on the node).
    let (_, docs) = render(&None, &["--set", "gateway.runAsUser=64001", "--set", "gateway.runAsGroup=64002"]).unwrap();
    let sc = &container(get(&docs, "Deployment", GATEWAY), "gateway")["securityContext"];
    assert_eq!((sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()), (Some(64001), Some(64002)));
    assert!(find(&docs, "DaemonSet", REDIRECTOR).is_none(), "steering is opt-in: it needs the cluster's CIDRs");
    assert!(yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"))["kubernetes"].get("rateLimitReplicas").is_none());
    // Rate limits shared among the replicas: the gateway counts exactly the Deployment's Pods.
    let (_, docs) = render(&None, &["--set", "gateway.kubernetes.shareRateLimits=true"]).unwrap();
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    let share = &cfg["kubernetes"]["rateLimitReplicas"];
    let dep = get(&docs, "Deployment", GATEWAY);
    assert_eq!(share["matchLabels"], dep["spec"]["selector"]["matchLabels"], "{share}");
    assert_eq!(share["namespace"], dep["metadata"]["namespace"], "{share}");
    // ServiceAccount tokens: off by default; with an issuer and no JWKS, the keys come from the
    // API server (no jwksFile, and the gateway may get the two discovery URLs); with a JWKS, it
    // sits next to the config (jwksFile is relative to it) and nothing more is granted.
    let url_rule =
        json!({"nonResourceURLs": ["/.well-known/openid-configuration", "/openid/v1/jwks"], "verbs": ["get"]});
    let grants_urls =
        |docs: &[Value]| get(docs, "ClusterRole", GATEWAY)["rules"].as_array().unwrap().contains(&url_rule);
    let (_, docs) = render(&None, &[]).unwrap();
    assert!(yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml")).get("identity").is_none());
    assert!(!grants_urls(&docs));
    let issuer = ["--set", "gateway.identity.tokens.issuer=https://kubernetes.default.svc"];
    let (_, docs) = render(&None, &issuer).unwrap();
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    assert!(cfg["identity"]["tokens"].get("jwksFile").is_none(), "{cfg}");
    assert!(grants_urls(&docs), "the keys are fetched from the API server");
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(values.path(), "gateway: {identity: {tokens: {jwks: '{\"keys\":[]}'}}}\n").unwrap();
    let with_jwks = [&issuer[..], &["--values", values.path().to_str().unwrap()]].concat();
    let (_, docs) = render(&None, &with_jwks).unwrap();
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    assert_eq!(cfg["identity"]["tokens"]["jwksFile"], "jwks.json", "{cfg}");
    assert_eq!(cfg["identity"]["tokens"]["audiences"], json!(["egress.dev"]), "{cfg}");
    assert_eq!(config_map_file(&docs, GATEWAY, "jwks.json"), "{\"keys\":[]}");
    assert!(!grants_urls(&docs), "a JWKS given: no URL is granted");
}

#[test]
fn the_redirector_has_only_net_admin_and_trusted_relays_are_the_nodes() {
    let set = Some(repo_root().join(CHART).join("ci/redirector-ipv4-values.yaml"));
    let (_, docs) = render(&set, &[]).unwrap();
    let ds = get(&docs, "DaemonSet", REDIRECTOR);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]), "runs on every node");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let c = container(ds, "node-redirector");
    assert_eq!(c["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["NET_ADMIN"]}));
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(c["securityContext"].get("privileged").is_none());
    assert_eq!(env_of(c)["NODE_NAME"]["fieldRef"]["fieldPath"], "spec.nodeName");

    let gw = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    let rd = yaml(&config_map_file(&docs, REDIRECTOR, "node-redirector.yaml"));
    // The DNS forwarder is on by default, with the values' settings.
    assert_eq!(
        rd["dns"],
        serde_json::json!({"enabled": true, "port": 15053, "grace": "60s", "maxNamesPerPod": 2000}),
        "{rd}"
    );
    assert_eq!(gw["transparent"]["trustedRelays"], json!(["192.168.10.0/24"]));
    // Never steered: Pod, Service and node ranges.
    assert_eq!(rd["excludeCidrs"], json!(["10.244.0.0/16", "10.96.0.0/12", "192.168.10.0/24"]));
    assert_eq!(rd["clusterDns"], json!(["10.96.0.10"]));
    assert!(rd["relay"].get("addresses").is_none(), "each redirector finds its node's address: {rd}");
    // The relay finds the gateways through the transparent Service, by port name.
    let (ns, svc) = rd["kubernetes"]["gatewayService"].as_str().unwrap().split_once('/').unwrap();
    assert_eq!(ns, NAMESPACE);
    let service = get(&docs, "Service", svc);
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["name"], rd["kubernetes"]["gatewayPortName"]);
    assert!(gw["listen"]["transparent"].as_str().unwrap().ends_with(&format!(":{}", port["port"])));
    assert_eq!(
        service["spec"]["selector"],
        get(&docs, "Deployment", GATEWAY)["spec"]["selector"]["matchLabels"],
        "the transparent Service selects the gateway Pods"
    );
    // Only node addresses reach the transparent port; the proxy ports stay open to clients.
    let np = get(&docs, "NetworkPolicy", GATEWAY);
    let rules = np["spec"]["ingress"].as_array().unwrap();
    let transparent_port = port["port"].clone();
    let to_transparent: Vec<&Value> =
        rules.iter().filter(|r| r["ports"].as_array().unwrap().iter().any(|p| p["port"] == transparent_port)).collect();
    assert_eq!(to_transparent.len(), 1, "{rules:?}");
    assert_eq!(to_transparent[0]["ports"].as_array().unwrap().len(), 1, "no other port shares the rule");
    assert_eq!(to_transparent[0]["from"], json!([{"ipBlock": {"cidr": "192.168.10.0/24"}}]));

    // The relay key: one Secret, mounted read-only where each config looks for it.
    let secret = get(&docs, "Secret", &format!("{GATEWAY}-relay-key"));
    let key_b64 = secret["data"]["relay.key"].as_str().unwrap();
    assert!(key_b64.len() > 40, "a random key: {secret}");
    for (kind, name, cname, file) in [
        ("Deployment", GATEWAY, "gateway", gw["transparent"]["relayKeyFile"].as_str().unwrap()),
        ("DaemonSet", REDIRECTOR, "node-redirector", rd["relay"]["keyFile"].as_str().unwrap()),
    ] {
        let vol = secret_volume_of(get(&docs, kind, name), cname, file);
        assert_eq!(vol["secret"]["secretName"], secret["metadata"]["name"], "{kind}");
        assert!(file.ends_with(vol["secret"]["items"][0]["path"].as_str().unwrap()), "{kind}: {file}");
    }
    // The CNI plugin: an init container installs it from the node's dirs; the plugin's socket is
    // at the same path in the redirector and on the node (the plugin runs on the node).
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["name"], "install-cni");
    assert_eq!(init["args"], json!(["install-cni", "--config", "/etc/node-redirector/node-redirector.yaml"]));
    assert_eq!(init["securityContext"]["capabilities"], json!({"drop": ["ALL"]}), "no capability to copy a file");
    let host = |name: &str| {
        let v =
            ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
        v["hostPath"]["path"].as_str().unwrap().to_string()
    };
    let mount = |c: &Value, name: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
    };
    assert_eq!((host("cni-bin"), host("cni-conf")), ("/opt/cni/bin".to_string(), "/etc/cni/net.d".to_string()));
    assert_eq!(mount(init, "cni-bin").as_deref(), rd["cni"]["binDir"].as_str());
    assert_eq!(mount(init, "cni-conf").as_deref(), rd["cni"]["confDir"].as_str());
    let main = container(ds, "node-redirector");
    assert_eq!(mount(main, "cni-conf").as_deref(), rd["cni"]["confDir"].as_str(), "the redirector keeps the entry");
    let socket = rd["cni"]["socket"].as_str().unwrap();
    assert_eq!(mount(main, "cni-run"), Some(host("cni-run")));
    assert!(socket.starts_with(&format!("{}/", host("cni-run"))), "{socket}");
    assert_eq!(rd["cni"]["failurePolicy"], "Fail");
    let (_, docs) = render(&set, &["--set", "redirector.cni.enabled=false"]).unwrap();
    let ds = get(&docs, "DaemonSet", REDIRECTOR);
    assert!(ds["spec"]["template"]["spec"].get("initContainers").is_none());
    assert!(!ds.to_string().contains("hostPath"), "no node directory is mounted without the plugin");

    // Deleting the release takes steering off every node first: a pre-delete hook Job whose RBAC
    // reads and patches this one DaemonSet, nothing else.
    let job = get(&docs, "Job", &format!("{REDIRECTOR}-uninstall"));
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
    let args = container(job, "uninstall")["args"].clone();
    assert_eq!(args, json!(["uninstall-daemonset", "--namespace", NAMESPACE, "--name", REDIRECTOR, "--timeout", "5m"]));
    let role = get(&docs, "Role", &format!("{REDIRECTOR}-uninstall"));
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [REDIRECTOR], "verbs": ["get", "patch"]}])
    );
    for kind in ["ServiceAccount", "Role", "RoleBinding"] {
        let o = get(&docs, kind, &format!("{REDIRECTOR}-uninstall"));
        assert_eq!(o["metadata"]["annotations"]["helm.sh/hook-weight"], "-10", "{kind} exists before the Job");
    }
    assert_eq!(container(job, "uninstall")["securityContext"]["runAsNonRoot"], true);
    let (_, docs) = render(&set, &["--set", "redirector.relayAddresses={10.0.0.5,fd00::5}"]).unwrap();
    let rd = yaml(&config_map_file(&docs, REDIRECTOR, "node-redirector.yaml"));
    assert_eq!(rd["relay"]["addresses"], json!(["10.0.0.5", "fd00::5"]));
    let (_, docs) = render(&set, &["--set", "redirector.uninstallOnDelete=false"]).unwrap();
    assert!(find(&docs, "Job", &format!("{REDIRECTOR}-uninstall")).is_none());

    // A Secret of the operator's instead: the chart creates none and mounts that one.
    let (_, docs) = render(&set, &["--set", "redirector.relayKey.existingSecret=ops-relay-key"]).unwrap();
    assert!(find(&docs, "Secret", &format!("{GATEWAY}-relay-key")).is_none());
    let ds = get(&docs, "DaemonSet", REDIRECTOR);
    let vols = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert!(vols.iter().any(|v| v["secret"]["secretName"] == "ops-relay-key"), "{vols:?}");
}

#[test]
fn chart_rbac_is_the_tested_minimal_rbac() {
    // deploy/*.yaml are checked against every API request the binaries make (tests/kubernetes.rs,
    // tests/redirector.rs); the chart must grant exactly the same rules.
    let rules_of = |docs: &[Value], kind: &str, name: &str| get(docs, kind, name)["rules"].clone();
    let manifest = |f: &str| -> Vec<Value> {
        let t = std::fs::read_to_string(repo_root().join("deploy").join(f)).unwrap();
        serde_yaml_ng::Deserializer::from_str(&t).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
    };
    let set = Some(repo_root().join(CHART).join("ci/redirector-ipv4-values.yaml"));
    let gw = manifest("rbac.yaml");
    // With tokens whose keys come from the API server: every rule of deploy/rbac.yaml; with a
    // JWKS in the values (the ci file), those but the issuer discovery URLs.
    let (_, docs) = render(&set, &["--set", "gateway.identity.tokens.jwks="]).unwrap();
    assert_eq!(rules_of(&docs, "ClusterRole", GATEWAY), rules_of(&gw, "ClusterRole", "egress-gateway"));
    let (_, docs) = render(&set, &[]).unwrap();
    let mut without_urls = rules_of(&gw, "ClusterRole", "egress-gateway");
    without_urls.as_array_mut().unwrap().retain(|r| r.get("nonResourceURLs").is_none());
    assert_eq!(rules_of(&docs, "ClusterRole", GATEWAY), without_urls);
    let mut lease = rules_of(&gw, "Role", "egress-gateway-lease");
    lease[1]["resourceNames"] = json!([format!("{GATEWAY}-status")]);
    assert_eq!(rules_of(&docs, "Role", &format!("{GATEWAY}-lease")), lease);
    let rd = manifest("node-redirector-rbac.yaml");
    assert_eq!(rules_of(&docs, "ClusterRole", REDIRECTOR), rules_of(&rd, "ClusterRole", "egress-node-redirector"));
    assert_eq!(rules_of(&docs, "Role", REDIRECTOR), rules_of(&rd, "Role", "egress-node-redirector"));
    let hook: Value = serde_yaml_ng::from_str(egress_e2e::rbac::UNINSTALL_HOOK_ROLE).unwrap();
    let mut hook_rules = hook["rules"].clone();
    hook_rules[0]["resourceNames"] = json!([REDIRECTOR]);
    assert_eq!(rules_of(&docs, "Role", &format!("{REDIRECTOR}-uninstall")), hook_rules);
    // Bindings point at the chart's own service accounts, used by the workloads.
    for (binding, sa, workload) in [
        (("ClusterRoleBinding", GATEWAY), GATEWAY, ("Deployment", GATEWAY)),
        (("RoleBinding", &*format!("{GATEWAY}-lease")), GATEWAY, ("Deployment", GATEWAY)),
        (("ClusterRoleBinding", REDIRECTOR), REDIRECTOR, ("DaemonSet", REDIRECTOR)),
        (("RoleBinding", REDIRECTOR), REDIRECTOR, ("DaemonSet", REDIRECTOR)),
        (
            ("RoleBinding", &*format!("{REDIRECTOR}-uninstall")),
            &*format!("{REDIRECTOR}-uninstall"),
            ("Job", &*format!("{REDIRECTOR}-uninstall")),
        ),
    ] {
        let b = get(&docs, binding.0, binding.1);
        assert_eq!(b["subjects"], json!([{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]));
        assert!(find(&docs, "ServiceAccount", sa).is_some());
        assert_eq!(get(&docs, workload.0, workload.1)["spec"]["template"]["spec"]["serviceAccountName"], sa);
    }
    // Nothing else is granted: two ClusterRoles, two Roles, and the pre-delete hook's Role (which
    // reads and patches the redirector's DaemonSet only: the_redirector_has_only_net_admin...).
    let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role").collect();
    assert_eq!(roles.len(), 5);
}

/// Runs a ValidatingAdmissionPolicy on one pods/status UPDATE with the Kubernetes CEL libraries
/// (kube-cel): `Ok` when admitted (or not matched), `Err(message)` of the first failed validation.
fn admit(vap: &Value, request: &Value, object: &Value, old: &Value) -> Result<(), String> {
    use kube::core::cel::KubeCelExt;
    let eval = |expr: &str| -> bool {
        let mut ctx = cel::Context::default().with_all();
        for (name, v) in [("request", request), ("object", object), ("oldObject", old)] {
            ctx.add_variable_from_value(name, cel::to_value(v).unwrap());
        }
        let program = cel::Program::compile(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            other => panic!("{expr}: {other:?}"),
        }
    };
    let spec = &vap["spec"];
    if !spec["matchConditions"].as_array().unwrap().iter().all(|m| eval(m["expression"].as_str().unwrap())) {
        return Ok(());
    }
    for v in spec["validations"].as_array().unwrap() {
        if !eval(v["expression"].as_str().unwrap()) {
            return Err(v["message"].as_str().unwrap().to_string());
        }
    }
    Ok(())
}

/// RBAC cannot narrow the redirector's `patch pods/status` (for its readiness-gate condition) to
/// its own node's Pods or to that condition, and pods/status can also rewrite addresses, phase,
/// labels and annotations. The admission policy in the chart and in deploy/ is evaluated here:
/// the redirector's own write passes; every other use of the permission is refused.
#[test]
fn the_redirector_may_write_only_its_condition_on_its_own_nodes_pods() {
    let set = Some(repo_root().join(CHART).join("ci/redirector-ipv4-values.yaml"));
    let (_, docs) = render(&set, &[]).unwrap();
    let name = format!("{REDIRECTOR}-pod-status");
    let vap = get(&docs, "ValidatingAdmissionPolicy", &name);
    let binding = get(&docs, "ValidatingAdmissionPolicyBinding", &name);
    assert_eq!(binding["spec"], json!({"policyName": name, "validationActions": ["Deny"]}));
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    assert_eq!(vap["spec"]["matchConstraints"]["resourceRules"][0]["resources"], json!(["pods/status"]));
    let t = std::fs::read_to_string(repo_root().join("deploy/node-redirector-rbac.yaml")).unwrap();
    let deploy: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&t).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let dvap = get(&deploy, "ValidatingAdmissionPolicy", "egress-node-redirector-pod-status");
    assert_eq!(vap["spec"]["validations"], dvap["spec"]["validations"], "chart and deploy/ agree");
    assert_eq!(
        get(&deploy, "ValidatingAdmissionPolicyBinding", "egress-node-redirector-pod-status")["spec"]["policyName"],
        "egress-node-redirector-pod-status"
    );

    let user = format!("system:serviceaccount:{NAMESPACE}:{REDIRECTOR}");
    let request = |user: &str, node: Option<&str>| {
        let mut r = json!({"operation": "UPDATE", "subResource": "status", "userInfo": {"username": user}});
        if let Some(n) = node {
            r["userInfo"]["extra"] = json!({"authentication.kubernetes.io/node-name": [n]});
        }
        r
    };
    let old = json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}, "annotations": {"a": "1"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}], "hostIP": "192.168.10.4",
                   "conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}],
                   "containerStatuses": [{"name": "c", "ready": false}]}
    });
    let mut ours = old.clone();
    ours["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "egress.dev/redirected", "status": "True", "reason": "Redirected"}));
    let own = request(&user, Some("node-1"));
    assert_eq!(admit(vap, &own, &ours, &old), Ok(()), "its own condition, its own node's Pod");
    let mut again = ours.clone();
    again["status"]["conditions"][2]["status"] = json!("False");
    assert_eq!(admit(vap, &own, &again, &ours), Ok(()), "and changing it again");
    let refused = |obj: &Value, req: &Value, why: &str| {
        let r = admit(vap, req, obj, &old);
        assert!(r.is_err(), "{why}: admitted");
        r.unwrap_err()
    };
    assert!(refused(&ours, &request(&user, Some("node-2")), "another node's Pod").contains("own node"));
    assert!(refused(&ours, &request(&user, None), "a token without a node").contains("own node"));
    let mut ready = ours.clone();
    ready["status"]["conditions"][0]["status"] = json!("True");
    assert!(refused(&ready, &own, "the Ready condition").contains("condition only"));
    let mut dropped = old.clone();
    dropped["status"]["conditions"].as_array_mut().unwrap().remove(1);
    assert!(refused(&dropped, &own, "removing a condition").contains("condition only"));
    for (field, value) in [
        ("podIPs", json!([{"ip": "10.0.0.99"}])),
        ("podIP", json!("10.0.0.99")),
        ("phase", json!("Succeeded")),
        ("hostIP", json!("192.168.10.9")),
        ("containerStatuses", json!([{"name": "c", "ready": true}])),
    ] {
        let mut o = ours.clone();
        o["status"][field] = value;
        assert!(refused(&o, &own, field).contains("addresses"), "{field}");
    }
    let mut o = ours.clone();
    o["status"]["hostIPs"] = json!([{"ip": "192.168.10.4"}]);
    assert!(refused(&o, &own, "adding hostIPs").contains("addresses"));
    let mut o = ours.clone();
    o["metadata"]["labels"]["app"] = json!("payments");
    assert!(refused(&o, &own, "labels").contains("labels"));
    let mut o = ours.clone();
    o["metadata"]["annotations"]["b"] = json!("2");
    assert!(refused(&o, &own, "annotations").contains("labels"));
    // Other users (the kubelet, controllers) are not this policy's business.
    let mut o = ours.clone();
    o["status"]["podIPs"] = json!([{"ip": "10.0.0.99"}]);
    assert_eq!(admit(vap, &request("system:node:node-1", None), &o, &old), Ok(()));
}

#[test]
fn the_service_monitor_scrapes_the_metrics_services() {
    let set = Some(repo_root().join(CHART).join("ci/servicemonitor-values.yaml"));
    // With the redirector on too, so that both metrics Services exist.
    let extra = repo_root().join(CHART).join("ci/redirector-ipv4-values.yaml");
    let (_, docs) = render(&set, &["--values", extra.to_str().unwrap()]).unwrap();
    let sm = get(&docs, "ServiceMonitor", GATEWAY);
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    let selector = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let scraped: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| selector.iter().all(|(k, v)| &d["metadata"]["labels"][k] == v))
        .collect();
    let names: Vec<&str> = scraped.iter().map(|s| s["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, [format!("{GATEWAY}-metrics"), format!("{REDIRECTOR}-metrics")]);
    for s in scraped {
        assert!(s["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == port), "{s}");
    }
    // The file sink is writable: its directory is a mounted volume (the root filesystem is not).
    let dep = get(&docs, "Deployment", GATEWAY);
    let mounts = container(dep, "gateway")["volumeMounts"].as_array().unwrap().clone();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/var/log/egress"), "{mounts:?}");
    // So is the audit spool's directory.
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    let spool = cfg["audit"]["spool"]["dir"].as_str().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == spool), "{mounts:?}");
    // The checkpoint key comes from the Secret, mounted read-only where the config looks for it.
    let key = cfg["audit"]["checkpoint"]["keyFile"].as_str().unwrap();
    let vol = secret_volume_of(dep, "gateway", key);
    assert_eq!(vol["secret"]["secretName"], "egress-checkpoint-key");
    // The kubelet writes Secret files as root, group fsGroup: the gateway (not root) reads the key
    // through its group, and no one else can.
    let pod = &dep["spec"]["template"]["spec"];
    let c = container(dep, "gateway");
    assert_eq!(pod["securityContext"]["fsGroup"], c["securityContext"]["runAsGroup"]);
    assert_eq!(vol["secret"]["defaultMode"].as_u64(), Some(0o440));
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_with_the_ci_release_script() {
    let root = repo_root();
    let out = run(Command::new(tools().join("venv/bin/hadolint")).current_dir(&root).args([
        "--config",
        ".hadolint.yaml",
        "--no-color",
        "Dockerfile",
    ]));
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("./scripts/build-release.sh"), "the image builds what CI builds");
    for (stage, bin) in [("gateway", "egress-gateway"), ("node-redirector", "node-redirector")] {
        assert!(dockerfile.contains(&format!(" AS {stage}\n")), "stage {stage}");
        assert!(dockerfile.contains(&format!("target/release/{bin} /out/{bin}")), "{bin} is copied out");
        // The binary the image ships is the one CI built and tested, and it runs.
        let out = run(Command::new(release_dir().join(bin)).arg("--version"));
        assert!(text(&out).starts_with(&format!("{bin} ")), "{}", text(&out));
    }
    // The chart's image names are the Dockerfile's images.
    let values = yaml(&std::fs::read_to_string(root.join(CHART).join("values.yaml")).unwrap());
    assert_eq!(values["gateway"]["image"]["repository"], "egress-gateway");
    assert_eq!(values["redirector"]["image"]["repository"], "egress-node-redirector");
    assert!(dockerfile.contains("-t egress-gateway:") && dockerfile.contains("-t egress-node-redirector:"));
}

#[test]
fn the_https_proxy_serves_a_mounted_or_cert_manager_certificate() {
    // Off by default: no port, no listener, no Secret mounted.
    let (_, docs) = render(&None, &[]).unwrap();
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    assert!(cfg["listen"].get("https").is_none() && cfg.get("https").is_none(), "{cfg}");
    assert!(find(&docs, "Certificate", &format!("{GATEWAY}-https")).is_none());
    // Neither a Secret nor cert-manager: refused, with what to set.
    let err = render(&None, &["--set", "gateway.https.enabled=true"]).unwrap_err();
    assert!(err.contains("gateway.https: set secretName"), "{err}");

    // A Secret of the operator's, client certificates required (ci/ipv6-values.yaml).
    let set = Some(repo_root().join(CHART).join("ci/ipv6-values.yaml"));
    let (_, docs) = render(&set, &[]).unwrap();
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    assert_eq!(cfg["listen"]["https"], "[::]:3129");
    assert_eq!(cfg["https"]["clientCert"], "Required");
    let dep = get(&docs, "Deployment", GATEWAY);
    for file in ["cert", "key", "clientCa"] {
        let path = cfg["https"][file].as_str().unwrap();
        assert_eq!(secret_volume_of(dep, "gateway", path)["secret"]["secretName"], "egress-gateway-tls", "{file}");
    }
    let ports = container(dep, "gateway")["ports"].as_array().unwrap().clone();
    assert!(ports.contains(&json!({"name": "https", "containerPort": 3129, "protocol": "TCP"})), "{ports:?}");
    let svc = get(&docs, "Service", GATEWAY);
    assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "https" && p["port"] == 3129));
    let np = get(&docs, "NetworkPolicy", GATEWAY);
    assert!(np.to_string().contains("3129"), "the proxy port is open to the proxy's clients: {np}");

    // cert-manager: a Certificate for the Service's names, written to the Secret that is mounted;
    // the client CA from a Secret of its own.
    let (_, docs) = render(
        &None,
        &[
            "--set",
            "gateway.https.enabled=true",
            "--set",
            "gateway.https.certManager.enabled=true",
            "--set",
            "gateway.https.certManager.issuerRef.name=cluster-ca",
            "--set",
            "gateway.https.clientCert=Optional",
            "--set",
            "gateway.https.clientCaSecret=workload-ca",
        ],
    )
    .unwrap();
    let cert = get(&docs, "Certificate", &format!("{GATEWAY}-https"));
    assert_eq!(cert["spec"]["secretName"], format!("{GATEWAY}-https"));
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    let names: Vec<&str> = cert["spec"]["dnsNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.contains(&&*format!("{GATEWAY}.{NAMESPACE}.svc")), "{names:?}");
    let cfg = yaml(&config_map_file(&docs, GATEWAY, "gateway.yaml"));
    let dep = get(&docs, "Deployment", GATEWAY);
    let cert_path = cfg["https"]["cert"].as_str().unwrap();
    assert_eq!(secret_volume_of(dep, "gateway", cert_path)["secret"]["secretName"], format!("{GATEWAY}-https"));
    let ca_path = cfg["https"]["clientCa"].as_str().unwrap();
    assert_eq!(secret_volume_of(dep, "gateway", ca_path)["secret"]["secretName"], "workload-ca");
    let err =
        render(&None, &["--set", "gateway.https.enabled=true", "--set", "gateway.https.certManager.enabled=true"])
            .unwrap_err();
    assert!(err.contains("issuerRef.name"), "{err}");
}

#[test]
fn the_dashboard_and_the_alerts_render_and_promtool_accepts_the_rules() {
    let (_, docs) = render(&None, &[]).unwrap();
    assert!(find(&docs, "PrometheusRule", GATEWAY).is_none(), "off by default");
    assert!(find(&docs, "ConfigMap", &format!("{GATEWAY}-dashboard")).is_none(), "off by default");
    let (_, docs) = render(
        &None,
        &[
            "--set",
            "grafana.dashboard.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.labels.release=prometheus",
        ],
    )
    .unwrap();
    let cm = get(&docs, "ConfigMap", &format!("{GATEWAY}-dashboard"));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "{cm}");
    let dash: Value = serde_json::from_str(cm["data"]["egress-gateway.json"].as_str().unwrap()).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 12, "{}", panels.len());
    assert!(panels.iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));
    let rule = get(&docs, "PrometheusRule", GATEWAY);
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    // The rendered rules are what promtool accepts.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
    assert!(out.status.success(), "promtool check rules:\n{}", text(&out));
    // Every alert has its runbook paragraph.
    let runbooks = std::fs::read_to_string(repo_root().join("docs/alerts.md")).unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 9, "{alerts:?}");
    for a in alerts {
        assert!(runbooks.contains(&format!("\n## {a}\n")), "no runbook for {a}");
    }
}
