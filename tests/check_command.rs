//! `tasklist-operator check` against a stand-in Tasklist: what it prints and its exit codes.

use std::path::PathBuf;
use std::process::Command;

use testsupport::standin::{EndpointMode, StandinTasklist};

struct Files {
    _dir: tempfile::TempDir,
    connection: PathBuf,
    credentials: PathBuf,
}

fn write_files(connection: &str, credentials: &str) -> Files {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (connection_path, credentials_path) = (dir.path().join("connection.yaml"), dir.path().join("secret.yaml"));
    std::fs::write(&connection_path, connection).expect("write the connection");
    std::fs::write(&credentials_path, credentials).expect("write the Secret");
    Files {
        _dir: dir,
        connection: connection_path,
        credentials: credentials_path,
    }
}

fn oauth2_connection(standin: &StandinTasklist) -> String {
    format!(
        "apiVersion: tasklist.camunda.community/v1alpha1\nkind: TasklistConnection\nmetadata: {{name: orders}}\nspec:\n  url: {}\n  auth:\n    oauth2:\n      tokenUrl: {}\n      clientSecretRef: {{name: client}}\n",
        standin.url(),
        standin.token_url()
    )
}

fn client_secret(secret: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: client}}\nstringData:\n  client_id: orders\n  client_secret: {secret}\n")
}

/// Runs the check in a blocking thread (the stand-in needs the runtime to keep serving).
async fn check(args: Vec<String>, env: Vec<(&'static str, String)>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_tasklist-operator"))
            .arg("check")
            .args(testsupport::operator::LOCAL_TEST_POLICY)
            .args(&args)
            .args(["--request-timeout", "2s"])
            .env_remove("TASKLIST_CLIENT_ID")
            .env_remove("TASKLIST_CLIENT_SECRET")
            .envs(env)
            .output()
            .expect("run tasklist-operator check");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code().unwrap_or(-1), text)
    })
    .await
    .expect("the check ran")
}

fn args(files: &Files, with_credentials: bool) -> Vec<String> {
    let mut args = vec!["-f".to_string(), files.connection.display().to_string()];
    if with_credentials {
        args.extend(["--credentials".to_string(), files.credentials.display().to_string()]);
    }
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_credentials_exit_0_and_print_no_secret() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.add_client("orders", "check-secret-123");
    let files = write_files(&oauth2_connection(&standin), &client_secret("check-secret-123"));
    let (code, output) = check(args(&files, true), vec![]).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("Tasklist accepts the credential"), "{output}");
    assert!(output.contains("an access token, valid until"), "{output}");
    assert!(!output.contains("check-secret-123"), "the client secret was printed:\n{output}");
    assert!(!output.contains("eyJ"), "a token was printed:\n{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_environment_work_too() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.add_client("orders", "env-secret-456");
    let files = write_files(&oauth2_connection(&standin), "");
    let env = vec![
        ("TASKLIST_CLIENT_ID", "orders".to_string()),
        ("TASKLIST_CLIENT_SECRET", "env-secret-456".to_string()),
    ];
    let (code, output) = check(args(&files, false), env).await;
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("env-secret-456"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_has_its_exit_code_and_reason() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.add_client("orders", "right-secret");

    let missing = write_files(&oauth2_connection(&standin), "");
    let (code, output) = check(args(&missing, false), vec![]).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("SecretNotFound"), "{output}");

    let rejected = write_files(&oauth2_connection(&standin), &client_secret("wrong-secret"));
    let (code, output) = check(args(&rejected, true), vec![]).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("CredentialsRejected") && output.contains("invalid_client"),
        "{output}"
    );
    assert!(!output.contains("wrong-secret"), "{output}");

    standin.set_token_endpoint(EndpointMode::Down);
    let down = write_files(&oauth2_connection(&standin), &client_secret("right-secret"));
    let (code, output) = check(args(&down, true), vec![]).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("AuthServerError") && output.contains("503"), "{output}");
    standin.set_token_endpoint(EndpointMode::Normal);

    standin.set_api(EndpointMode::Reject);
    let (code, output) = check(args(&down, true), vec![]).await;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("401"), "{output}");
    standin.set_api(EndpointMode::Normal);

    let unusable = write_files("kind: ConfigMap\n", "");
    let (code, output) = check(args(&unusable, false), vec![]).await;
    assert_eq!(code, 3, "{output}");
    assert!(output.contains("no TasklistConnection"), "{output}");
}

