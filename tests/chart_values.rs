//! The chart's values, rendered with `helm template` and checked object by object: each
//! platform value lands where it should, and the defaults stay safe. (tests/e2e/chart.rs
//! installs the chart on a real API server.) Needs `TLO_HELM` (`eval "$(hack/tools.sh)"`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::{Value, json};

fn helm() -> PathBuf {
    match std::env::var_os("TLO_HELM").filter(|value| !value.is_empty()) {
        Some(path) if Path::new(&path).is_file() => PathBuf::from(path),
        _ => panic!("TLO_HELM is not set to a helm binary; run `eval \"$(hack/tools.sh)\"` before `cargo test`"),
    }
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator")
}

/// `helm template` with `--set`/`--set-json` arguments; the rendered objects.
fn render(args: &[&str]) -> Vec<Value> {
    let output = Command::new(helm())
        .args(["template", "tlo"])
        .arg(chart())
        .args(["--namespace", "tlo-system"])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        output.status.success(),
        "helm template {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .filter(|object| !object.is_null())
        .collect()
}

/// `helm template` that must fail; its error message.
fn render_error(args: &[&str]) -> String {
    let output = Command::new(helm())
        .args(["template", "tlo"])
        .arg(chart())
        .args(args)
        .output()
        .expect("run helm");
    assert!(!output.status.success(), "helm template {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn all_of<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|object| object["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match all_of(objects, kind).as_slice() {
        [object] => object,
        other => panic!("expected one {kind}, found {}", other.len()),
    }
}

fn pod(objects: &[Value]) -> &Value {
    &one(objects, "Deployment")["spec"]["template"]["spec"]
}

fn container(objects: &[Value]) -> &Value {
    &pod(objects)["containers"][0]
}

fn args(objects: &[Value]) -> Vec<String> {
    container(objects)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("a string arg").to_owned())
        .collect()
}

/// The value following `flag` in the operator's args.
fn flag(objects: &[Value], flag: &str) -> Option<String> {
    let args = args(objects);
    args.iter().position(|arg| arg == flag).and_then(|at| args.get(at + 1).cloned())
}

#[test]
fn service_monitor_keeps_the_metrics_own_namespace_label() {
    let objects = render(&["--set", "serviceMonitor.enabled=true"]);
    let endpoint = &one(&objects, "ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(
        endpoint["honorLabels"], true,
        "without honorLabels Prometheus renames the metrics' namespace label to exported_namespace: {endpoint}"
    );

    let objects = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "serviceMonitor.namespace=monitoring",
        "--set",
        "serviceMonitor.annotations.team=platform",
        "--set-json",
        r#"serviceMonitor.relabelings=[{"targetLabel":"cluster","replacement":"eu-1"}]"#,
        "--set-json",
        r#"serviceMonitor.metricRelabelings=[{"sourceLabels":["__name__"],"regex":"go_.*","action":"drop"}]"#,
    ]);
    let monitor = one(&objects, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "monitoring");
    assert_eq!(monitor["metadata"]["annotations"], json!({"team": "platform"}));
    assert_eq!(monitor["spec"]["namespaceSelector"], json!({"matchNames": ["tlo-system"]}));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["relabelings"], json!([{"targetLabel": "cluster", "replacement": "eu-1"}]));
    assert_eq!(endpoint["metricRelabelings"][0]["action"], "drop");
    let objects = render(&["--set", "podMonitor.enabled=true"]);
    assert!(all_of(&objects, "ServiceMonitor").is_empty());
    let pod_monitor = one(&objects, "PodMonitor");
    assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"], true);
    assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "http");
    assert_eq!(
        pod_monitor["spec"]["selector"]["matchLabels"],
        one(&objects, "Deployment")["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn pod_and_service_monitor_exclude_each_other() {
    let both = render_error(&["--set", "podMonitor.enabled=true", "--set", "serviceMonitor.enabled=true"]);
    assert!(both.contains("choose one"), "{both}");
}

#[test]
fn monitoring_objects_are_off_by_default() {
    let objects = render(&[]);
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
        "CustomResourceDefinition",
    ] {
        assert!(all_of(&objects, kind).is_empty(), "a {kind} by default");
    }
}

