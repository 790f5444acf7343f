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
            (Some(oauth2), None, None) if oauth2.audience.is_empty() => "oauth2 with scope only",
            (Some(_), None, None) => "oauth2",
            (None, Some(_), None) => "cookie",
            (None, None, Some(_)) => "basic",
            _ => panic!("examples/{file}: not exactly one method"),
        };
        methods.insert(method);
    }
    assert_eq!(methods, BTreeSet::from(["basic", "cookie", "oauth2", "oauth2 with scope only"]));
}