/// `check` applies the operator's host policy, with the same defaults: a stand-in on
/// loopback over http is refused without a request.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_policy_refuses_before_anything_is_sent() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.add_client("orders", "policy-secret-1");
    let files = write_files(&oauth2_connection(&standin), &client_secret("policy-secret-1"));
    for (flags, says) in [
        (vec!["--allow-loopback=false"], "--allow-loopback"),
        (vec!["--allow-http=false"], "http://"),
        (vec!["--allowed-hosts=tasklist.example.com"], "allowed hosts"),
    ] {
        let mut arguments = args(&files, true);
        arguments.extend(flags.iter().map(|flag| flag.to_string()));
        let (code, output) = check(arguments, vec![]).await;
        assert_eq!(code, 1, "{flags:?}: {output}");
        assert!(output.contains("NotAllowed") && output.contains(says), "{flags:?}: {output}");
    }
    assert_eq!(standin.token_requests_arrived(), 0, "a refused check sent a token request");
    assert!(standin.api_requests().is_empty(), "a refused check probed Tasklist");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_connection_logs_in_and_probes() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.add_user("demo", "cookie-pass-789");
    let connection = format!(
        "apiVersion: tasklist.camunda.community/v1alpha1\nkind: TasklistConnection\nmetadata: {{name: orders}}\nspec:\n  url: {}\n  auth:\n    cookie:\n      credentialsSecretRef: {{name: login}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: login}}\nstringData: {{username: demo, password: cookie-pass-789}}\n",
        standin.url()
    );
    let files = write_files(&connection, "");
    let (code, output) = check(args(&files, false), vec![]).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("a session (cookies TASKLIST-SESSION, X-CSRF-TOKEN; with a CSRF token)"),
        "{output}"
    );
    assert!(!output.contains("cookie-pass-789"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_wide_ca_bundle_makes_tls_work_and_a_bad_one_is_refused() {
    let standin = StandinTasklist::start_with(testsupport::standin::StandinOptions {
        tls: true,
        ..Default::default()
    })
    .await
    .expect("stand-in");
    standin.add_client("orders", "check-secret-456");
    let files = write_files(&oauth2_connection(&standin), &client_secret("check-secret-456"));
    let bundle = files.connection.with_file_name("proxy-ca.pem");

    // Without the bundle, the stand-in's certificate is not trusted: no credential.
    let (code, output) = check(args(&files, true), vec![]).await;
    assert_eq!(code, 1, "{output}");

    std::fs::write(&bundle, standin.ca_pem().expect("a TLS stand-in has a CA")).expect("write the bundle");
    let mut with_bundle = args(&files, true);
    with_bundle.extend(["--ca-bundle".to_string(), bundle.display().to_string()]);
    let (code, output) = check(with_bundle.clone(), vec![]).await;
    assert_eq!(code, 0, "{output}");

    std::fs::write(&bundle, "not a certificate").expect("write a broken bundle");
    let (code, output) = check(with_bundle, vec![]).await;
    assert_eq!(code, 3, "{output}");
    assert!(
        output.contains("the operator's CA bundle (--ca-bundle) holds no certificate"),
        "{output}"
    );
}

/// Indents every line of `text` by `spaces`, for a block scalar in YAML.
fn indented(text: &str, spaces: usize) -> String {
    text.lines().map(|line| format!("{}{line}\n", " ".repeat(spaces))).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn private_key_jwt_with_an_issuer_is_checked_and_prints_no_key() {
    use testsupport::keys::{EC_KEY_PEM, public_jwks};
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin
        .add_assertion_client("orders", &public_jwks(EC_KEY_PEM, Some("k1")).expect("a JWKS"))
        .expect("the stand-in takes the JWKS");
    let connection = format!(
        "apiVersion: tasklist.camunda.community/v1alpha1\nkind: TasklistConnection\nmetadata: {{name: orders}}\nspec:\n  url: {}\n  auth:\n    oauth2:\n      issuerUrl: {}\n      clientAuthentication: PrivateKeyJwt\n      clientSecretRef: {{name: client}}\n      clientAssertionKeyRef: {{name: client, key: key.pem, keyId: k1}}\n",
        standin.url(),
        standin.issuer()
    );
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: client}}\nstringData:\n  client_id: orders\n  key.pem: |\n{}",
        indented(EC_KEY_PEM, 4)
    );
    let files = write_files(&connection, &secret);
    let (code, output) = check(args(&files, true), vec![]).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("discovery: GET {}/.well-known/openid-configuration", standin.issuer())),
        "{output}"
    );
    assert!(output.contains(&format!("token endpoint {}", standin.token_url())), "{output}");
    assert!(output.contains(r#"client assertion signed ES256, key id "k1""#), "{output}");
    for line in EC_KEY_PEM.lines().filter(|line| !line.starts_with("-----")) {
        assert!(!output.contains(line), "the private key was printed:\n{output}");
    }
    assert!(!output.contains("eyJ"), "a token or assertion was printed:\n{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_is_checked_against_tasklist() {
    let standin = StandinTasklist::start().await.expect("stand-in");
    standin.accept_basic("demo", "basic-pass-123");
    let connection = format!(
        "apiVersion: tasklist.camunda.community/v1alpha1\nkind: TasklistConnection\nmetadata: {{name: orders}}\nspec:\n  url: {}\n  auth:\n    basic:\n      credentialsSecretRef: {{name: login}}\n",
        standin.url()
    );
    let login = |password: &str| {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: login}}\nstringData:\n  username: demo\n  password: {password}\n")
    };
    let files = write_files(&connection, &login("basic-pass-123"));
    let (code, output) = check(args(&files, true), vec![]).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("an Authorization header, which does not expire"), "{output}");
    assert!(!output.contains("basic-pass-123") && !output.contains("Basic ZGVt"), "{output}");

    let files = write_files(&connection, &login("wrong-pass"));
    let (code, output) = check(args(&files, true), vec![]).await;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("401 Unauthorized"), "{output}");
}

