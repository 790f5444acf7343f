//! Container images built offline, for the node tests: a root filesystem folder becomes a
//! one-layer image in `docker save` format, which `ctr images import` reads.
//!
//! The operator's image takes its root filesystem from `hack/image-rootfs.sh` and its
//! runtime settings (USER, ENTRYPOINT, CMD, EXPOSE, LABEL) from the `Dockerfile`'s runtime
//! stage, so the image the tests run and the one users build share one recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The PATH BuildKit gives an image whose Dockerfile sets none.
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime settings of an image (the `config` part of its configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// As in the image configuration: `8080/tcp`.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// What the `Dockerfile`'s last stage says, and how it gets its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStage {
    /// The stage's base, `scratch` for an image made only of copied files.
    pub base: String,
    /// The instructions that add files, verbatim (`COPY --from=builder /rootfs/ /`).
    pub copies: Vec<String>,
    pub config: ImageConfig,
}

/// Reads the last stage of a Dockerfile: its base, its COPY/ADD lines and its runtime
/// settings. Understands line continuations, comments, and the JSON (exec) form of
/// ENTRYPOINT and CMD, which is the only form the project's Dockerfile uses.
pub fn parse_runtime_stage(dockerfile: &str) -> anyhow::Result<RuntimeStage> {
    let instructions = logical_lines(dockerfile);
    let start = instructions
        .iter()
        .rposition(|line| keyword(line) == "FROM")
        .context("the Dockerfile has no FROM")?;
    let base = instructions[start]
        .split_whitespace()
        .nth(1)
        .context("FROM without an image")?
        .to_owned();
    let mut stage = RuntimeStage {
        base,
        copies: Vec::new(),
        config: ImageConfig::default(),
    };
    for line in &instructions[start + 1..] {
        let argument = line[keyword(line).len()..].trim();
        match keyword(line).as_str() {
            "COPY" | "ADD" => stage.copies.push(line.clone()),
            "USER" => stage.config.user = Some(argument.to_owned()),
            "ENTRYPOINT" => stage.config.entrypoint = exec_form(argument).context("ENTRYPOINT")?,
            "CMD" => stage.config.cmd = exec_form(argument).context("CMD")?,
            "EXPOSE" => {
                for port in argument.split_whitespace() {
                    let port = if port.contains('/') {
                        port.to_owned()
                    } else {
                        format!("{port}/tcp")
                    };
                    stage.config.exposed_ports.push(port);
                }
            }
            "LABEL" => stage.config.labels.extend(parse_labels(argument)?),
            "RUN" | "ENV" | "WORKDIR" | "VOLUME" | "ARG" | "SHELL" | "STOPSIGNAL" | "HEALTHCHECK" | "ONBUILD" => {
                bail!("the runtime stage has `{line}`, which the offline image build does not reproduce")
            }
            other => bail!("unknown Dockerfile instruction {other}"),
        }
    }
    Ok(stage)
}

/// The Dockerfile's instructions, one per entry, continuations joined and comments dropped.
fn logical_lines(dockerfile: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued.trim_end());
            current.push(' ');
        } else {
            current.push_str(trimmed);
            if !current.trim().is_empty() {
                lines.push(current.trim().to_owned());
            }
            current.clear();
        }
    }
    lines
}

fn keyword(line: &str) -> String {
    line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase()
}

fn exec_form(argument: &str) -> anyhow::Result<Vec<String>> {
    serde_json::from_str(argument).with_context(|| format!("expected the JSON form [\"...\"], got {argument}"))
}

/// `key="value" key2="value 2"`: the quoted form of LABEL.
fn parse_labels(argument: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = argument.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .with_context(|| format!("LABEL not in key=\"value\" form: {rest}"))?;
        let end = after.find('"').with_context(|| format!("unterminated LABEL value: {after}"))?;
        labels.push((key.trim().to_owned(), after[..end].to_owned()));
        rest = after[end + 1..].trim();
    }
    Ok(labels)
}

