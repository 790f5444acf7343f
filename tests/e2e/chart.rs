//! The Helm chart on the real control plane: what `helm lint`/`template` say, what
//! `helm install`/`upgrade`/`uninstall` leave behind, and whether the operator can do its
//! job, and no more, as the ServiceAccount the chart creates.
//!
//! There is no kubelet, so the chart's Pods never run: each scenario runs the operator
//! binary itself, with the arguments and environment of the installed Deployment and a
//! token of the Deployment's ServiceAccount, as the Pod would.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::{Value, json};
use tasklist_operator::crd::{REFRESH_ANNOTATION, TasklistConnection};
use testsupport::operator::OperatorProcess;

use crate::ScenarioFn;
use crate::scenario::{Check, DEFAULT_CLIENT_SECRET, Scenario, World, eventually, operator_binary, parse_manifest, tail, wait_for_event};

/// How long an Event may take; a refused Event is only logged at debug level, so the Event
/// itself shows that the chart's ServiceAccount may publish Events.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        chart:
        lint_template_and_schema,
        install_then_run_the_operator_as_its_service_account,
        service_account_is_not_too_powerful,
        upgrade_keeps_connections_and_uninstall_removes_the_operator,
        two_replicas_elect_a_leader_as_the_service_account,
        platform_values_are_accepted_and_notes_advise_mounting,
    ]
}

const CHART_NAME: &str = "tasklist-operator";
const SECRET: &str = "orders-tasklist-auth";
/// The stand-ins listen on loopback over http, which the operator's policy refuses by
/// default: every release of these scenarios allows both (and insecure TLS).
const LOCAL_POLICY_VALUES: &str = "policy.allowLoopback=true,policy.allowHttp=true,policy.allowInsecureTls=true";

/// How long one helm command may take (a busy 2-core machine included).
const HELM_TIMEOUT: Duration = Duration::from_secs(120);

fn chart_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts").join(CHART_NAME)
}

// ---------------------------------------------------------------------------------------
// helm as a subprocess