/// A token endpoint and Tasklist that require a client certificate: `check` reads it from
/// the kubernetes.io/tls Secret the connection names, and never prints the key.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_from_a_tls_secret_is_presented() {
    let standin = StandinTasklist::start_with(testsupport::standin::StandinOptions {
        tls: true,
        require_client_certificate: true,
        ..Default::default()
    })
    .await
    .expect("stand-in");
    standin.add_client("orders", "check-secret-789");
    let (certificate, key) = standin.client_identity_pem().expect("a client certificate");
    let ca = standin.ca_pem().expect("a CA");
    let connection = |with_certificate: bool| {
        let client_certificate = if with_certificate {
            "\n    clientCertificateSecretRef: {name: client-tls}"
        } else {
            ""
        };
        format!(
            "{}  tls:\n    caSecretRef: {{name: tasklist-ca}}{client_certificate}\n",
            oauth2_connection(&standin)
        )
    };
    let secrets = format!(
        "{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: tasklist-ca}}\nstringData:\n  ca.crt: |\n{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: client-tls}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        client_secret("check-secret-789"),
        indented(&ca, 4),
        indented(&certificate, 4),
        indented(&key, 4)
    );

    let without = write_files(&connection(false), &secrets);
    let (code, output) = check(args(&without, true), vec![]).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("AuthServerError") && testsupport::standin::refused_for_want_of_a_client_certificate(&output),
        "{output}"
    );

    let with = write_files(&connection(true), &secrets);
    let (code, output) = check(args(&with, true), vec![]).await;
    assert_eq!(code, 0, "{output}");
    let key_line = key.lines().nth(1).expect("a key body");
    assert!(!output.contains(key_line), "{output}");
}
