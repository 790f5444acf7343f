//! A private container registry for the node tests, as a user's would be: the CNCF
//! Distribution server (Debian's `docker-registry`) serving HTTPS with a certificate from a
//! CA made here, and asking for a user and password (htpasswd, bcrypt) on every request.
//! The image and the chart are pushed to it, and the kubelet pulls the image from it
//! through containerd with a pull secret.
//!
//! It listens on an address the caller picks: in the node tests, the node IP inside the
//! test's own network namespace (see [`crate::node`]).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rand::Rng as _;
use tempfile::TempDir;

use crate::tools;

const REGISTRY_LOG: &str = "registry.log";
/// The user the tests push and pull as.
pub const REGISTRY_USER: &str = "tlo-pusher";
/// How long the registry may take to answer (measured: well under a second).
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Paths of the programs that build, push and serve images, from the `TLO_*` variables
/// `hack/tools.sh` prints.
#[derive(Debug, Clone)]
pub struct ShippingTools {
    pub buildah: PathBuf,
    pub skopeo: PathBuf,
    /// Debian's `docker-registry`: the CNCF Distribution registry.
    pub registry: PathBuf,
    pub htpasswd: PathBuf,
    pub cargo_cyclonedx: PathBuf,
}

impl ShippingTools {
    /// Reads the variables; the error names every missing one at once.
    pub fn from_env() -> anyhow::Result<ShippingTools> {
        let mut problems = Vec::new();
        let mut path_of = |var: &str| -> PathBuf {
            let path = PathBuf::from(std::env::var_os(var).unwrap_or_default());
            if !tools::is_executable_file(&path) {
                problems.push(format!("{var}={} is not an executable file", path.display()));
            }
            path
        };
        let found = ShippingTools {
            buildah: path_of("TLO_BUILDAH"),
            skopeo: path_of("TLO_SKOPEO"),
            registry: path_of("TLO_REGISTRY"),
            htpasswd: path_of("TLO_HTPASSWD"),
            cargo_cyclonedx: path_of("TLO_CARGO_CYCLONEDX"),
        };
        if !problems.is_empty() {
            bail!(
                "the node tests cannot find the programs that build and serve images:\n  {}\n\
                 To fix: run `make test`, or `eval \"$(hack/tools.sh)\"` (as root: it installs buildah, skopeo, \
                 docker-registry and apache2-utils with apt-get, and builds cargo-cyclonedx).",
                problems.join("\n  ")
            );
        }
        Ok(found)
    }
}

/// A running registry. Stopped, and its storage removed, on drop.
pub struct Registry {
    /// `host:port`, as image references and pull secrets name it.
    pub address: String,
    pub user: String,
    pub password: String,
    /// The CA that signed the registry's certificate (PEM).
    pub ca_file: PathBuf,
    /// A folder holding only `ca.crt`, for `buildah --cert-dir` and `skopeo --cert-dir`.
    pub certs_dir: PathBuf,
    child: Child,
    workdir: TempDir,
}

impl Registry {
    pub async fn start(tools: &ShippingTools, listen: SocketAddrV4) -> anyhow::Result<Registry> {
        let workdir = tools::fixture_workdir("registry")?;
        let dir = workdir.path();
        let (ca_pem, cert_pem, key_pem) = server_certificate(*listen.ip())?;
        let certs_dir = dir.join("certs");
        std::fs::create_dir_all(&certs_dir)?;
        let ca_file = certs_dir.join("ca.crt");
        std::fs::write(&ca_file, &ca_pem)?;
        std::fs::write(dir.join("server.crt"), cert_pem)?;
        std::fs::write(dir.join("server.key"), key_pem)?;

        let password = random_password();
        let htpasswd = Command::new(&tools.htpasswd)
            .args(["-B", "-b", "-n", REGISTRY_USER, &password])
            .output()
            .with_context(|| format!("cannot run {}", tools.htpasswd.display()))?;
        ensure!(
            htpasswd.status.success(),
            "htpasswd failed: {}",
            String::from_utf8_lossy(&htpasswd.stderr)
        );
        std::fs::write(dir.join("htpasswd"), &htpasswd.stdout)?;
        let config = dir.join("config.yml");
        std::fs::write(&config, registry_config(dir, listen))?;

        let (stdout, stderr) = tools::log_file_stdio(&dir.join(REGISTRY_LOG))?;
        let mut command = Command::new(&tools.registry);
        command.arg("serve").arg(&config).stdout(stdout).stderr(stderr);
        let child = tools::spawn_supervised(command, false).with_context(|| format!("cannot run {}", tools.registry.display()))?;
        let mut registry = Registry {
            address: listen.to_string(),
            user: REGISTRY_USER.to_owned(),
            password,
            ca_file,
            certs_dir,
            child,
            workdir,
        };
        registry
            .wait_until_ready(&ca_pem)
            .await
            .map_err(|error| anyhow::anyhow!("{error:#}\n==> {REGISTRY_LOG} <==\n{}", registry.logs_tail(20)))?;
        Ok(registry)
    }

    /// Ready when `/v2/` answers 401 without credentials over TLS checked against the CA:
    /// the registry is up, with its certificate and its authentication.
    async fn wait_until_ready(&mut self, ca_pem: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("https://{}/v2/", self.address);
        let answers_unauthorized = async || {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status() == reqwest::StatusCode::UNAUTHORIZED)
        };
        tools::wait_until_ready(&mut self.child, "the registry", READY_DEADLINE, answers_unauthorized).await
    }

    pub fn logs_tail(&self, lines: usize) -> String {
        tools::tail_of_file(&self.workdir.path().join(REGISTRY_LOG), lines)
    }

    /// Fails, naming it, if the registry has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the registry exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        tools::kill_and_reap(&mut self.child);
    }
}

/// The Distribution configuration: filesystem storage in `dir`, HTTPS, htpasswd.
fn registry_config(dir: &Path, listen: SocketAddrV4) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {listen}
  # One registry, no load balancer: a fixed secret only silences the warning.
  secret: tasklist-operator-node-tests
  tls:
    certificate: {certificate}
    key: {key}
auth:
  htpasswd:
    realm: tasklist-operator-node-tests
    path: {htpasswd}
"#,
        storage = path("storage"),
        certificate = path("server.crt"),
        key = path("server.key"),
        htpasswd = path("htpasswd"),
    )
}

/// A CA made on the spot, and a server certificate it signed for `ip`: (CA, certificate, key), PEM.
fn server_certificate(ip: std::net::Ipv4Addr) -> anyhow::Result<(String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tasklist-operator node tests registry CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = rcgen::KeyPair::generate()?;
    let mut server_params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
    server_params.distinguished_name.push(rcgen::DnType::CommonName, ip.to_string());
    server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &ca)?;
    Ok((ca_cert.pem(), server_cert.pem(), server_key.serialize_pem()))
}

/// 32 letters and digits: never a prefix of anything else the tests log.
fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_serves_tls_with_htpasswd_from_the_folder() {
        let config = registry_config(Path::new("/x"), "198.18.0.1:5000".parse().unwrap());
        let parsed: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(parsed["http"]["addr"].as_str(), Some("198.18.0.1:5000"));
        assert_eq!(parsed["http"]["tls"]["certificate"].as_str(), Some("/x/server.crt"));
        assert_eq!(parsed["auth"]["htpasswd"]["path"].as_str(), Some("/x/htpasswd"));
        assert_eq!(parsed["storage"]["filesystem"]["rootdirectory"].as_str(), Some("/x/storage"));
    }
}