/// Builds the operator's root filesystem with `hack/image-rootfs.sh` into `rootfs` (which must
/// not exist yet).
pub fn operator_rootfs(repository: &Path, binary: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let script = repository.join("hack/image-rootfs.sh");
    let output = Command::new(&script)
        .arg(binary)
        .arg(rootfs)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed ({}): {}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Compiles a C program with `gcc -static -Os` into `output`.
pub fn static_c_program(source: &Path, output: &Path) -> anyhow::Result<()> {
    let result = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(output)
        .arg(source)
        .output()
        .context("cannot run gcc (apt-get install gcc libc6-dev)")?;
    ensure!(
        result.status.success(),
        "gcc -static {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(())
}

/// A built image tarball.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    pub path: PathBuf,
    /// The reference it is tagged with, e.g. `tasklist-operator.test/operator:node`.
    pub reference: String,
    /// Size of the uncompressed layer in bytes (what the image holds).
    pub layer_bytes: u64,
}

/// Writes `rootfs` as a one-layer image in `docker save` format to `output`: a tar holding
/// `manifest.json`, the configuration and the layer. Files are owned by root and have a
/// fixed time, so the same folder always gives the same image.
pub fn write_docker_archive(rootfs: &Path, config: &ImageConfig, reference: &str, output: &Path) -> anyhow::Result<ImageArchive> {
    let staging = tempfile::tempdir().context("cannot create a folder to assemble the image in")?;
    let layer = staging.path().join("layer.tar");
    run_tar(
        Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(&layer)
            .arg("--directory")
            .arg(rootfs)
            .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name", "--mtime=@0", "."]),
    )?;
    let layer_bytes = std::fs::read(&layer).context("cannot read the layer just written")?;
    let diff_id = format!("sha256:{}", hex_digest(&layer_bytes));

    let mut exposed = serde_json::Map::new();
    for port in &config.exposed_ports {
        exposed.insert(port.clone(), json!({}));
    }
    let mut runtime = json!({
        "Env": [DEFAULT_PATH_ENV],
        "Entrypoint": config.entrypoint,
        "Cmd": config.cmd,
        "ExposedPorts": exposed,
        "Labels": config.labels,
    });
    if let Some(user) = &config.user {
        runtime["User"] = json!(user);
    }
    let image_config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": runtime,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "tasklist-testsupport image::write_docker_archive" }],
    });
    let config_bytes = serde_json::to_vec(&image_config)?;
    let config_name = format!("{}.json", hex_digest(&config_bytes));
    std::fs::write(staging.path().join(&config_name), &config_bytes)?;
    let manifest = json!([{ "Config": config_name, "RepoTags": [reference], "Layers": ["layer.tar"] }]);
    std::fs::write(staging.path().join("manifest.json"), serde_json::to_vec(&manifest)?)?;

    run_tar(
        Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(output)
            .arg("--directory")
            .arg(staging.path())
            .args(["--numeric-owner", "--owner=0", "--group=0", "manifest.json", "layer.tar"])
            .arg(&config_name),
    )?;
    Ok(ImageArchive {
        path: output.to_owned(),
        reference: reference.to_owned(),
        layer_bytes: layer_bytes.len() as u64,
    })
}

fn run_tar(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().context("cannot run tar")?;
    ensure!(output.status.success(), "tar failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
FROM rust:1-bookworm AS builder
RUN cargo build \
    --release
USER root

# ---- runtime
FROM scratch
LABEL org.opencontainers.image.title="tasklist-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tasklist-operator"]
CMD ["run"]
"#;

    #[test]
    fn the_last_stage_is_read() {
        let stage = parse_runtime_stage(DOCKERFILE).unwrap();
        assert_eq!(stage.base, "scratch");
        assert_eq!(stage.copies, ["COPY --from=builder /rootfs/ /"]);
        assert_eq!(stage.config.user.as_deref(), Some("65532:65532"));
        assert_eq!(stage.config.entrypoint, ["/usr/local/bin/tasklist-operator"]);
        assert_eq!(stage.config.cmd, ["run"]);
        assert_eq!(stage.config.exposed_ports, ["8080/tcp"]);
        assert_eq!(stage.config.labels["org.opencontainers.image.licenses"], "Apache-2.0");
        assert_eq!(stage.config.labels.len(), 2);
    }

    #[test]
    fn a_runtime_stage_the_offline_build_cannot_reproduce_is_refused() {
        let with_run = format!("{DOCKERFILE}RUN echo hi\n");
        let error = parse_runtime_stage(&with_run).unwrap_err().to_string();
        assert!(error.contains("RUN echo hi"), "{error}");
        let shell_form = DOCKERFILE.replace(r#"CMD ["run"]"#, "CMD run");
        assert!(parse_runtime_stage(&shell_form).is_err());
    }

    #[test]
    fn the_project_dockerfile_builds_from_scratch_with_the_shared_recipe() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile");
        let text = std::fs::read_to_string(&path).unwrap();
        let stage = parse_runtime_stage(&text).unwrap();
        assert_eq!(stage.base, "scratch");
        assert_eq!(stage.copies, ["COPY --from=builder /rootfs/ /"]);
        assert!(
            logical_lines(&text)
                .iter()
                .any(|line| line == "RUN hack/image-rootfs.sh /out/tasklist-operator /rootfs"),
            "the builder stage must make /rootfs with hack/image-rootfs.sh"
        );
        assert_eq!(stage.config.user.as_deref(), Some("65532:65532"));
    }
}
