//! Every manifest in examples/ is one a user can apply: each TasklistConnection reads as
//! the CRD's type, and each method the README documents has its example.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize as _;
use tasklist_operator::crd::TasklistConnection;

fn examples() -> Vec<(String, serde_json::Value)> {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut documents = Vec::new();
    for entry in std::fs::read_dir(&folder).expect("examples/ exists") {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).expect("valid YAML");
            if !value.is_null() {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                documents.push((name, serde_json::to_value(value).expect("JSON-compatible YAML")));
            }
        }
    }
    documents
}

#[test]
fn every_example_connection_reads_and_every_method_has_one() {
    let mut methods = BTreeSet::new();
    for (file, document) in examples() {
        if document["kind"] != "TasklistConnection" {
            continue;
        }
        let connection: TasklistConnection = serde_json::from_value(document).unwrap_or_else(|error| panic!("examples/{file}: {error}"));
        let auth = &connection.spec.auth;
        let method = match (&auth.oauth2, &auth.cookie, &auth.basic) {
            (Some(oauth2), None, None)
                if oauth2.client_authentication == tasklist_operator::crd::ClientAuthentication::ServiceAccountToken =>
            {
                assert!(
                    oauth2.client_secret_ref.is_none(),
                    "examples/{file}: a secretless connection names a Secret"
                );
                "oauth2 with a ServiceAccount token"
            }
            (Some(oauth2), None, None) if oauth2.audience.is_empty() => "oauth2 with scope only",
            (Some(_), None, None) => "oauth2",
            (None, Some(_), None) => "cookie",
            (None, None, Some(_)) => "basic",
            _ => panic!("examples/{file}: not exactly one method"),
        };
        methods.insert(method);
    }
    assert_eq!(
        methods,
        BTreeSet::from([
            "basic",
            "cookie",
            "oauth2",
            "oauth2 with a ServiceAccount token",
            "oauth2 with scope only"
        ])
    );
}

/// The examples docs/camunda-versions.md names: 8.9+ SaaS on the unified domain, and the
/// 8.8+ Orchestration Cluster with OIDC and with its session login at `/login`.
#[test]
fn the_version_examples_have_the_shapes_the_versions_doc_gives() {
    let connections: Vec<(String, TasklistConnection)> = examples()
        .into_iter()
        .filter(|(_, document)| document["kind"] == "TasklistConnection")
        .map(|(file, document)| (file, serde_json::from_value(document).expect("a TasklistConnection")))
        .collect();
    let in_file = |file: &'static str| connections.iter().filter(move |(name, _)| name == file).map(|(_, c)| c);

    let unified: Vec<_> = in_file("saas-8.9-unified.yaml").collect();
    assert_eq!(unified.len(), 1);
    let url = &unified[0].spec.url;
    let host = url.trim_start_matches("https://").split('/').next().unwrap_or_default();
    assert!(host.ends_with(".api.camunda.io") && url.split('/').count() == 4, "{url}");
    assert!(unified[0].spec.probe.path.is_none(), "the 8.9 example uses the automatic probe");
    let template = unified[0].spec.secret_template.as_ref().expect("a secretTemplate");
    assert_eq!(template.keys.get("CAMUNDA_OAUTH_TOKEN").map(String::as_str), Some("token"));
    for (name, source) in &template.keys {
        assert!(!tasklist_operator::crd::STANDARD_SECRET_KEYS.contains(&name.as_str()), "{name}");
        assert!(tasklist_operator::crd::STANDARD_SECRET_KEYS.contains(&source.as_str()), "{source}");
    }

    let orchestration: Vec<_> = in_file("self-managed-8.8-orchestration.yaml").collect();
    assert_eq!(orchestration.len(), 2);
    assert!(orchestration.iter().any(|c| c.spec.auth.oauth2.is_some()));
    let session = orchestration
        .iter()
        .find_map(|c| c.spec.auth.cookie.as_ref())
        .expect("a session login example");
    assert_eq!(session.login_path, "/login");
}