struct HelmOutput {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl HelmOutput {
    fn describe(&self) -> String {
        format!(
            "{}\n--- helm stderr ---\n{}\n--- helm stdout (tail) ---\n{}",
            self.status,
            self.stderr.trim_end(),
            tail(&self.stdout, 40)
        )
    }
}

/// Runs `helm <args> --kubeconfig <admin kubeconfig>`, whatever its exit status.
async fn helm(world: &World, args: &[&str]) -> anyhow::Result<HelmOutput> {
    let mut command = tokio::process::Command::new(&world.tools.helm);
    command
        .args(args)
        .arg("--kubeconfig")
        .arg(world.control_plane.kubeconfig())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(HELM_TIMEOUT, command.output())
        .await
        .with_context(|| format!("helm {} took longer than {HELM_TIMEOUT:?}", args.join(" ")))?
        .with_context(|| format!("cannot run {}", world.tools.helm.display()))?;
    Ok(HelmOutput {
        success: output.status.success(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs helm and fails, with helm's stderr, unless it succeeds. Returns stdout.
pub(crate) async fn helm_ok(world: &World, args: &[&str]) -> anyhow::Result<String> {
    let output = helm(world, args).await?;
    ensure!(output.success, "`helm {}` failed: {}", args.join(" "), output.describe());
    Ok(output.stdout)
}

fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

pub(crate) fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace_of(object: &Value) -> Option<&str> {
    object["metadata"]["namespace"].as_str()
}

pub(crate) fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|object| kind_of(object) == kind).collect()
}

fn describe_objects(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("{} {}/{}", kind_of(o), namespace_of(o).unwrap_or("-"), name_of(o)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one Deployment of a rendered chart.
fn the_deployment(objects: &[Value]) -> anyhow::Result<&Value> {
    match of_kind(objects, "Deployment").as_slice() {
        [deployment] => Ok(deployment),
        other => bail!(
            "expected one Deployment, the chart has {}: {}",
            other.len(),
            describe_objects(objects)
        ),
    }
}

/// The operator container's args in a rendered Deployment.
fn rendered_args(deployment: &Value) -> anyhow::Result<Vec<String>> {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("the Deployment has no containers")?;
    let container = containers
        .iter()
        .find(|c| c["name"] == "operator")
        .context("the Deployment has no container named operator")?;
    Ok(container["args"]
        .as_array()
        .context("the operator container has no args")?
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect())
}

/// A helm release installed by a scenario.
pub(crate) struct Release {
    pub(crate) name: String,
    pub(crate) namespace: String,
}

impl Release {
    /// The release's name for a namespace made by `create_namespace`: its random suffix keeps
    /// the name (and the cluster-wide objects named after it) unique across scenarios.
    fn for_namespace(namespace: &str) -> Release {
        let suffix = namespace.rsplit('-').next().unwrap_or(namespace);
        Release {
            name: format!("tlo-{suffix}"),
            namespace: namespace.to_owned(),
        }
    }

    pub(crate) async fn install(world: &World, namespace: &str, set: &[String]) -> anyhow::Result<Release> {
        let release = Release::for_namespace(namespace);
        let chart = chart_path();
        let mut args = vec![
            "install",
            &release.name,
            chart.to_str().context("the chart path is not UTF-8")?,
            "--namespace",
            &release.namespace,
            // The World installed the CRD already, from crds/.
            "--skip-crds",
            // A scenario's own values come later and win.
            "--set",
            LOCAL_POLICY_VALUES,
        ];
        for value in set {
            args.extend(["--set", value]);
        }
        helm_ok(world, &args).await?;
        Ok(release)
    }

    pub(crate) async fn manifest(&self, world: &World) -> anyhow::Result<Vec<Value>> {
        parse_manifest(&helm_ok(world, &["get", "manifest", &self.name, "--namespace", &self.namespace]).await?)
    }

    async fn uninstall(&self, world: &World) -> anyhow::Result<()> {
        helm_ok(world, &["uninstall", &self.name, "--namespace", &self.namespace]).await?;
        Ok(())
    }

    /// The installed Deployment (read back from the API server) and the ServiceAccount its
    /// Pods run as, which must exist and belong to the release.
    async fn deployment_and_service_account(&self, world: &World) -> anyhow::Result<(Deployment, String)> {
        let manifest = self.manifest(world).await?;
        let name = name_of(the_deployment(&manifest)?).to_owned();
        let deployment = Api::<Deployment>::namespaced(world.client(), &self.namespace)
            .get(&name)
            .await
            .with_context(|| format!("the release's Deployment {name} is not in the cluster"))?;
        let account = pod_spec(&deployment)?
            .service_account_name
            .clone()
            .context("the Deployment names no serviceAccountName")?;
        let object = Api::<ServiceAccount>::namespaced(world.client(), &self.namespace)
            .get_opt(&account)
            .await?
            .with_context(|| format!("the Deployment runs as ServiceAccount {account}, which the release did not create"))?;
        ensure!(
            object.annotations().get("meta.helm.sh/release-name") == Some(&self.name),
            "ServiceAccount {account} does not belong to release {}",
            self.name
        );
        Ok((deployment, account))
    }
}

fn pod_spec(deployment: &Deployment) -> anyhow::Result<&PodSpec> {
    deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .context("the Deployment has no pod spec")
}

fn operator_container(deployment: &Deployment) -> anyhow::Result<&Container> {
    pod_spec(deployment)?
        .containers
        .iter()
        .find(|c| c.name == "operator")
        .context("the Deployment has no container named operator")
}

/// Starts the operator binary as the Deployment's `operator` container would run: its args
/// (with the listen address moved to a free loopback port), its environment (the downward
/// API's pod name and namespace filled in) and `kubeconfig` in place of the mounted token.
pub(crate) fn start_like_the_deployment(deployment: &Deployment, pod: &str, kubeconfig: &Path) -> anyhow::Result<OperatorProcess> {
    let container = operator_container(deployment)?;
    let pod_name = format!("{}-{pod}", deployment.name_any());
    let pod_namespace = deployment.namespace().unwrap_or_default();
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, var.value_from.as_ref().and_then(|from| from.field_ref.as_ref())) {
            (Some(value), _) => value.clone(),
            (None, Some(field)) if field.field_path == "metadata.name" => pod_name.clone(),
            (None, Some(field)) if field.field_path == "metadata.namespace" => pod_namespace.clone(),
            _ => bail!("the test cannot fill in the environment variable {} of the Deployment", var.name),
        };
        env.push((var.name.clone(), value));
    }
    // Kubernetes expands $(VAR) in args from the container's environment.
    let expand = |arg: &str| {
        env.iter()
            .fold(arg.to_owned(), |arg, (name, value)| arg.replace(&format!("$({name})"), value))
    };
    let mut args: Vec<String> = container.args.iter().flatten().map(|arg| expand(arg)).collect();
    let listen = args
        .iter()
        .position(|arg| arg == "--listen-addr")
        .context("the Deployment's args have no --listen-addr")?;
    *args.get_mut(listen + 1).context("--listen-addr has no value")? = "127.0.0.1:0".to_owned();
    OperatorProcess::start(&operator_binary(), kubeconfig, &args, &env)
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

pub(crate) fn assert_nothing_forbidden(logs: &str) -> anyhow::Result<()> {
    let forbidden: Vec<&str> = logs.lines().filter(|line| line.to_lowercase().contains("forbidden")).collect();
    ensure!(
        forbidden.is_empty(),
        "the operator, running as the chart's ServiceAccount, was refused by RBAC:\n{}",
        forbidden.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1. lint, template, schema

async fn lint_template_and_schema(world: Arc<World>) -> anyhow::Result<()> {
    let chart = chart_path();
    let chart = chart.to_str().context("the chart path is not UTF-8")?;

    // helm lint is clean: --strict turns warnings into failures, and none are printed.
    let lint = helm_ok(&world, &["lint", chart, "--strict"]).await?;
    ensure!(
        !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
        "helm lint is not clean:\n{lint}"
    );

    // Defaults: cluster-wide RBAC, one replica, no leader election, no PDB.
    let defaults = parse_manifest(&helm_ok(&world, &["template", "lint", chart, "--namespace", "tlo-system"]).await?)?;
    let names = describe_objects(&defaults);
    let operator_roles = of_kind(&defaults, "ClusterRole")
        .into_iter()
        .filter(|role| {
            role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"].is_null()
                && role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"].is_null()
        })
        .count();
    ensure!(operator_roles == 1, "not one ClusterRole for the operator by default: {names}");
    ensure!(
        of_kind(&defaults, "ClusterRoleBinding").len() == 1,
        "no ClusterRoleBinding by default: {names}"
    );
    ensure!(of_kind(&defaults, "Role").is_empty(), "Roles by default: {names}");
    ensure!(
        of_kind(&defaults, "PodDisruptionBudget").is_empty(),
        "a PDB with one replica would block node drains: {names}"
    );
    let deployment = the_deployment(&defaults)?;
    let args = rendered_args(deployment)?;
    ensure!(
        !args.contains(&"--leader-election".to_owned()),
        "leader election is on by default: {args:?}"
    );
    ensure!(
        !args.contains(&"--namespace".to_owned()),
        "the default watches only some namespaces: {args:?}"
    );
    ensure!(
        deployment["spec"]["strategy"]["type"] == "Recreate",
        "one replica without leader election must use Recreate, not {}",
        deployment["spec"]["strategy"]
    );

    // Two replicas in two namespaces.
    let rendered = helm_ok(
        &world,
        &[
            "template",
            "lint",
            chart,
            "--namespace",
            "tlo-system",
            "--set",
            "replicaCount=2",
            "--set",
            "watchNamespaces={team-a,team-b}",
        ],
    )
    .await?;
    let namespaced = parse_manifest(&rendered)?;
    let names = describe_objects(&namespaced);
    ensure!(
        of_kind(&namespaced, "ClusterRole").is_empty() && of_kind(&namespaced, "ClusterRoleBinding").is_empty(),
        "a namespaced install must grant nothing cluster-wide: {names}"
    );
    let deployment = the_deployment(&namespaced)?;
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("no serviceAccountName")?;
    for team in ["team-a", "team-b"] {
        let role = of_kind(&namespaced, "Role")
            .into_iter()
            .find(|role| namespace_of(role) == Some(team))
            .with_context(|| format!("no Role in {team}: {names}"))?;
        let binding = of_kind(&namespaced, "RoleBinding")
            .into_iter()
            .find(|binding| namespace_of(binding) == Some(team))
            .with_context(|| format!("no RoleBinding in {team}: {names}"))?;
        ensure!(
            binding["roleRef"]["kind"] == "Role" && binding["roleRef"]["name"] == name_of(role),
            "the RoleBinding in {team} does not bind the Role {}: {}",
            name_of(role),
            binding["roleRef"]
        );
        ensure!(
            binding["subjects"] == json!([{"kind": "ServiceAccount", "name": account, "namespace": "tlo-system"}]),
            "the RoleBinding in {team} does not bind the operator's ServiceAccount: {}",
            binding["subjects"]
        );
    }
    let pdbs = of_kind(&namespaced, "PodDisruptionBudget");
    ensure!(pdbs.len() == 1, "two replicas need a PodDisruptionBudget: {names}");
    ensure!(
        pdbs[0]["spec"]["selector"] == deployment["spec"]["selector"],
        "the PDB selects {} but the Deployment's pods are {}",
        pdbs[0]["spec"]["selector"],
        deployment["spec"]["selector"]
    );
    ensure!(deployment["spec"]["replicas"] == 2, "replicas: {}", deployment["spec"]["replicas"]);
    let args = rendered_args(deployment)?.join(" ");
    ensure!(args.contains("--leader-election"), "two replicas without leader election: {args}");
    ensure!(
        args.contains("--namespace team-a") && args.contains("--namespace team-b"),
        "the operator is not told which namespaces to watch: {args}"
    );

    // A value of the wrong type is rejected by the schema, saying which and why.
    let wrong = helm(&world, &["lint", chart, "--set", "replicaCount=two"]).await?;
    let said = format!("{}\n{}", wrong.stdout, wrong.stderr);
    ensure!(!wrong.success, "helm lint accepted replicaCount=two:\n{said}");
    ensure!(
        said.contains("/replicaCount") && said.contains("schema") && said.contains("want integer"),
        "helm lint's complaint about replicaCount=two does not explain the schema problem:\n{said}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. install, then the operator as the chart's ServiceAccount

/// `helm install` watching one new namespace, then the operator run like the Deployment
/// would run it, and a SaaS connection in the watched namespace that becomes Ready.
async fn install_and_reach_ready(world: &World) -> anyhow::Result<(Release, Scenario)> {
    let release_namespace = world.control_plane.create_namespace("tlo-system").await?;
    let team = world.control_plane.create_namespace("team").await?;
    let release = Release::install(world, &release_namespace, &[format!("watchNamespaces={{{team}}}")]).await?;

    let (deployment, account) = release.deployment_and_service_account(world).await?;
    let args = operator_container(&deployment)?.args.clone().unwrap_or_default().join(" ");
    ensure!(
        args.contains(&format!("--namespace {team}")),
        "the Deployment does not tell the operator to watch {team}: {args}"
    );
    let kubeconfig = world.control_plane.service_account_kubeconfig(&release.namespace, &account).await?;
    let operator = start_like_the_deployment(&deployment, "first", &kubeconfig)?;
    let mut s = Scenario::with_operator(world, &team, &kubeconfig, operator).await?;

    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.remember_credential(&data);
    ensure!(
        s.standin.call_api_with_secret(&data).await? == 200,
        "Tasklist does not accept the token the operator stored as the chart's ServiceAccount"
    );
    Ok((release, s))
}

async fn install_then_run_the_operator_as_its_service_account(world: Arc<World>) -> anyhow::Result<()> {
    let (_release, s) = install_and_reach_ready(&world).await?;
    wait_for_event(&s, "orders", "CredentialIssued", EVENT_TIMEOUT).await?;
    assert_nothing_forbidden(&s.all_operator_logs())?;
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 3. least privilege

/// One question to the API server: may the caller `verb` the `resource` (optionally
/// `resource/subresource`) of `group` in `namespace` (None: cluster-wide)?
struct Access<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    namespace: Option<&'a str>,
    /// One object by name; None: any.
    name: Option<&'a str>,
}

fn access<'a>(verb: &'a str, group: &'a str, resource: &'a str, namespace: Option<&'a str>) -> Access<'a> {
    Access {
        verb,
        group,
        resource,
        namespace,
        name: None,
    }
}

impl<'a> Access<'a> {
    fn named(self, name: &'a str) -> Access<'a> {
        Access { name: Some(name), ..self }
    }
}

impl Access<'_> {
    fn describe(&self) -> String {
        let group = if self.group.is_empty() { "core" } else { self.group };
        format!(
            "{} {}{} ({group}) in {}",
            self.verb,
            self.resource,
            self.name.map_or(String::new(), |name| format!(" named {name}")),
            self.namespace.map_or("all namespaces".to_owned(), |ns| format!("namespace {ns}"))
        )
    }

    async fn allowed(&self, client: &Client) -> anyhow::Result<bool> {
        let (resource, subresource) = match self.resource.split_once('/') {
            Some((resource, subresource)) => (resource, Some(subresource.to_owned())),
            None => (self.resource, None),
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(self.verb.to_owned()),
                    group: Some(self.group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    namespace: self.namespace.map(str::to_owned),
                    name: self.name.map(str::to_owned),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .with_context(|| format!("cannot ask whether the ServiceAccount may {}", self.describe()))?;
        Ok(answer.status.is_some_and(|status| status.allowed))
    }
}

/// Asks every question and fails listing every answer that is not the expected one.
async fn expect_access(client: &Client, who: &str, allowed: &[Access<'_>], denied: &[Access<'_>]) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for question in allowed {
        if !question.allowed(client).await? {
            wrong.push(format!("DENIED but needed: {}", question.describe()));
        }
    }
    for question in denied {
        if question.allowed(client).await? {
            wrong.push(format!("ALLOWED but must not be: {}", question.describe()));
        }
    }
    ensure!(wrong.is_empty(), "{who}:\n  {}", wrong.join("\n  "));
    Ok(())
}

const CRD_GROUP: &str = "tasklist.camunda.community";

async fn service_account_is_not_too_powerful(world: Arc<World>) -> anyhow::Result<()> {
    // Namespaced install: watches `team` only.
    let release_namespace = world.control_plane.create_namespace("tlo-system").await?;
    let team = world.control_plane.create_namespace("team").await?;
    let other = world.control_plane.create_namespace("other").await?;
    let release = Release::install(&world, &release_namespace, &[format!("watchNamespaces={{{team}}}")]).await?;
    let (_, account) = release.deployment_and_service_account(&world).await?;
    let kubeconfig = world.control_plane.service_account_kubeconfig(&release.namespace, &account).await?;
    let client = client_from(&kubeconfig).await?;
    let (team, other, own) = (Some(team.as_str()), Some(other.as_str()), Some(release.namespace.as_str()));
    let mut allowed = Vec::new();
    for verb in ["get", "list", "watch", "create", "patch"] {
        allowed.push(access(verb, "", "secrets", team));
    }
    for verb in ["get", "list", "watch"] {
        allowed.push(access(verb, CRD_GROUP, "tasklistconnections", team));
    }
    allowed.push(access("patch", CRD_GROUP, "tasklistconnections/status", team));
    let denied = [
        access("get", "", "secrets", other),
        access("list", "", "secrets", other),
        access("list", "", "secrets", own),
        access("list", "", "secrets", None),
        access("list", CRD_GROUP, "tasklistconnections", other),
        access("list", CRD_GROUP, "tasklistconnections", None),
        access("delete", "", "secrets", team),
        access("update", CRD_GROUP, "tasklistconnections", team),
        access("patch", CRD_GROUP, "tasklistconnections", team),
        access("delete", CRD_GROUP, "tasklistconnections", team),
        access("delete", "", "namespaces", None),
        access("update", "apps", "deployments", own),
        access("patch", "apps", "deployments", own),
        access("create", "rbac.authorization.k8s.io", "roles", team),
        access("create", "rbac.authorization.k8s.io", "roles", own),
        access("create", "rbac.authorization.k8s.io", "rolebindings", team),
        access("create", "rbac.authorization.k8s.io", "rolebindings", own),
        access("create", "rbac.authorization.k8s.io", "clusterroles", None),
        access("create", "rbac.authorization.k8s.io", "clusterrolebindings", None),
    ];
    expect_access(&client, "namespaced install (watchNamespaces set)", &allowed, &denied).await?;

    // Cluster-wide install (default values), in its own namespace. No operator runs as it:
    // it would reconcile every other scenario's connections.
    let cluster_namespace = world.control_plane.create_namespace("tlo-cluster").await?;
    let cluster_release = Release::install(&world, &cluster_namespace, &[]).await?;
    let (_, cluster_account) = cluster_release.deployment_and_service_account(&world).await?;
    let kubeconfig = world
        .control_plane
        .service_account_kubeconfig(&cluster_release.namespace, &cluster_account)
        .await?;
    let client = client_from(&kubeconfig).await?;
    let allowed = [
        access("list", "", "secrets", None),
        access("watch", "", "secrets", None),
        access("get", "", "secrets", other),
        access("create", "", "secrets", other),
        access("list", CRD_GROUP, "tasklistconnections", None),
        access("watch", CRD_GROUP, "tasklistconnections", None),
        access("patch", CRD_GROUP, "tasklistconnections/status", other),
    ];
    let denied = [
        access("delete", "", "secrets", None),
        access("delete", "", "secrets", other),
        access("deletecollection", "", "secrets", None),
        access("delete", "", "namespaces", None),
        access("update", CRD_GROUP, "tasklistconnections", None),
        access("create", "rbac.authorization.k8s.io", "clusterrolebindings", None),
        access("create", "rbac.authorization.k8s.io", "clusterroles", None),
        access("update", "apps", "deployments", Some(cluster_release.namespace.as_str())),
    ];
    let result = expect_access(&client, "cluster-wide install (default values)", &allowed, &denied).await;
    // Leave no cluster-wide grant behind for the rest of the run.
    cluster_release.uninstall(&world).await?;
    result
}

// ---------------------------------------------------------------------------------------
// 4. upgrade and uninstall

async fn upgrade_keeps_connections_and_uninstall_removes_the_operator(world: Arc<World>) -> anyhow::Result<()> {
    let (release, mut s) = install_and_reach_ready(&world).await?;
    let before = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    let team = s.namespace.clone();

    // helm upgrade with a changed value; the Deployment changes, so its Pod would be replaced.
    let chart = chart_path();
    let chart = chart.to_str().context("the chart path is not UTF-8")?;
    let watch = format!("watchNamespaces={{{team}}}");
    helm_ok(
        &world,
        &[
            "upgrade",
            &release.name,
            chart,
            "--namespace",
            &release.namespace,
            "--set",
            &watch,
            "--set",
            "logLevel=debug",
            "--set",
            LOCAL_POLICY_VALUES,
        ],
    )
    .await?;
    let (deployment, account) = release.deployment_and_service_account(&world).await?;
    let rust_log = operator_container(&deployment)?
        .env
        .iter()
        .flatten()
        .find(|var| var.name == "RUST_LOG")
        .and_then(|var| var.value.clone());
    ensure!(
        rust_log.as_deref() == Some("debug"),
        "the upgrade did not reach the Deployment: RUST_LOG is {rust_log:?}"
    );

    // The connection and its Secret are untouched by the upgrade itself.
    s.wait_ready("orders").await?;
    ensure!(
        s.derived_secret(SECRET).await?.as_ref() == Some(&before),
        "the upgrade changed or removed the derived Secret"
    );

    // The new Pod: a fresh token of the (same) ServiceAccount, the new args and environment.
    let kubeconfig = world.control_plane.service_account_kubeconfig(&release.namespace, &account).await?;
    s.replace_operator(start_like_the_deployment(&deployment, "upgraded", &kubeconfig)?)
        .await?;
    s.wait_ready("orders").await?;
    let kept = s
        .derived_secret(SECRET)
        .await?
        .context("the derived Secret vanished after the upgrade")?;
    ensure!(
        s.standin.call_api_with_secret(&kept).await? == 200,
        "Tasklist no longer accepts the stored token after the upgrade"
    );
    // RBAC still lets the new operator do its work: a refresh on request.
    s.annotate_connection("orders", REFRESH_ANNOTATION, "after-upgrade").await?;
    let refreshed = s
        .wait_for_secret(SECRET, "refreshed after the upgrade", Duration::from_secs(10), |data| {
            data.get("token").is_some_and(|token| *token != kept["token"])
        })
        .await?;
    s.remember_credential(&refreshed);
    ensure!(
        s.standin.call_api_with_secret(&refreshed).await? == 200,
        "Tasklist does not accept the token refreshed after the upgrade"
    );
    wait_for_event(&s, "orders", "CredentialRefreshed", EVENT_TIMEOUT).await?;
    ensure!(
        s.operator.logs().contains("DEBUG"),
        "logLevel=debug did not make the new operator log at debug level"
    );
    assert_nothing_forbidden(&s.all_operator_logs())?;
    s.assert_no_credential_leaked().await?;

    // helm uninstall: the Deployment's Pod stops, then every object of the release is gone.
    let manifest = release.manifest(&world).await?;
    s.operator.terminate(Duration::from_secs(10)).await?;
    release.uninstall(&world).await?;
    let client = world.client();
    eventually(
        "every object of the release gone after helm uninstall",
        Duration::from_secs(30),
        || async {
            let mut left = Vec::new();
            for object in &manifest {
                if object_exists(&client, object).await? {
                    left.push(object.clone());
                }
            }
            Ok(if left.is_empty() {
                Check::Done(())
            } else {
                Check::NotYet(format!("these still exist: {}", describe_objects(&left)))
            })
        },
    )
    .await?;
    let kinds: Vec<&str> = manifest.iter().map(kind_of).collect();
    for kind in [
        "Deployment",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        ensure!(
            kinds.contains(&kind),
            "the release had no {kind} to remove: {}",
            describe_objects(&manifest)
        );
    }
    let status = helm(&world, &["status", &release.name, "--namespace", &release.namespace]).await?;
    ensure!(!status.success, "helm still knows the release after uninstall:\n{}", status.stdout);

    // Helm keeps CRDs: the CRD, the user's connection and its Secret are still there.
    Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(TasklistConnection::crd_name())
        .await?
        .context("helm uninstall removed the CRD")?;
    s.connections()
        .get_opt("orders")
        .await?
        .context("helm uninstall removed the user's TasklistConnection")?;
    s.derived_secret(SECRET)
        .await?
        .context("the derived Secret disappeared with the release")?;

    // The uninstalled operator's credentials no longer work.
    let sa_client = client_from(&kubeconfig).await?;
    eventually(
        "the uninstalled operator's ServiceAccount token refused",
        Duration::from_secs(15),
        || async {
            let outcome = Api::<TasklistConnection>::namespaced(sa_client.clone(), &team)
                .list(&ListParams::default())
                .await;
            Ok(match outcome {
                Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => Check::Done(()),
                outcome => Check::NotYet(format!("it still lists connections: {:?}", outcome.map(|list| list.items.len()))),
            })
        },
    )
    .await?;
    Ok(())
}

/// Whether an object of a rendered manifest exists in the cluster.
async fn object_exists(client: &Client, object: &Value) -> anyhow::Result<bool> {
    let name = name_of(object);
    let namespace = namespace_of(object).unwrap_or_default();
    let client = client.clone();
    let exists = match kind_of(object) {
        "Deployment" => Api::<Deployment>::namespaced(client, namespace).get_opt(name).await?.is_some(),
        "ServiceAccount" => Api::<ServiceAccount>::namespaced(client, namespace).get_opt(name).await?.is_some(),
        "Service" => Api::<Service>::namespaced(client, namespace).get_opt(name).await?.is_some(),
        "Role" => Api::<Role>::namespaced(client, namespace).get_opt(name).await?.is_some(),
        "RoleBinding" => Api::<RoleBinding>::namespaced(client, namespace).get_opt(name).await?.is_some(),
        "ClusterRole" => Api::<ClusterRole>::all(client).get_opt(name).await?.is_some(),
        "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client).get_opt(name).await?.is_some(),
        "PodDisruptionBudget" => Api::<PodDisruptionBudget>::namespaced(client, namespace)
            .get_opt(name)
            .await?
            .is_some(),
        "NetworkPolicy" => Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client, namespace)
            .get_opt(name)
            .await?
            .is_some(),
        "ValidatingAdmissionPolicy" => Api::<ValidatingAdmissionPolicy>::all(client).get_opt(name).await?.is_some(),
        "ValidatingAdmissionPolicyBinding" => Api::<ValidatingAdmissionPolicyBinding>::all(client).get_opt(name).await?.is_some(),
        kind => bail!("the release has a {kind} {name} this test does not know how to look up"),
    };
    Ok(exists)
}

// ---------------------------------------------------------------------------------------
// 5. two replicas: leader election with the chart's Lease permissions

async fn two_replicas_elect_a_leader_as_the_service_account(world: Arc<World>) -> anyhow::Result<()> {
    let release_namespace = world.control_plane.create_namespace("tlo-system").await?;
    let team = world.control_plane.create_namespace("team").await?;
    let release = Release::install(
        &world,
        &release_namespace,
        &["replicaCount=2".to_owned(), format!("watchNamespaces={{{team}}}")],
    )
    .await?;
    let (deployment, account) = release.deployment_and_service_account(&world).await?;
    let args = operator_container(&deployment)?.args.clone().unwrap_or_default();
    let lease_name = args
        .iter()
        .position(|arg| arg == "--leader-election-lease-name")
        .and_then(|at| args.get(at + 1))
        .with_context(|| format!("two replicas but no --leader-election-lease-name: {args:?}"))?
        .clone();
    let kubeconfig = world.control_plane.service_account_kubeconfig(&release.namespace, &account).await?;

    // What the leader-election Role grants, and no more.
    let client = client_from(&kubeconfig).await?;
    let (own, watched) = (Some(release.namespace.as_str()), Some(team.as_str()));
    const LEASES: &str = "coordination.k8s.io";
    let allowed = [
        access("create", LEASES, "leases", own),
        access("get", LEASES, "leases", own).named(&lease_name),
        access("update", LEASES, "leases", own).named(&lease_name),
    ];
    let denied = [
        access("update", LEASES, "leases", own).named("someone-elses-lease"),
        access("delete", LEASES, "leases", own).named(&lease_name),
        access("create", LEASES, "leases", watched),
        access("list", LEASES, "leases", None),
    ];
    expect_access(&client, "leader election (replicaCount=2)", &allowed, &denied).await?;

    // Two pods of the Deployment, as its ServiceAccount; one of them reconciles.
    let first = start_like_the_deployment(&deployment, "a", &kubeconfig)?;
    let mut second = start_like_the_deployment(&deployment, "b", &kubeconfig)?;
    let pods = [format!("{}-a", deployment.name_any()), format!("{}-b", deployment.name_any())];
    let mut s = Scenario::with_operator(&world, &team, &kubeconfig, first).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.remember_credential(&data);

    let leases: Api<Lease> = Api::namespaced(world.client(), &release.namespace);
    let holder = |lease: Option<Lease>| lease.and_then(|lease| lease.spec?.holder_identity);
    let leader = holder(leases.get_opt(&lease_name).await?)
        .with_context(|| format!("no Lease {lease_name} with a holder in {}", release.namespace))?;
    ensure!(
        pods.contains(&leader),
        "the Lease is held by {leader:?}, not one of the pods {pods:?}"
    );

    // The leader's pod is deleted: it hands over, and the other one takes the Lease and works.
    let (successor, successor_logs) = if leader == pods[0] {
        s.operator.terminate(Duration::from_secs(10)).await?;
        (&pods[1], second.logs())
    } else {
        second.terminate(Duration::from_secs(10)).await?;
        (&pods[0], s.operator.logs())
    };
    eventually(
        &format!("{successor} taking the Lease after {leader} stopped"),
        Duration::from_secs(30),
        || async {
            Ok(if holder(leases.get_opt(&lease_name).await?).as_ref() == Some(successor) {
                Check::Done(())
            } else {
                Check::NotYet(format!("--- its log (tail) ---\n{}", tail(&successor_logs, 20)))
            })
        },
    )
    .await?;
    s.annotate_connection("orders", REFRESH_ANNOTATION, "after-failover").await?;
    let before = data["token"].clone();
    let refreshed = s
        .wait_for_secret(SECRET, "refreshed by the new leader", Duration::from_secs(15), |data| {
            data.get("token").is_some_and(|token| *token != before)
        })
        .await?;
    s.remember_credential(&refreshed);
    ensure!(
        s.standin.call_api_with_secret(&refreshed).await? == 200,
        "Tasklist does not accept the new leader's token"
    );
    assert_nothing_forbidden(&format!("{}\n{}", s.all_operator_logs(), second.logs()))?;
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 6. platform values on the real API server; NOTES

/// Whether `user` may `verb` TasklistConnections in `namespace`, as the API server's
/// authorizer (with the aggregated ClusterRoles) answers.
async fn user_may(client: &Client, user: &str, verb: &str, namespace: &str) -> anyhow::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(CRD_GROUP.to_owned()),
                resource: Some("tasklistconnections".to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|status| status.allowed))
}

async fn platform_values_are_accepted_and_notes_advise_mounting(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("tlo-platform").await?;
    let release = Release::for_namespace(&namespace);
    let chart = chart_path();
    let chart = chart.to_str().context("the chart path is not UTF-8")?;
    // Every platform value at once, with the default cluster-wide scope (so that the
    // aggregated ClusterRoles exist). The API server validates each object it creates.
    let values = [
        "--set-json",
        r#"networkPolicy={"enabled":true,"apiServer":{"cidrs":["127.0.0.1/32"]},"egressCIDRs":["10.20.0.0/16"],"metricsNamespaceSelector":{"kubernetes.io/metadata.name":"monitoring"}}"#,
        "--set-json",
        r#"extraVolumes=[{"name":"scratch","emptyDir":{}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"scratch","mountPath":"/scratch"}]"#,
        "--set-json",
        r#"topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/name":"tasklist-operator"}}}]"#,
        "--set",
        "caBundle.configMapName=proxy-ca",
        "--set",
        "podSecurityContext.runAsUser=null",
        "--set",
        "podSecurityContext.fsGroup=null",
        "--set",
        "global.commonLabels.cost-center=platform",
        "--set",
        "concurrency=8",
    ];
    let mut args = vec!["install", &release.name, chart, "--namespace", &release.namespace, "--skip-crds"];
    args.extend(values);
    let installed = helm_ok(&world, &args).await;
    // Cluster-wide objects must not outlive the scenario, whatever happens next.
    let outcome = check_platform_install(&world, &release, installed).await;
    let uninstalled = release.uninstall(&world).await;
    outcome.and(uninstalled)
}

async fn check_platform_install(world: &World, release: &Release, installed: anyhow::Result<String>) -> anyhow::Result<()> {
    let output = installed?;
    // NOTES: mount the Secret; never a token in an environment variable.
    let notes = output
        .split_once("NOTES:")
        .map(|(_, notes)| notes)
        .context("helm printed no NOTES")?;
    ensure!(
        notes.contains("Mount it as a volume"),
        "NOTES do not tell to mount the Secret:\n{notes}"
    );
    for wrong in ["from env", "envFrom", "secretKeyRef", "reference it from"] {
        ensure!(
            !notes.contains(wrong),
            "NOTES suggest environment variables ({wrong:?}), which freeze an expiring token:\n{notes}"
        );
    }

    let manifest = release.manifest(world).await?;
    for object in &manifest {
        ensure!(
            object_exists(&world.client(), object).await?,
            "{} {} was not created",
            kind_of(object),
            name_of(object)
        );
        ensure!(
            object["metadata"]["labels"]["cost-center"] == "platform",
            "{} {} lacks global.commonLabels",
            kind_of(object),
            name_of(object)
        );
    }
    let (deployment, _) = release.deployment_and_service_account(world).await?;
    let pod = pod_spec(&deployment)?;
    let security = pod.security_context.as_ref().context("no pod securityContext")?;
    ensure!(
        security.run_as_user.is_none() && security.fs_group.is_none() && security.run_as_non_root == Some(true),
        "the pod securityContext does not leave the UID to the platform: {security:?}"
    );
    ensure!(
        pod.volumes.iter().flatten().any(|volume| volume.name == "ca-bundle")
            && pod.volumes.iter().flatten().any(|volume| volume.name == "scratch"),
        "the volumes did not reach the Deployment: {:?}",
        pod.volumes
    );
    ensure!(
        pod.topology_spread_constraints
            .as_ref()
            .is_some_and(|constraints| constraints.len() == 1),
        "no topologySpreadConstraints on the Deployment"
    );

    // crds.enabled: the templated CRD is one the API server accepts in place of the
    // installed one (a server-side dry run, so that the shared CRD stays as it is).
    let chart = chart_path();
    let rendered = helm_ok(
        world,
        &[
            "template",
            "crds",
            chart.to_str().context("the chart path is not UTF-8")?,
            "--set",
            "crds.enabled=true",
            "--show-only",
            "templates/crds.yaml",
        ],
    )
    .await?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&rendered)?;
    ensure!(
        crd.annotations().get("helm.sh/resource-policy").map(String::as_str) == Some("keep"),
        "the templated CRD is not kept on uninstall"
    );
    Api::<CustomResourceDefinition>::all(world.client())
        .patch(
            TasklistConnection::crd_name(),
            &kube::api::PatchParams::apply("tasklist-operator-chart-test").dry_run().force(),
            &kube::api::Patch::Apply(&crd),
        )
        .await
        .context("the API server refuses the templated CRD")?;

    // The aggregated ClusterRoles: view may read connections, edit may change them.
    let admin = world.client();
    let team = world.control_plane.create_namespace("tlo-viewers").await?;
    for (user, role) in [("vera", "view"), ("eddie", "edit")] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        }))?;
        Api::<RoleBinding>::namespaced(admin.clone(), &team)
            .create(&PostParams::default(), &binding)
            .await?;
    }
    // The aggregation controller fills view and edit in shortly after the install.
    eventually(
        "view/edit to cover TasklistConnections (vera list, vera not delete, eddie create, eddie delete)",
        Duration::from_secs(30),
        || async {
            let answers = [
                user_may(&admin, "vera", "list", &team).await?,
                !user_may(&admin, "vera", "delete", &team).await?,
                user_may(&admin, "eddie", "create", &team).await?,
                user_may(&admin, "eddie", "delete", &team).await?,
            ];
            Ok(if answers.iter().all(|ok| *ok) {
                Check::Done(())
            } else {
                Check::NotYet(format!("{answers:?}"))
            })
        },
    )
    .await?;
    Ok(())
}
