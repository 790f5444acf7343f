//! Wiring tests: one reconcile against a scripted Kubernetes API (in the style of
//! controller-rs's `fixtures.rs`) and a stand-in Tasklist. They pin the exact requests, in
//! order, that the decisions of `decide.rs` lead to, in milliseconds and without a control
//! plane. The Secret watches' caches are fed by the test, as the watches would: what a
//! reconcile reads from them is a request it does not send.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::{Value, json};
use testsupport::standin::StandinTasklist;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::reconcile::reconcile;
use super::secret_index::SecretIndex;
use super::{Context, Error, FIELD_MANAGER, SecretCaches, Settings};
use crate::camunda::HttpSettings;
use crate::crd::{TasklistConnection, TasklistConnectionStatus};
use crate::metrics::Metrics;

const NAMESPACE: &str = "team-a";
const CLIENT_SECRET: &str = "wiring-secret-1";

type Exchange = (Request<Body>, oneshot::Sender<Response<Body>>);

/// The API server's side: every request the operator sends, with a way to answer it.
struct ApiServer {
    requests: mpsc::UnboundedReceiver<Exchange>,
    /// Requests received while another was expected: Events are sent by a task of their
    /// own, so an Event and the reconcile's next request may come in either order.
    parked: Vec<Exchange>,
}

/// Whether the order of `a` and `b` may differ from the reconcile's: one of them is an Event.
fn either_order(a: (&Method, &str), b: (&Method, &str)) -> bool {
    let event = |(method, path): (&Method, &str)| *method == Method::POST && path == EVENTS;
    event(a) || event(b)
}

impl ApiServer {
    /// Every request received was expected.
    fn nothing_parked(&self) {
        let parked: Vec<String> = self
            .parked
            .iter()
            .map(|(request, _)| format!("{} {}", request.method(), request.uri()))
            .collect();
        assert!(parked.is_empty(), "unexpected requests {parked:?}");
    }

