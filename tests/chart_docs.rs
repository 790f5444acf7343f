//! The values table in charts/tasklist-operator/README.md is generated from values.yaml
//! (its `# --` comments, as helm-docs reads them) and must not drift from it. Every value
//! must be documented, itself or through a documented parent.
//!
//! Regenerate with `make chart-docs` (runs this test with TLO_WRITE_CHART_DOCS=1).

use std::path::Path;

const BEGIN: &str = "<!-- values:begin (generated from values.yaml by `make chart-docs`) -->";
const END: &str = "<!-- values:end -->";

/// One documented value: its dotted path and its description.
struct Documented {
    path: String,
    description: String,
}

/// Reads the `# --` comments of values.yaml and the key each one documents.
fn documented_values(values: &str) -> Vec<Documented> {
    let mut documented = Vec::new();
    // (indentation, key) of the keys enclosing the current line.
    let mut parents: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for line in values.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(text) = trimmed.strip_prefix("# --") {
            pending = Some((indent, text.trim().to_owned()));
            continue;
        }
        if let Some(text) = trimmed.strip_prefix('#') {
            if let Some((_, description)) = pending.as_mut() {
                description.push(' ');
                description.push_str(text.trim());
            }
            continue;
        }
        if trimmed.is_empty() {
            pending = None;
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else { continue };
        if key.starts_with('-') || key.contains(' ') {
            continue;
        }
        while parents.last().is_some_and(|(depth, _)| *depth >= indent) {
            parents.pop();
        }
        let path = parents
            .iter()
            .map(|(_, key)| key.as_str())
            .chain([key])
            .collect::<Vec<_>>()
            .join(".");
        if let Some((comment_indent, description)) = pending.take()
            && comment_indent == indent
        {
            documented.push(Documented {
                path: path.clone(),
                description,
            });
        }
        parents.push((indent, key.to_owned()));
    }
    documented
}

/// The value at a dotted path.
fn lookup<'a>(values: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
    path.split('.').try_fold(values, |value, key| value.get(key))
}

/// Every leaf path of the values (lists count as leaves).
fn leaves(value: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        serde_yaml::Value::Mapping(map) if !map.is_empty() => {
            for (key, child) in map {
                let key = key.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(child, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

fn values_table(values_text: &str) -> String {
    let values: serde_yaml::Value = serde_yaml::from_str(values_text).expect("values.yaml is YAML");
    let mut table = String::from("| Key | Default | Description |\n| --- | --- | --- |\n");
    for value in documented_values(values_text) {
        let default = lookup(&values, &value.path).unwrap_or_else(|| panic!("{} is documented but not in values.yaml", value.path));
        let default = serde_json::to_string(&serde_json::to_value(default).expect("JSON-compatible")).expect("JSON");
        table.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            value.path,
            default.replace('|', "\\|"),
            value.description.replace('|', "\\|")
        ));
    }
    table
}

#[test]
fn every_value_is_documented() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let text = std::fs::read_to_string(chart.join("values.yaml")).expect("values.yaml");
    let values: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let documented: Vec<String> = documented_values(&text).into_iter().map(|value| value.path).collect();
    let mut all = Vec::new();
    leaves(&values, "", &mut all);
    let undocumented: Vec<&String> = all
        .iter()
        .filter(|leaf| !documented.iter().any(|path| *leaf == path || leaf.starts_with(&format!("{path}."))))
        .collect();
    assert!(
        undocumented.is_empty(),
        "values without a `# --` comment (on themselves or a parent): {undocumented:?}"
    );
}

#[test]
fn chart_readme_values_table_matches_values_yaml() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let values = std::fs::read_to_string(chart.join("values.yaml")).expect("values.yaml");
    let readme_path = chart.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("the chart README");
    let (before, rest) = readme
        .split_once(BEGIN)
        .unwrap_or_else(|| panic!("the chart README has no line {BEGIN}"));
    let (current, after) = rest.split_once(END).unwrap_or_else(|| panic!("the chart README has no line {END}"));
    let generated = format!("\n{}", values_table(&values));
    if current == generated {
        return;
    }
    if std::env::var_os("TLO_WRITE_CHART_DOCS").is_some() {
        std::fs::write(&readme_path, format!("{before}{BEGIN}{generated}{END}{after}")).expect("write the chart README");
        return;
    }
    panic!("the values table in charts/tasklist-operator/README.md is stale: run `make chart-docs`");
}

#[test]
fn artifact_hub_annotations_match_the_chart() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).expect("Chart.yaml")).expect("YAML");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml")).expect("values.yaml")).expect("YAML");
    let annotation = |key: &str| -> serde_yaml::Value {
        let text = meta["annotations"][key]
            .as_str()
            .unwrap_or_else(|| panic!("Chart.yaml has no annotation {key}"));
        serde_yaml::from_str(text).unwrap_or_else(|error| panic!("{key} is not YAML: {error}"))
    };
    let image = format!(
        "{}:{}",
        values["image"]["repository"].as_str().expect("image.repository"),
        meta["appVersion"].as_str().expect("appVersion")
    );
    assert_eq!(annotation("artifacthub.io/images")[0]["image"].as_str(), Some(image.as_str()));
    assert_eq!(
        annotation("artifacthub.io/crds")[0]["name"].as_str(),
        Some("tasklistconnections.tasklist.camunda.community")
    );
    let examples = annotation("artifacthub.io/crdsExamples");
    let examples = examples.as_sequence().expect("a list of examples");
    assert!(!examples.is_empty());
    for example in examples {
        let connection: tasklist_operator::crd::TasklistConnection =
            serde_yaml::from_value(example.clone()).expect("each CRD example is a valid TasklistConnection");
        assert!(connection.spec.url.starts_with("http"));
    }
    for change in annotation("artifacthub.io/changes").as_sequence().expect("a list of changes") {
        let kind = change["kind"].as_str().expect("a kind");
        assert!(
            ["added", "changed", "deprecated", "removed", "fixed", "security"].contains(&kind),
            "{kind}"
        );
    }
}
