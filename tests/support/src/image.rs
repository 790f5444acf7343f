//! The node's own small images, built offline: a root filesystem folder becomes a one-layer
//! image in `docker save` format, which `ctr images import` reads. The pause image (which
//! containerd never pulls) and the consumer are made this way; the operator's image is
//! built from the Dockerfile by buildah and pulled from a registry (`hack/image.sh`,
//! `testsupport::registry`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
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

    #[test]
    fn the_same_folder_gives_the_same_image() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::write(rootfs.path().join("program"), b"#!/bin/sh\n").unwrap();
        let config = ImageConfig {
            entrypoint: vec!["/program".into()],
            user: Some("65532:65532".into()),
            ..ImageConfig::default()
        };
        let out = tempfile::tempdir().unwrap();
        let first = write_docker_archive(rootfs.path(), &config, "x.test/a:1", &out.path().join("1.tar")).unwrap();
        let second = write_docker_archive(rootfs.path(), &config, "x.test/a:1", &out.path().join("2.tar")).unwrap();
        assert_eq!(std::fs::read(first.path).unwrap(), std::fs::read(second.path).unwrap());
        assert!(first.layer_bytes > 0);
    }
}