    /// Waits for the next request, checks its method and path (the query is ignored unless
    /// `path` has one), and returns it with the body as JSON (Null when empty). An Event
    /// may come before or after the request expected with it.
    async fn expect(&mut self, method: Method, path: &str) -> (Value, oneshot::Sender<Response<Body>>, String) {
        let matches = |request: &Request<Body>| {
            let uri = request.uri();
            let seen = if path.contains('?') {
                uri.path_and_query().map(ToString::to_string).unwrap_or_default()
            } else {
                uri.path().to_owned()
            };
            *request.method() == method && seen == path
        };
        let (request, reply) = match self.parked.iter().position(|(request, _)| matches(request)) {
            Some(index) => self.parked.remove(index),
            None => loop {
                let (request, reply) = tokio::time::timeout(std::time::Duration::from_secs(10), self.requests.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no request within 10 s; expected {method} {path}"))
                    .unwrap_or_else(|| panic!("the client went away; expected {method} {path}"));
                if matches(&request) {
                    break (request, reply);
                }
                let uri = request.uri().clone();
                assert!(
                    either_order((request.method(), uri.path()), (&method, path)),
                    "unexpected request {} {uri}; expected {method} {path}",
                    request.method()
                );
                self.parked.push((request, reply));
            },
        };
        let uri = request.uri().clone();
        let bytes = request.into_body().collect_bytes().await.expect("a readable body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        (body, reply, uri.query().unwrap_or_default().to_owned())
    }

    /// Nothing more is sent until the reconcile ends, successfully. (An unexpected request
    /// would otherwise wait for an answer forever.)
    async fn finish(&mut self, running: JoinHandle<Result<Action, Error>>) {
        self.nothing_parked();
        tokio::select! {
            ended = running => {
                ended.expect("the reconcile ends").expect("the reconcile succeeds");
            }
            Some((request, _)) = self.requests.recv() => {
                panic!("unexpected request {} {}", request.method(), request.uri());
            }
        }
    }
}

impl ApiServer {
    /// As [`ApiServer::finish`], but answers one status write if it comes.
    async fn finish_allowing_status(&mut self, mut running: JoinHandle<Result<Action, Error>>, standin: &StandinTasklist) {
        if let Some(index) = self.parked.iter().position(|(request, _)| request.uri().path() == STATUS) {
            let (request, reply) = self.parked.remove(index);
            let bytes = request.into_body().collect_bytes().await.expect("a readable body");
            let patch: Value = serde_json::from_slice(&bytes).expect("a JSON body");
            let status = serde_json::from_value(patch["status"].clone()).expect("a status");
            answer(
                reply,
                StatusCode::OK,
                &serde_json::to_value(connection(standin, Some(status))).expect("JSON"),
            );
        }
        self.nothing_parked();
        tokio::select! {
            ended = &mut running => {
                ended.expect("the reconcile ends").expect("the reconcile succeeds");
                return;
            }
            Some((request, reply)) = self.requests.recv() => {
                assert_eq!((request.method(), request.uri().path()), (&Method::PATCH, STATUS), "unexpected request");
                let bytes = request.into_body().collect_bytes().await.expect("a readable body");
                let patch: Value = serde_json::from_slice(&bytes).expect("a JSON body");
                let status = serde_json::from_value(patch["status"].clone()).expect("a status");
                answer(reply, StatusCode::OK, &serde_json::to_value(connection(standin, Some(status))).expect("JSON"));
            }
        }
        self.finish(running).await;
    }
}

fn answer(reply: oneshot::Sender<Response<Body>>, status: StatusCode, body: &Value) {
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("a response");
    let _ = reply.send(response);
}

/// An API error answer: a `Status` object with `reason` and `message`.
fn failure(reply: oneshot::Sender<Response<Body>>, status: StatusCode, reason: &str, message: &str) {
    let body =
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": status.as_u16(), "message": message});
    answer(reply, status, &body);
}

fn not_found(reply: oneshot::Sender<Response<Body>>) {
    failure(reply, StatusCode::NOT_FOUND, "NotFound", "");
}

/// A kube client whose every request goes to the returned [`ApiServer`].
fn scripted_client() -> (kube::Client, ApiServer) {
    let (sender, requests) = mpsc::unbounded_channel::<Exchange>();
    let service = tower::service_fn(move |request: Request<Body>| {
        let sender = sender.clone();
        async move {
            let (reply, response) = oneshot::channel();
            sender.send((request, reply)).map_err(|_| "the test stopped listening")?;
            response.await.map_err(|_| "the test dropped the request")
        }
    });
    (
        kube::Client::new(service, NAMESPACE),
        ApiServer {
            requests,
            parked: Vec::new(),
        },
    )
}

fn connection(standin: &StandinTasklist, status: Option<TasklistConnectionStatus>) -> TasklistConnection {
    let spec = serde_json::from_value(json!({
        "url": standin.url(),
        "auth": {"oauth2": {"tokenUrl": standin.token_url(), "clientSecretRef": {"name": "client"}}},
    }))
    .expect("a spec");
    let mut connection = TasklistConnection::new("orders", spec);
    connection.metadata.namespace = Some(NAMESPACE.into());
    connection.metadata.uid = Some("uid-orders".into());
    connection.metadata.generation = Some(1);
    connection.status = status;
    connection
}

fn client_secret() -> Value {
    client_secret_at("11")
}

fn client_secret_at(version: &str) -> Value {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("client".into()),
            namespace: Some(NAMESPACE.into()),
            uid: Some("uid-client".into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            ("client_id".to_owned(), ByteString(b"orders".to_vec())),
            ("client_secret".to_owned(), ByteString(CLIENT_SECRET.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    serde_json::to_value(secret).expect("JSON")
}

/// The object an apply answer carries: what was sent, with a resourceVersion.
fn applied(mut body: Value, version: &str) -> Value {
    body["metadata"]["resourceVersion"] = json!(version);
    // The API server gives every object a uid (a Secret without one was rebuilt from a record).
    body["metadata"]["uid"] = json!("uid-derived");
    body
}

/// Starts the reconcile of a connection seen for the first time and answers its one read:
/// the client Secret's values, to obtain a credential (that there is no derived Secret yet
/// comes from the caches). The next request is the write.
async fn start_new_connection(h: &mut Harness) -> JoinHandle<Result<Action, Error>> {
    let running = h.reconcile(None);
    let (_, reply, _) = h.api.expect(Method::GET, CLIENT).await;
    answer(reply, StatusCode::OK, &client_secret());
    running
}

struct Harness {
    standin: StandinTasklist,
    ctx: Arc<Context>,
    api: ApiServer,
    caches: SecretCaches,
    /// The Secret index (a summary of every Secret), as its watch fills it.
    metadata: Arc<SecretIndex>,
}

impl Harness {
    fn reconcile(&self, status: Option<TasklistConnectionStatus>) -> JoinHandle<Result<Action, Error>> {
        self.reconcile_connection(connection(&self.standin, status))
    }

    /// A reconcile of the connection with the manual refresh annotation set.
    fn reconcile_forced_refresh(&self, status: Option<TasklistConnectionStatus>) -> JoinHandle<Result<Action, Error>> {
        let mut connection = connection(&self.standin, status);
        connection.metadata.annotations = Some([(crate::crd::REFRESH_ANNOTATION.to_owned(), "now".to_owned())].into());
        self.reconcile_connection(connection)
    }

    fn reconcile_connection(&self, connection: TasklistConnection) -> JoinHandle<Result<Action, Error>> {
        tokio::spawn(reconcile(Arc::new(connection), self.ctx.clone(), self.caches.clone()))
    }

    /// The metadata watch sees `secret` created or changed.
    fn watch_sees(&mut self, secret: &Value) {
        let secret: Secret = serde_json::from_value(secret.clone()).expect("a Secret");
        self.metadata.apply(&watcher::Event::Apply(metadata_of(&secret)));
    }
}

fn metadata_of(secret: &Secret) -> PartialObjectMeta<Secret> {
    PartialObjectMeta {
        types: None,
        metadata: secret.metadata.clone(),
        _phantom: Default::default(),
    }
}

/// A harness whose watches have listed the namespace, holding the client Secret.
async fn harness() -> Harness {
    let h = harness_before_the_watches_listed().await;
    let client: Secret = serde_json::from_value(client_secret()).expect("a Secret");
    h.metadata.apply(&watcher::Event::Init);
    h.metadata.apply(&watcher::Event::InitApply(metadata_of(&client)));
    h.metadata.apply(&watcher::Event::InitDone);
    h
}

/// A harness whose caches are empty and not ready: a start, before the watches listed.
async fn harness_before_the_watches_listed() -> Harness {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    standin.add_client("orders", CLIENT_SECRET);
    let (client, api) = scripted_client();
    // The token endpoint here listens on loopback, over http: lift those two defaults.
    let local = crate::policy::PolicyArgs {
        allow_loopback: true,
        allow_http: true,
        ..crate::policy::PolicyArgs::default()
    };
    let settings = HttpSettings {
        policy: Some(Arc::new(crate::policy::HostPolicy::from_args(&local).expect("a valid policy"))),
        ..HttpSettings::default()
    };
    let settings = Settings {
        http: settings,
        ..Settings::default()
    };
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        settings,
        Default::default(),
        None,
    ));
    let metadata = Arc::new(SecretIndex::new(Default::default()));
    let caches = SecretCaches {
        metadata: metadata.clone(),
    };
    Harness {
        standin,
        ctx,
        api,
        caches,
        metadata,
    }
}

const SECRETS: &str = "/api/v1/namespaces/team-a/secrets";
const DERIVED: &str = "/api/v1/namespaces/team-a/secrets/orders-tasklist-auth";
const CLIENT: &str = "/api/v1/namespaces/team-a/secrets/client";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";
const STATUS: &str = "/apis/tasklist.camunda.community/v1alpha1/namespaces/team-a/tasklistconnections/orders/status";

/// First pass: GET the client Secret (to obtain: the only read), create the Secret (never
/// apply: one that appeared meanwhile must not be taken over), the CredentialIssued Event,
/// apply status. Returns the written Secret and status; the watches have not seen the
/// Secret yet.
/// Answers the create of the derived Secret (it becomes version 21) and the Event that
/// follows it; returns the Secret sent, the create's query and the Event.
async fn accept_created_secret_and_event(api: &mut ApiServer) -> (Value, String, Value) {
    let (secret, reply, query) = api.expect(Method::POST, SECRETS).await;
    answer(reply, StatusCode::CREATED, &applied(secret.clone(), "21"));
    let (event, reply, _) = api.expect(Method::POST, EVENTS).await;
    answer(reply, StatusCode::CREATED, &event);
    (secret, query, event)
}

async fn first_pass(h: &mut Harness) -> (Value, TasklistConnectionStatus) {
    let running = start_new_connection(h).await;
    let (secret, query, event) = accept_created_secret_and_event(&mut h.api).await;
    assert!(query.contains(&format!("fieldManager={FIELD_MANAGER}")), "{query}");
    assert_eq!(secret["metadata"]["name"], "orders-tasklist-auth");
    assert!(secret["data"]["token"].is_string(), "no token in {secret}");
    assert_eq!(event["reason"], "CredentialIssued");
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    let status: TasklistConnectionStatus = serde_json::from_value(patch["status"].clone()).expect("a status");
    let mut object = serde_json::to_value(connection(&h.standin, Some(status.clone()))).expect("JSON");
    object["metadata"]["resourceVersion"] = json!("22");
    answer(reply, StatusCode::OK, &object);
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1);
    (applied(secret, "21"), status)
}

#[tokio::test]
async fn first_pass_reads_writes_the_secret_announces_and_writes_status_in_that_order() {
    let mut h = harness().await;
    let (_, status) = first_pass(&mut h).await;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Ready"));
}

#[tokio::test]
async fn second_pass_sends_nothing_at_all() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    // No read, no write: everything comes from the caches.
    let running = h.reconcile(Some(status));
    h.api.finish(running).await;
    assert_eq!(
        h.standin.token_requests().len(),
        1,
        "a second token for a credential that is not due"
    );
}

#[tokio::test]
async fn caches_behind_the_own_write_are_not_trusted() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    // The metadata watch has not delivered the create yet: the derived Secret is read
    // from the API server, once; the client Secret's values are not (nothing to obtain).
    let running = h.reconcile(Some(status.clone()));
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    answer(reply, StatusCode::OK, &secret);
    h.api.finish(running).await;
    // Once the watch has it, nothing is read.
    h.watch_sees(&secret);
    let running = h.reconcile(Some(status));
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1);
}