#[test]
fn security_contexts_can_be_overridden_for_openshift() {
    let defaults = render(&[]);
    assert_eq!(pod(&defaults)["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod(&defaults)["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(container(&defaults)["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container(&defaults)["securityContext"]["capabilities"]["drop"], json!(["ALL"]));

    // restricted-v2 assigns the UID, GID and fsGroup itself.
    let openshift = render(&[
        "--set",
        "podSecurityContext.runAsUser=null",
        "--set",
        "podSecurityContext.runAsGroup=null",
        "--set",
        "podSecurityContext.fsGroup=null",
    ]);
    let context = &pod(&openshift)["securityContext"];
    assert_eq!(
        context,
        &json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}),
        "{context}"
    );
    // Values merge into the defaults: a key added, a key changed, a key removed.
    let custom = render(&[
        "--set",
        "securityContext.privileged=false",
        "--set",
        "securityContext.readOnlyRootFilesystem=false",
        "--set",
        "securityContext.capabilities=null",
    ]);
    assert_eq!(
        container(&custom)["securityContext"],
        json!({"allowPrivilegeEscalation": false, "privileged": false, "readOnlyRootFilesystem": false, "runAsNonRoot": true})
    );
}

#[test]
fn deployment_values_reach_the_pod() {
    let objects = render(&[
        "--set-json",
        r#"extraArgs=["--namespace","team-c"]"#,
        "--set-json",
        r#"extraVolumes=[{"name":"scratch","emptyDir":{}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"scratch","mountPath":"/scratch"}]"#,
        "--set-json",
        r#"topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"}]"#,
        "--set",
        "terminationGracePeriodSeconds=45",
        "--set",
        "revisionHistoryLimit=2",
        "--set-json",
        r#"strategy={"type":"RollingUpdate","rollingUpdate":{"maxSurge":0,"maxUnavailable":1}}"#,
        "--set",
        "concurrency=8",
    ]);
    let rendered_args = args(&objects);
    assert_eq!(
        rendered_args[rendered_args.len() - 2..],
        ["--namespace", "team-c"],
        "{rendered_args:?}"
    );
    assert_eq!(flag(&objects, "--concurrency").as_deref(), Some("8"));
    assert_eq!(pod(&objects)["volumes"], json!([{"name": "scratch", "emptyDir": {}}]));
    assert_eq!(
        container(&objects)["volumeMounts"],
        json!([{"name": "scratch", "mountPath": "/scratch"}])
    );
    assert_eq!(pod(&objects)["topologySpreadConstraints"][0]["maxSkew"], 1);
    assert_eq!(pod(&objects)["terminationGracePeriodSeconds"], 45);
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["revisionHistoryLimit"], 2);
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 1);

    let defaults = render(&[]);
    assert_eq!(flag(&defaults, "--concurrency").as_deref(), Some("32"));
    assert_eq!(one(&defaults, "Deployment")["spec"]["strategy"], json!({"type": "Recreate"}));
    assert!(pod(&defaults)["volumes"].is_null() && container(&defaults)["volumeMounts"].is_null());
}

#[test]
fn termination_grace_follows_the_request_timeout() {
    // 2 × requestTimeout + 10 s: a token request in flight and the Secret write after it finish.
    for (timeout, seconds) in [("10s", 30), ("1m", 130), ("1m30s", 190), ("2500ms", 16)] {
        let objects = render(&["--set", &format!("requestTimeout={timeout}")]);
        assert_eq!(pod(&objects)["terminationGracePeriodSeconds"], seconds, "requestTimeout={timeout}");
    }
}

#[test]
fn leader_election_durations_are_passed_on() {
    let objects = render(&[
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.leaseDuration=30s",
        "--set",
        "leaderElection.renewDeadline=20s",
        "--set",
        "leaderElection.retryPeriod=4s",
    ]);
    assert_eq!(flag(&objects, "--leader-election-lease-duration").as_deref(), Some("30s"));
    assert_eq!(flag(&objects, "--leader-election-renew-deadline").as_deref(), Some("20s"));
    assert_eq!(flag(&objects, "--leader-election-retry-period").as_deref(), Some("4s"));
    let wrong = render_error(&["--set", "leaderElection.leaseDuration=soon"]);
    assert!(wrong.contains("/leaderElection/leaseDuration"), "{wrong}");
}

