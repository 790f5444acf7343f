//! The committed CRD YAML is exactly what `tasklist-operator crd` prints, in crds/ and in
//! the chart: a change to the Rust types without regenerating them fails here.
//! Regenerate with `make crd`.

use std::path::Path;
use std::process::Command;

fn crd_output() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tasklist-operator"))
        .arg("crd")
        .output()
        .expect("run tasklist-operator crd");
    assert!(
        output.status.success(),
        "tasklist-operator crd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the CRD is UTF-8")
}

fn committed(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("cannot read {}: {error}", full.display()))
}

#[test]
fn crds_folder_matches_the_crd_command() {
    assert!(
        crd_output() == committed("crds/tasklistconnection.yaml"),
        "crds/tasklistconnection.yaml is stale: run `make crd`"
    );
}

#[test]
fn chart_crd_matches_the_crd_command() {
    assert!(
        crd_output() == committed("charts/tasklist-operator/crds/tasklistconnection.yaml"),
        "charts/tasklist-operator/crds/tasklistconnection.yaml is stale: run `make crd`"
    );
}

#[test]
fn every_spec_and_status_field_has_a_description_for_kubectl_explain() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&crd_output()).expect("the CRD is YAML");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut undocumented = Vec::new();
    find_undocumented(&schema["properties"]["spec"], "spec", &mut undocumented);
    find_undocumented(&schema["properties"]["status"], "status", &mut undocumented);
    // Conditions are metav1.Condition, documented by Kubernetes itself.
    undocumented.retain(|path| !path.starts_with("status.conditions."));
    assert!(undocumented.is_empty(), "fields without a description: {undocumented:?}");
}

fn find_undocumented(node: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
    if node.get("description").is_none() {
        out.push(path.to_owned());
    }
    if let Some(properties) = node.get("properties").and_then(|p| p.as_mapping()) {
        for (name, child) in properties {
            find_undocumented(child, &format!("{path}.{}", name.as_str().unwrap_or("?")), out);
        }
    }
    if let Some(items) = node.get("items") {
        find_undocumented(items, &format!("{path}[]"), out);
    }
}