#[tokio::test]
async fn before_the_watches_listed_everything_is_read_from_the_api_server() {
    let mut h = harness_before_the_watches_listed().await;
    let running = h.reconcile(None);
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    not_found(reply);
    let (_, reply, _) = h.api.expect(Method::GET, CLIENT).await;
    answer(reply, StatusCode::OK, &client_secret());
    // Read once, although both the fingerprint and the token request need it.
    accept_created_secret_and_event(&mut h.api).await;
    h.api.finish_allowing_status(running, &h.standin).await;
    assert_eq!(h.standin.token_requests().len(), 1);
}

#[tokio::test]
async fn a_client_secret_read_later_than_the_watch_saw_it_is_stored_with_the_version_read() {
    let mut h = harness().await;
    // The metadata watch says version 11; the rotation to 12 happened just before the read.
    let running = h.reconcile(None);
    let (_, reply, _) = h.api.expect(Method::GET, CLIENT).await;
    answer(reply, StatusCode::OK, &client_secret_at("12"));
    let (secret, _, _) = accept_created_secret_and_event(&mut h.api).await;
    let written = applied(secret, "21");
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    let status: TasklistConnectionStatus = serde_json::from_value(patch["status"].clone()).expect("a status");
    answer(
        reply,
        StatusCode::OK,
        &serde_json::to_value(connection(&h.standin, Some(status.clone()))).expect("JSON"),
    );
    h.api.finish(running).await;
    // Once the watch delivers version 12 (whose event wakes the connection), the stored
    // credential fits: nothing is read or obtained.
    h.watch_sees(&written);
    h.watch_sees(&client_secret_at("12"));
    let running = h.reconcile(Some(status));
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1, "a second token for the version already used");
}