#[test]
fn global_pull_secrets_and_common_labels() {
    let objects = render(&[
        "--set-json",
        r#"global.imagePullSecrets=[{"name":"shared"},{"name":"own"}]"#,
        "--set-json",
        r#"imagePullSecrets=[{"name":"own"}]"#,
        "--set",
        "global.commonLabels.cost-center=platform",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
    ]);
    assert_eq!(pod(&objects)["imagePullSecrets"], json!([{"name": "shared"}, {"name": "own"}]));
    for object in &objects {
        assert_eq!(
            object["metadata"]["labels"]["cost-center"], "platform",
            "{} {} lacks the common label",
            object["kind"], object["metadata"]["name"]
        );
    }
    assert_eq!(
        one(&objects, "Deployment")["spec"]["template"]["metadata"]["labels"]["cost-center"],
        "platform"
    );
}

#[test]
fn aggregated_cluster_roles_extend_view_and_edit() {
    let objects = render(&[]);
    let roles = all_of(&objects, "ClusterRole");
    let labelled = |label: &str| -> Vec<&Value> {
        roles
            .iter()
            .copied()
            .filter(|role| role["metadata"]["labels"][label] == "true")
            .collect()
    };
    let view = labelled("rbac.authorization.k8s.io/aggregate-to-view");
    assert_eq!(view.len(), 1, "one ClusterRole aggregated into view");
    assert_eq!(view[0]["rules"][0]["verbs"], json!(["get", "list", "watch"]));
    let edit = labelled("rbac.authorization.k8s.io/aggregate-to-edit");
    assert!(
        edit.iter().any(|role| role["rules"][0]["verbs"]
            .as_array()
            .is_some_and(|verbs| verbs.contains(&json!("delete")))),
        "no ClusterRole lets edit delete TasklistConnections"
    );
    for role in roles {
        for rule in role["rules"].as_array().expect("rules") {
            if rule["resources"]
                .as_array()
                .expect("resources")
                .contains(&json!("tasklistconnections/status"))
                && role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
            {
                assert_eq!(rule["verbs"], json!(["get", "list", "watch"]), "edit may not write status");
            }
        }
    }
    let off = render(&["--set", "rbac.aggregateToDefaultRoles=false"]);
    assert_eq!(all_of(&off, "ClusterRole").len(), 1, "only the operator's own ClusterRole");
    let namespaced = render(&["--set", "watchNamespaces={team-a}"]);
    assert!(
        all_of(&namespaced, "ClusterRole").is_empty(),
        "a namespaced install must create nothing cluster-wide"
    );
}

#[test]
fn network_policy_allows_dns_the_api_server_camunda_and_scrapers_only() {
    let objects = render(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        r#"networkPolicy.apiServer.cidrs=["172.18.0.2/32"]"#,
        "--set-json",
        r#"networkPolicy.egressCIDRs=["10.20.0.0/16"]"#,
        "--set-json",
        r#"networkPolicy.egressPorts=[443]"#,
        "--set-json",
        r#"networkPolicy.metricsNamespaceSelector={"kubernetes.io/metadata.name":"monitoring"}"#,
    ]);
    let policy = one(&objects, "NetworkPolicy");
    let spec = &policy["spec"];
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        one(&objects, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        spec["ingress"],
        json!([{
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"port": "http", "protocol": "TCP"}]
        }])
    );
    let egress = spec["egress"].as_array().expect("egress");
    assert_eq!(egress.len(), 3, "{egress:?}");
    assert_eq!(egress[0]["ports"][0], json!({"port": 53, "protocol": "UDP"}));
    assert_eq!(egress[1]["to"], json!([{"ipBlock": {"cidr": "172.18.0.2/32"}}]));
    assert_eq!(
        egress[1]["ports"],
        json!([{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}])
    );
    assert_eq!(egress[2]["to"], json!([{"ipBlock": {"cidr": "10.20.0.0/16"}}]));
    assert_eq!(egress[2]["ports"], json!([{"port": 443, "protocol": "TCP"}]));

    // Nothing selected: nobody may scrape.
    let closed = render(&["--set", "networkPolicy.enabled=true"]);
    assert_eq!(one(&closed, "NetworkPolicy")["spec"]["ingress"], json!([]));
    let wrong = render_error(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        r#"networkPolicy.egressCIDRs=["10.0.0.0"]"#,
    ]);
    assert!(wrong.contains("/networkPolicy/egressCIDRs/0"), "{wrong}");
}

