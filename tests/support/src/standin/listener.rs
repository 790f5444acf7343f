//! Accepting connections (plain or TLS) for the stand-in, with a switch that closes the
//! listener so that clients see "connection refused", as when Tasklist is not running.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;

/// How long reopening waits for the port to become free again.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct TlsMaterial {
    /// The CA clients must trust.
    pub ca_pem: String,
    pub acceptor: TlsAcceptor,
    /// A client certificate the CA signed, and its key (PEM, certificate first).
    pub client_identity_pem: String,
}

/// A CA generated on the spot and a server certificate it signed for `127.0.0.1` and
/// `localhost`, so tests exercise CA trust rather than skipping verification. With
/// `require_client_certificate`, the handshake fails without a client certificate the CA
/// signed (mutual TLS).
pub(super) fn generate_tls(require_client_certificate: bool) -> anyhow::Result<TlsMaterial> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stand-in Tasklist test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = rcgen::KeyPair::generate()?;
    let mut server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    server_params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let server_cert = server_params.signed_by(&server_key, &ca)?;

    let client_key = rcgen::KeyPair::generate()?;
    let mut client_params = rcgen::CertificateParams::default();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tasklist-operator");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &ca)?;
    let client_identity_pem = format!("{}{}", client_cert.pem(), client_key.serialize_pem());

    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if require_client_certificate {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).context("trusting the test CA for clients")?;
        let verifier = tokio_rustls::rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("a client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .context("configuring TLS")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
        client_identity_pem,
    })
}

/// Serves the router on a fixed port until dropped.
pub(super) struct Listener {
    port: u16,
    tls: Option<TlsAcceptor>,
    router: Router,
    /// The accept loop; `None` while refusing connections. Aborting it drops the socket and
    /// every connection it accepted.
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Listener {
    pub fn start(tcp: TcpListener, tls: Option<TlsAcceptor>, router: Router) -> Self {
        let port = tcp.local_addr().expect("a bound listener has an address").port();
        let accept_task = tokio::spawn(accept_loop(tcp, tls.clone(), router.clone()));
        Self {
            port,
            tls,
            router,
            accept_task: Mutex::new(Some(accept_task)),
        }
    }

    pub async fn set_refusing(&self, refusing: bool) -> anyhow::Result<()> {
        let mut accept_task = self.accept_task.lock().await;
        match (refusing, accept_task.take()) {
            (true, Some(running)) => {
                running.abort();
                // Wait until the socket is closed, so the next connect is refused.
                let _ = running.await;
            }
            (true, None) => {}
            (false, Some(running)) => *accept_task = Some(running),
            (false, None) => {
                let tcp = self.rebind().await?;
                *accept_task = Some(tokio::spawn(accept_loop(tcp, self.tls.clone(), self.router.clone())));
            }
        }
        Ok(())
    }

    async fn rebind(&self) -> anyhow::Result<TcpListener> {
        let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
        loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(tcp) => return Ok(tcp),
                // Another process may have grabbed the port meanwhile; it is rare and
                // usually brief.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("listening again on 127.0.0.1:{}", self.port));
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(accept_task) = self.accept_task.get_mut().take() {
            accept_task.abort();
        }
    }
}

async fn accept_loop(tcp: TcpListener, tls: Option<TlsAcceptor>, router: Router) {
    // Owning the connections here means aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, tls.clone(), router.clone()));
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, tls: Option<TlsAcceptor>, router: Router) {
    let service = TowerToHyperService::new(router);
    let http = auto::Builder::new(TokioExecutor::new());
    // Errors are the client's business (reset, bad TLS handshake): the test sees them there.
    let _ = match tls {
        None => http.serve_connection(TokioIo::new(stream), service).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
            Err(_) => return,
        },
    };
}