#[tokio::test]
async fn a_hand_edited_secret_is_restored() {
    let mut h = harness().await;
    let (mut secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    secret["data"]["token"] = json!("ZWRpdGVk");
    secret["metadata"]["resourceVersion"] = json!("25");
    h.watch_sees(&secret);
    // The metadata watch shows a version other than the record's: the Secret is read once,
    // and found edited. A new token is obtained without reading the client Secret again:
    // its version is the one the first pass read.
    let running = h.reconcile(Some(status));
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    answer(reply, StatusCode::OK, &secret);
    // A merge patch on condition of the resourceVersion that was checked.
    let (patch, reply, _) = h.api.expect(Method::PATCH, DERIVED).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "25");
    assert_ne!(patch["data"]["token"], json!("ZWRpdGVk"));
    let mut written = secret.clone();
    written["data"]["token"] = patch["data"]["token"].clone();
    answer(reply, StatusCode::OK, &applied(written, "31"));
    let (event, reply, _) = h.api.expect(Method::POST, EVENTS).await;
    assert_eq!(event["reason"], "SecretRestored");
    answer(reply, StatusCode::CREATED, &event);
    // Status is written again only when the new credential's times (whole seconds) differ.
    h.api.finish_allowing_status(running, &h.standin).await;
    assert_eq!(h.standin.token_requests().len(), 2);
}