#[test]
fn templated_crd_is_the_crds_folder_copy_and_kept_on_uninstall() {
    let objects = render(&["--set", "crds.enabled=true"]);
    let crd = one(&objects, "CustomResourceDefinition");
    let committed: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("crds/tasklistconnection.yaml")).expect("the chart's CRD"))
            .expect("YAML");
    assert_eq!(crd["spec"], committed["spec"], "the templated CRD differs from crds/");
    assert_eq!(crd["metadata"]["name"], committed["metadata"]["name"]);
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    assert_eq!(crd["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm");

    let not_kept = render(&["--set", "crds.enabled=true", "--set", "crds.keep=false"]);
    assert!(one(&not_kept, "CustomResourceDefinition")["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
}

#[test]
fn operator_wide_ca_bundle_is_mounted_and_passed() {
    let objects = render(&["--set", "caBundle.configMapName=proxy-ca", "--set", "caBundle.key=bundle.pem"]);
    assert_eq!(
        flag(&objects, "--ca-bundle").as_deref(),
        Some("/etc/tasklist-operator/ca/bundle.pem")
    );
    assert_eq!(
        pod(&objects)["volumes"],
        json!([{"name": "ca-bundle", "configMap": {"name": "proxy-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}}])
    );
    assert_eq!(
        container(&objects)["volumeMounts"],
        json!([{"name": "ca-bundle", "mountPath": "/etc/tasklist-operator/ca", "readOnly": true}])
    );
    let from_secret = render(&["--set", "caBundle.secretName=proxy-ca"]);
    assert_eq!(pod(&from_secret)["volumes"][0]["secret"]["secretName"], "proxy-ca");
    assert!(flag(&render(&[]), "--ca-bundle").is_none());
    let both = render_error(&["--set", "caBundle.secretName=a", "--set", "caBundle.configMapName=b"]);
    assert!(both.contains("set configMapName or secretName, not both"), "{both}");
}

#[test]
fn grafana_dashboard_configmap_for_the_sidecar() {
    let objects = render(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Operators",
    ]);
    let config_map = one(&objects, "ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(config_map["metadata"]["annotations"]["grafana_folder"], "Operators");
    let dashboard: Value =
        serde_json::from_str(config_map["data"]["tasklist-operator.json"].as_str().expect("the dashboard")).expect("JSON");
    assert_eq!(dashboard["uid"], "tasklist-operator");
}

#[test]
fn the_operator_down_alert_watches_the_job_the_monitor_produces() {
    let expression = |set: &[&str]| -> String {
        let mut args = vec!["--set", "prometheusRule.enabled=true"];
        args.extend(set);
        let objects = render(&args);
        let rules = one(&objects, "PrometheusRule")["spec"]["groups"][0]["rules"].clone();
        rules
            .as_array()
            .expect("rules")
            .iter()
            .find(|rule| rule["alert"] == "TasklistOperatorDown")
            .expect("the TasklistOperatorDown alert")["expr"]
            .as_str()
            .expect("an expression")
            .to_owned()
    };
    assert_eq!(
        expression(&["--set", "serviceMonitor.enabled=true"]),
        r#"absent(up{job="tlo-tasklist-operator"} == 1)"#
    );
    assert_eq!(
        expression(&["--set", "podMonitor.enabled=true"]),
        r#"absent(up{job="tlo-system/tlo-tasklist-operator"} == 1)"#
    );
    assert_eq!(
        expression(&["--set", "prometheusRule.job=tasklist"]),
        r#"absent(up{job="tasklist"} == 1)"#
    );
}

/// The operator args of one rendered Deployment.
fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("a string arg").to_owned())
        .collect()
}

fn flag_of(deployment: &Value, flag: &str) -> Option<String> {
    let args = args_of(deployment);
    args.iter().position(|arg| arg == flag).and_then(|at| args.get(at + 1).cloned())
}

/// Whether every label of `selector` (a `matchLabels` or a Service `selector`) is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("a selector")
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

#[test]
fn each_shard_is_a_deployment_with_its_own_lease_selector_and_budget() {
    let objects = render(&["--set", "sharding.shards=3"]);
    let deployments = all_of(&objects, "Deployment");
    assert_eq!(deployments.len(), 3);
    let pod_labels: Vec<&Value> = deployments
        .iter()
        .map(|deployment| &deployment["spec"]["template"]["metadata"]["labels"])
        .collect();
    for (index, deployment) in deployments.iter().enumerate() {
        assert_eq!(deployment["metadata"]["name"], format!("tlo-tasklist-operator-shard-{index}"));
        assert_eq!(flag_of(deployment, "--shards").as_deref(), Some("3"));
        assert_eq!(flag_of(deployment, "--shard-index"), Some(index.to_string()));
        assert_eq!(flag_of(deployment, "--shard-selector"), None);
        // Leader election is on even with one replica per shard, each on its own Lease.
        assert!(args_of(deployment).contains(&"--leader-election".to_owned()));
        assert_eq!(
            flag_of(deployment, "--leader-election-lease-name"),
            Some(format!("tlo-tasklist-operator-shard-{index}-of-3"))
        );
        assert_eq!(deployment["spec"]["replicas"], 1);
        assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
        // A Deployment's selector takes its own pods only: never another shard's.
        let selector = &deployment["spec"]["selector"]["matchLabels"];
        assert_eq!(selector["tasklist.camunda.community/shard"], index.to_string());
        for (other, labels) in pod_labels.iter().enumerate() {
            assert_eq!(
                selects(selector, labels),
                other == index,
                "shard {index}'s selector on shard {other}'s pods"
            );
        }
    }

    // One budget per shard's Deployment, so that a drain cannot take every pod of a shard.
    let objects = render(&["--set", "sharding.shards=2", "--set", "replicaCount=2"]);
    let deployments = all_of(&objects, "Deployment");
    let budgets = all_of(&objects, "PodDisruptionBudget");
    assert_eq!(budgets.len(), 2);
    for (index, (budget, deployment)) in budgets.iter().zip(&deployments).enumerate() {
        assert_eq!(budget["metadata"]["name"], format!("tlo-tasklist-operator-shard-{index}"));
        assert_eq!(budget["spec"]["selector"], deployment["spec"]["selector"]);
        assert_eq!(deployment["spec"]["replicas"], 2);
    }
    // The leader-election Role grants exactly the shards' Leases.
    let role = all_of(&objects, "Role")
        .into_iter()
        .find(|role| role["metadata"]["name"] == "tlo-tasklist-operator-leader-election")
        .expect("the leader-election Role");
    assert_eq!(
        role["rules"][1]["resourceNames"],
        json!(["tlo-tasklist-operator-shard-0-of-2", "tlo-tasklist-operator-shard-1-of-2"])
    );
}

#[test]
fn one_service_and_monitor_select_every_shards_pods() {
    for monitor in ["serviceMonitor", "podMonitor"] {
        let objects = render(&["--set", "sharding.shards=2", "--set", &format!("{monitor}.enabled=true")]);
        let pods: Vec<&Value> = all_of(&objects, "Deployment")
            .into_iter()
            .map(|deployment| &deployment["spec"]["template"]["metadata"]["labels"])
            .collect();
        assert_eq!(pods.len(), 2);
        let service = one(&objects, "Service");
        let selector = match monitor {
            "serviceMonitor" => {
                assert!(selects(
                    &one(&objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"],
                    &service["metadata"]["labels"]
                ));
                &service["spec"]["selector"]
            }
            _ => &one(&objects, "PodMonitor")["spec"]["selector"]["matchLabels"],
        };
        for labels in &pods {
            assert!(selects(selector, labels), "{monitor} misses the pods {labels}");
        }
    }
}

#[test]
fn the_shard_selector_reaches_every_deployment_and_one_shard_is_todays_chart() {
    let objects = render(&["--set-json", r#"sharding.selector="team in (a,b)""#]);
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "tlo-tasklist-operator");
    assert_eq!(flag_of(deployment, "--shard-selector").as_deref(), Some("team in (a,b)"));
    assert_eq!(flag_of(deployment, "--shards"), None);
    let objects = render(&["--set", "sharding.shards=2", "--set", "sharding.selector=team=a"]);
    for deployment in all_of(&objects, "Deployment") {
        assert_eq!(flag_of(deployment, "--shard-selector").as_deref(), Some("team=a"));
    }

    // Without sharding: one Deployment, no shard flag or label, the Lease named as before.
    let objects = render(&["--set", "replicaCount=2"]);
    let deployment = one(&objects, "Deployment");
    let args = args_of(deployment);
    assert!(!args.iter().any(|arg| arg.starts_with("--shard")), "{args:?}");
    assert_eq!(
        flag_of(deployment, "--leader-election-lease-name").as_deref(),
        Some("tlo-tasklist-operator")
    );
    assert!(deployment["spec"]["selector"]["matchLabels"]["tasklist.camunda.community/shard"].is_null());
    let wrong = render_error(&["--set", "sharding.shards=0"]);
    assert!(wrong.contains("/sharding/shards"), "{wrong}");
}

/// The dotted paths of every Secret reference in the CRD's schema (an object property
/// named `...Ref` with a `name`), e.g. `spec.tls.caSecretRef`.
fn secret_reference_paths() -> Vec<String> {
    fn walk(path: &str, schema: &Value, found: &mut Vec<String>) {
        let Some(properties) = schema["properties"].as_object() else {
            return;
        };
        for (key, property) in properties {
            let here = format!("{path}.{key}");
            // serviceAccountRef names a ServiceAccount, checked by a validation of its own.
            if key.ends_with("Ref") && key != "serviceAccountRef" && property["properties"]["name"].is_object() {
                found.push(here.clone());
            }
            walk(&here, property, found);
        }
    }
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/tasklistconnection.yaml")).expect("the CRD");
    let crd: Value = serde_yaml::from_str(&text).expect("the CRD is YAML");
    let mut found = Vec::new();
    walk(
        "spec",
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
        &mut found,
    );
    found
}

fn named<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> Vec<&'a Value> {
    all_of(objects, kind)
        .into_iter()
        .filter(|object| object["metadata"]["name"].as_str().is_some_and(|name| name.ends_with(suffix)))
        .collect()
}

const SECRET_REFERENCES: &str = "-secret-references.tasklist.camunda.community";

#[test]
fn the_secret_reference_policy_is_on_by_default_checks_every_reference_and_spares_status() {
    let objects = render(&[]);
    let policies = all_of(&objects, "ValidatingAdmissionPolicy");
    assert_eq!(
        policies.len(),
        1,
        "by default only the Secret-reference policy (the host policy is opt-in)"
    );
    let policy = named(&objects, "ValidatingAdmissionPolicy", SECRET_REFERENCES);
    let policy = policy.first().expect("the Secret-reference policy is rendered by default");
    let spec = &policy["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    let rules = &spec["matchConstraints"]["resourceRules"];
    assert_eq!(rules.as_array().map(Vec::len), Some(1));
    assert_eq!(rules[0]["operations"], json!(["CREATE", "UPDATE"]));
    // Not tasklistconnections/status (nor "*/*"): the operator's status writes pass unchecked.
    assert_eq!(rules[0]["resources"], json!(["tasklistconnections"]));
    // One validation per Secret reference of the CRD, asking the authorizer about it and
    // naming it in the message.
    let validations = spec["validations"].as_array().expect("validations");
    let paths = secret_reference_paths();
    assert_eq!(paths.len(), 6, "the CRD's Secret references: {paths:?}");
    // And one for the ServiceAccount of clientAuthentication ServiceAccountToken.
    assert_eq!(validations.len(), paths.len() + 1);
    let asks_for_tokens = "authorizer.group('').resource('serviceaccounts').subresource('token').namespace(request.namespace).name(string(object.spec.auth.oauth2.clientAssertion.serviceAccountRef.name)).check('create').allowed()";
    assert!(
        validations
            .iter()
            .any(|validation| validation["expression"].as_str().is_some_and(|e| e.contains(asks_for_tokens))),
        "the policy does not check serviceaccounts/token: {validations:?}"
    );
    for path in paths {
        let asks = format!(
            "authorizer.group('').resource('secrets').namespace(request.namespace).name(string(object.{path}.name)).check('get').allowed()"
        );
        assert!(
            validations.iter().any(|validation| {
                validation["expression"]
                    .as_str()
                    .is_some_and(|expression| expression.contains(&asks))
                    && validation["messageExpression"]
                        .as_str()
                        .is_some_and(|message| message.contains(&format!("(needed by {path})")))
            }),
            "the Secret-reference policy does not check {path}: {validations:?}"
        );
    }

    let binding = named(&objects, "ValidatingAdmissionPolicyBinding", SECRET_REFERENCES);
    let binding = binding.first().expect("its binding");
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert!(binding["spec"]["matchResources"].is_null(), "cluster-wide install: every namespace");
}

#[test]
fn the_secret_reference_policy_follows_watch_namespaces_and_can_be_relaxed_or_turned_off() {
    let scoped = render(&["--set", "watchNamespaces={team-a,team-b}"]);
    let binding = named(&scoped, "ValidatingAdmissionPolicyBinding", SECRET_REFERENCES);
    let expression = &binding.first().expect("the binding")["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(expression["key"], "kubernetes.io/metadata.name");
    assert_eq!(expression["operator"], "In");
    assert_eq!(expression["values"], json!(["team-a", "team-b"]));

    let trial = render(&[
        "--set-json",
        r#"policy.secretReferences.admissionPolicy.validationActions=["Warn","Audit"]"#,
    ]);
    let binding = named(&trial, "ValidatingAdmissionPolicyBinding", SECRET_REFERENCES);
    assert_eq!(
        binding.first().expect("the binding")["spec"]["validationActions"],
        json!(["Warn", "Audit"])
    );

    let off = render(&["--set", "policy.secretReferences.admissionPolicy.enabled=false"]);
    assert!(all_of(&off, "ValidatingAdmissionPolicy").is_empty());
    assert!(all_of(&off, "ValidatingAdmissionPolicyBinding").is_empty());

    let error = render_error(&["--set", "policy.secretReferences.admissionPolicy.enable=false"]);
    assert!(error.contains("enable"), "a typo in the values is not refused: {error}");
}

#[test]
fn both_policies_together_and_the_host_policy_reads_issuer_url_after_has() {
    let objects = render(&["--set", "policy.admissionPolicy.enabled=true", "--set", "policy.allowHttp=false"]);
    assert_eq!(all_of(&objects, "ValidatingAdmissionPolicy").len(), 2);
    assert_eq!(all_of(&objects, "ValidatingAdmissionPolicyBinding").len(), 2);
    let host = all_of(&objects, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|policy| !policy["metadata"]["name"].as_str().unwrap_or_default().ends_with(SECRET_REFERENCES))
        .expect("the host policy");
    let urls = host["spec"]["variables"][0]["expression"].as_str().expect("the urls variable");
    for field in ["tokenUrl", "issuerUrl"] {
        assert!(
            urls.contains(&format!("has(object.spec.auth.oauth2.{field}) ? [object.spec.auth.oauth2.{field}]")),
            "{field} is not read after has(): {urls}"
        );
    }
}

#[test]
fn the_opt_in_label_requirement_is_off_by_default_and_passed_as_a_flag() {
    assert!(!args(&render(&[])).contains(&"--require-secret-opt-in".to_owned()));
    let on = render(&["--set", "policy.secretReferences.requireOptInLabel=true"]);
    assert!(args(&on).contains(&"--require-secret-opt-in".to_owned()), "{:?}", args(&on));
}

/// The rules of the operator's (Cluster)Roles (not the leader-election Role) that grant
/// `create` on `serviceaccounts/token`, by kind and namespace.
fn token_grants(objects: &[Value]) -> Vec<(String, String)> {
    ["ClusterRole", "Role"]
        .iter()
        .flat_map(|kind| all_of(objects, kind))
        .filter(|role| {
            role["rules"].as_array().is_some_and(|rules| {
                rules
                    .iter()
                    .any(|rule| rule["resources"] == json!(["serviceaccounts/token"]) && rule["verbs"] == json!(["create"]))
            })
        })
        .map(|role| {
            (
                role["kind"].as_str().unwrap_or_default().to_owned(),
                role["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_operator_may_create_service_account_tokens_where_it_watches_unless_turned_off() {
    // Cluster-wide install: the ClusterRole.
    assert_eq!(token_grants(&render(&[])), vec![("ClusterRole".to_owned(), String::new())]);
    // watchNamespaces: a Role in each watched namespace, nothing cluster-wide.
    let scoped = render(&["--set", "watchNamespaces={team-a,team-b}"]);
    assert_eq!(
        token_grants(&scoped),
        vec![("Role".to_owned(), "team-a".to_owned()), ("Role".to_owned(), "team-b".to_owned())]
    );
    // Turned off: nowhere.
    assert!(token_grants(&render(&["--set", "rbac.serviceAccountTokens=false"])).is_empty());
}

/// The nudge (issue 21) is off by default: no Pod permission, no flag, no policy. On, the
/// operator may list, watch and patch Pods (nothing more, in the watched namespaces only),
/// gets its flags, and the admission policy limits its Pod writes to the one annotation.
#[test]
fn the_nudge_is_off_by_default_and_on_grants_pod_patches_behind_an_admission_policy() {
    let pod_rules = |objects: &[Value], kind: &str| -> Vec<Value> {
        all_of(objects, kind)
            .iter()
            .flat_map(|role| role["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| {
                rule["resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.starts_with("pods"))))
            })
            .collect()
    };
    let nudge_policies = |objects: &[Value]| {
        all_of(objects, "ValidatingAdmissionPolicy")
            .iter()
            .filter(|policy| policy["metadata"]["name"].as_str().is_some_and(|name| name.contains("-nudge.")))
            .count()
    };
    let off = render(&[]);
    assert!(pod_rules(&off, "ClusterRole").is_empty(), "{:?}", pod_rules(&off, "ClusterRole"));
    assert!(!args(&off).iter().any(|arg| arg.contains("nudge")), "{:?}", args(&off));
    assert_eq!(nudge_policies(&off), 0);

    let on = render(&["--set", "nudge.enabled=true", "--set", "watchNamespaces={team-a}"]);
    assert_eq!(
        pod_rules(&on, "Role"),
        [json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "patch"]})]
    );
    let args = args(&on);
    for expected in ["--nudge-pods", "--nudge-concurrency", "8", "--nudged-secret-volume-delay", "15s"] {
        assert!(args.contains(&expected.to_owned()), "{expected} missing from {args:?}");
    }
    assert_eq!(nudge_policies(&on), 1);
    let policy = all_of(&on, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|policy| policy["metadata"]["name"].as_str().is_some_and(|name| name.contains("-nudge.")))
        .expect("the nudge policy");
    let condition = policy["spec"]["matchConditions"][0]["expression"].as_str().expect("a condition");
    assert!(
        condition.contains("'system:serviceaccount:tlo-system:tlo-tasklist-operator'"),
        "the policy matches {condition}"
    );
    let binding = all_of(&on, "ValidatingAdmissionPolicyBinding")
        .into_iter()
        .find(|binding| binding["spec"]["policyName"] == policy["metadata"]["name"])
        .expect("a binding");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["team-a"])
    );
    // The policy can be left out (clusters before 1.30), the permission stays.
    let without = render(&["--set", "nudge.enabled=true", "--set", "nudge.admissionPolicy.enabled=false"]);
    assert_eq!(nudge_policies(&without), 0);
    assert_eq!(pod_rules(&without, "ClusterRole").len(), 1);
}