#[tokio::test]
async fn a_conflict_is_announced_once_then_only_read() {
    let mut h = harness().await;
    let foreign = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-tasklist-auth", "namespace": NAMESPACE, "resourceVersion": "5"}, "data": {"x": "eA=="}});
    // Someone else's Secret is not labelled: only the metadata watch has it, and that is
    // enough to see it is not ours (no GET).
    h.watch_sees(&foreign);

    let running = h.reconcile(None);
    let (event, reply, _) = h.api.expect(Method::POST, EVENTS).await;
    assert_eq!(event["reason"], "SecretConflict");
    answer(reply, StatusCode::CREATED, &event);
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    let status: TasklistConnectionStatus = serde_json::from_value(patch["status"].clone()).expect("a status");
    answer(
        reply,
        StatusCode::OK,
        &serde_json::to_value(connection(&h.standin, Some(status.clone()))).expect("JSON"),
    );
    h.api.finish(running).await;

    // Again, with that status: no read, no Event, no status write, no token request.
    let running = h.reconcile(Some(status));
    h.api.finish(running).await;
    assert!(h.standin.token_requests().is_empty());
}

#[tokio::test]
async fn a_secret_created_meanwhile_is_not_overwritten() {
    let mut h = harness().await;
    let running = start_new_connection(&mut h).await;
    // Someone created a Secret of that name while the token was requested: the create fails.
    let (_, reply, _) = h.api.expect(Method::POST, SECRETS).await;
    failure(reply, StatusCode::CONFLICT, "AlreadyExists", "");
    // No second write of any kind: the reconcile ends with an error and the next one looks again.
    let ended = tokio::select! {
        ended = running => ended.expect("the reconcile ends"),
        Some((request, _)) = h.api.requests.recv() => panic!("unexpected request {} {}", request.method(), request.uri()),
    };
    assert!(matches!(ended, Err(Error::SecretChangedMeanwhile(_))), "{ended:?}");
}

/// A 403 to the Secret's create, as an admission policy answers, quoting `quoted`.
fn forbidden(reply: oneshot::Sender<Response<Body>>, quoted: &str) {
    let message =
        format!("secrets \"orders-tasklist-auth\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: {quoted}");
    failure(reply, StatusCode::FORBIDDEN, "Forbidden", &message);
}

#[tokio::test]
async fn a_denied_write_keeps_the_credential_and_a_failing_status_patch_obtains_nothing() {
    let mut h = harness().await;
    // 1. The create is denied; the policy's message quotes the token, plain and as sent (base64).
    let running = start_new_connection(&mut h).await;
    let (secret, reply, _) = h.api.expect(Method::POST, SECRETS).await;
    let sent = secret["data"]["token"].as_str().expect("a token").to_owned();
    let token =
        String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &sent).expect("base64")).expect("text");
    forbidden(reply, &format!("no tokens here: {sent} {token}"));
    let (event, reply, _) = h.api.expect(Method::POST, EVENTS).await;
    assert_eq!(
        (event["reason"].as_str(), event["type"].as_str()),
        (Some("SecretWriteFailed"), Some("Warning"))
    );
    let note = event["note"].as_str().expect("a note").to_owned();
    answer(reply, StatusCode::CREATED, &event);
    // 2. The status patch fails too.
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    let authenticated = patch["status"]["conditions"][0].clone();
    failure(reply, StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "");
    let ended = tokio::select! {
        ended = running => ended.expect("the reconcile ends"),
        Some((request, _)) = h.api.requests.recv() => panic!("unexpected request {} {}", request.method(), request.uri()),
    };
    assert!(matches!(ended, Err(Error::Kube(_))), "{ended:?}");
    assert_eq!(authenticated["reason"], "SecretWriteFailed");
    let message = authenticated["message"].as_str().expect("a message");
    assert!(message.contains("denied request: no tokens here"), "{message}");
    for text in [message, note.as_str()] {
        assert!(!text.contains(&token) && !text.contains(&sent), "a token in {text:?}");
        assert!(
            !text.contains(&token[..10]) && !text.contains(&sent[..10]),
            "a token prefix in {text:?}"
        );
    }

    // 3. At once again (the status never written): no read, no token, no write before the
    //    backoff, no second Event; status is tried again.
    let running = h.reconcile(None);
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    assert_eq!(patch["status"]["conditions"][0]["reason"], "SecretWriteFailed");
    let status: TasklistConnectionStatus = serde_json::from_value(patch["status"].clone()).expect("a status");
    answer(
        reply,
        StatusCode::OK,
        &serde_json::to_value(connection(&h.standin, Some(status.clone()))).expect("JSON"),
    );
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1);

    // 4. After the first backoff (at most 1.25 s): the same token is written; nothing obtained.
    //    The kept token needs no read either.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let running = h.reconcile(Some(status));
    let (secret, reply, _) = h.api.expect(Method::POST, SECRETS).await;
    assert_eq!(secret["data"]["token"].as_str(), Some(sent.as_str()), "not the kept token");
    answer(reply, StatusCode::CREATED, &applied(secret, "41"));
    let (event, reply, _) = h.api.expect(Method::POST, EVENTS).await;
    assert_eq!(event["reason"], "CredentialIssued");
    answer(reply, StatusCode::CREATED, &event);
    let (patch, reply, _) = h.api.expect(Method::PATCH, STATUS).await;
    assert_eq!(patch["status"]["conditions"][0]["reason"], "CredentialIssued");
    let status = serde_json::from_value(patch["status"].clone()).expect("a status");
    answer(
        reply,
        StatusCode::OK,
        &serde_json::to_value(connection(&h.standin, Some(status))).expect("JSON"),
    );
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1, "a new token instead of the kept one");
}

#[tokio::test]
async fn after_a_start_each_derived_secret_is_read_once_then_its_record_answers() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    // A new process: the watch lists the Secret, no record yet.
    h.ctx.shared.derived.forget(&super::memory::connection_key(NAMESPACE, "orders"));
    let running = h.reconcile(Some(status.clone()));
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    answer(reply, StatusCode::OK, &secret);
    h.api.finish(running).await;
    // Then nothing is read: the record is at the version the watch shows.
    let running = h.reconcile(Some(status));
    h.api.finish(running).await;
    assert_eq!(h.standin.token_requests().len(), 1);
}

/// The token host's slots are taken only to obtain a credential: with all of them in use,
/// a reconcile that keeps its credential goes on, and one that must obtain is deferred
/// before it asks the token endpoint or writes anything.
#[tokio::test]
async fn only_a_reconcile_that_obtains_needs_a_slot_of_the_token_host() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    let token_host = super::host_slots::credential_hosts(&connection(&h.standin, None), &h.ctx.settings.http.facts);
    let limits = super::host_slots::slot_limits(h.ctx.settings.concurrency);
    let taken = h.ctx.shared.host_slots.take_every_slot(NAMESPACE, &token_host[0], limits);
    assert_eq!(taken.len(), limits.per_host, "the host is proven after the first pass");

    let running = h.reconcile(Some(status.clone()));
    h.api.finish(running).await;

    let running = h.reconcile_forced_refresh(Some(status));
    let ended = tokio::select! {
        ended = running => ended.expect("the reconcile ends"),
        Some((request, _)) = h.api.requests.recv() => panic!("unexpected request {} {}", request.method(), request.uri()),
    };
    assert!(matches!(ended, Err(Error::Deferred(super::host_slots::Full::Host(_)))), "{ended:?}");
    assert_eq!(h.standin.token_requests().len(), 1, "no token request while the host is full");
}

#[tokio::test]
async fn a_write_over_a_recorded_secret_reads_it_whole_first_and_patches_that_version() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    // A forced refresh: the decision is made on the record; the patch needs the Secret's
    // keys and owners as they are, so it is read, then patched on condition of its version.
    let running = h.reconcile_forced_refresh(Some(status));
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    answer(reply, StatusCode::OK, &secret);
    let (patch, reply, _) = h.api.expect(Method::PATCH, DERIVED).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "21");
    let mut written = secret.clone();
    written["data"]["token"] = patch["data"]["token"].clone();
    answer(reply, StatusCode::OK, &applied(written, "31"));
    let (event, reply, _) = h.api.expect(Method::POST, EVENTS).await;
    assert_eq!(event["reason"], "CredentialRefreshed");
    answer(reply, StatusCode::CREATED, &event);
    h.api.finish_allowing_status(running, &h.standin).await;
    assert_eq!(h.standin.token_requests().len(), 2);
}

#[tokio::test]
async fn a_recorded_secret_changed_before_the_write_is_not_overwritten() {
    let mut h = harness().await;
    let (secret, status) = first_pass(&mut h).await;
    h.watch_sees(&secret);
    let running = h.reconcile_forced_refresh(Some(status));
    // Someone changed it after the decision: the read shows another version; no write.
    let (_, reply, _) = h.api.expect(Method::GET, DERIVED).await;
    answer(reply, StatusCode::OK, &applied(secret, "27"));
    let ended = tokio::select! {
        ended = running => ended.expect("the reconcile ends"),
        Some((request, _)) = h.api.requests.recv() => panic!("unexpected request {} {}", request.method(), request.uri()),
    };
    assert!(matches!(ended, Err(Error::SecretChangedMeanwhile(_))), "{ended:?}");
}
