//! A scripted stand-in for the Kubernetes API server, on kube's mock service (`tower_test`).
//!
//! A test takes each request the operator makes with [`ApiServer::next_call`], asserts what it
//! must be ([`Call::expect`], [`Call::expect_apply`], [`Call::expect_json_patch`]) and answers
//! it. Event publications (events.k8s.io) are not part of the script: how many a reconcile sends
//! depends on what the data plane changed, so they are answered as they come and kept in
//! [`ApiServer::events`] for the test to look at.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use signal_operator::workload::FIELD_MANAGER;
use tower_test::mock::{self, Handle, SendResponse};

/// Longest wait for the operator's next request: a data-plane step against an unreachable
/// server may take its full timeout before the next Kubernetes call.
const NEXT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
const EVENTS_PREFIX: &str = "/apis/events.k8s.io/v1/";

/// A kube `Client` whose every request is answered by the returned [`ApiServer`].
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        Client::new(service, "default"),
        ApiServer {
            handle,
            events: Vec::new(),
        },
    )
}

/// An event the operator published.
#[derive(Clone, Debug)]
pub struct RecordedEvent {
    /// `Normal` or `Warning`.
    pub type_: String,
    pub reason: String,
    pub note: String,
}

/// The API server side of the mock.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    /// Events published so far, in order.
    pub events: Vec<RecordedEvent>,
}

impl ApiServer {
    /// The next request that is not an event publication; events before it are answered and
    /// recorded. Panics when the operator stops calling or takes too long.
    pub async fn next_call(&mut self) -> Call {
        match self.next_request().await {
            Some(call) => call,
            None => panic!(
                "the operator made no further API call; events so far: {:?}",
                self.events
            ),
        }
    }

    /// Asserts the operator makes no further call (besides events) before its client is dropped,
    /// which happens when the reconcile finishes and the `Context` goes away.
    pub async fn expect_no_more_calls(&mut self) {
        if let Some(call) = self.next_request().await {
            panic!(
                "unexpected call {} {} with body {}",
                call.method, call.path, call.body
            );
        }
    }

    /// Whether an event with this reason was published.
    pub fn published(&self, reason: &str) -> bool {
        self.events.iter().any(|event| event.reason == reason)
    }

    async fn next_request(&mut self) -> Option<Call> {
        loop {
            let (request, respond) = tokio::time::timeout(NEXT_CALL_TIMEOUT, self.handle.next_request())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the operator made no API call within {NEXT_CALL_TIMEOUT:?}; events so far: {:?}",
                        self.events
                    )
                })?;
            let call = Call::read(request, respond).await;
            if !call.path.starts_with(EVENTS_PREFIX) {
                return Some(call);
            }
            self.events.push(RecordedEvent {
                type_: text(&call.body["type"]),
                reason: text(&call.body["reason"]),
                note: text(&call.body["note"]),
            });
            let echo = call.body.clone();
            call.respond(StatusCode::CREATED, &echo);
        }
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// One request the operator made, waiting for its response.
pub struct Call {
    pub method: Method,
    /// The URI path, without the query.
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    /// The JSON body, `Null` when empty.
    pub body: Value,
    respond: SendResponse<Response<Body>>,
}

impl Call {
    async fn read(request: Request<Body>, respond: SendResponse<Response<Body>>) -> Call {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect_bytes()
            .await
            .expect("the request body can be read");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                panic!(
                    "{} {}: the body is not JSON ({error}): {}",
                    parts.method,
                    parts.uri,
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        let query = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key.to_string(), value.to_string())
            })
            .collect();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Call {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query,
            content_type,
            body,
            respond,
        }
    }

    /// Asserts the method and path.
    pub fn expect(&self, method: Method, path: &str) {
        assert_eq!(
            (&self.method, self.path.as_str()),
            (&method, path),
            "expected {method} {path}, the operator called {} {} with body {}",
            self.method,
            self.path,
            self.body
        );
    }

    /// Asserts a forced server-side apply under the operator's field manager.
    pub fn expect_apply(&self, path: &str) {
        self.expect(Method::PATCH, path);
        assert_eq!(
            self.content_type, "application/apply-patch+yaml",
            "{path}: not a server-side apply"
        );
        assert_eq!(
            self.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER),
            "{path}: field manager"
        );
        assert_eq!(
            self.query.get("force").map(String::as_str),
            Some("true"),
            "{path}: the operator owns these fields and forces its apply"
        );
    }

    /// Asserts a JSON patch (how kube's finalizer helper edits `metadata.finalizers`) with exactly
    /// these operations.
    pub fn expect_json_patch(&self, path: &str, operations: Value) {
        self.expect(Method::PATCH, path);
        assert_eq!(self.content_type, "application/json-patch+json", "{path}");
        assert_eq!(self.body, operations, "{path}: JSON patch operations");
    }

    /// Answers 200 with `body`.
    pub fn respond_ok(self, body: &Value) {
        self.respond(StatusCode::OK, body);
    }

    /// Answers 404 with the Status the API server sends for a missing object.
    pub fn respond_not_found(self) {
        let name = self.path.rsplit('/').next().unwrap_or_default().to_string();
        let status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("\"{name}\" not found"),
            "reason": "NotFound",
            "details": {"name": name},
            "code": 404,
        });
        self.respond(StatusCode::NOT_FOUND, &status);
    }

    pub fn respond(self, status: StatusCode, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("a JSON value serialises");
        let response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .expect("a valid response");
        self.respond.send_response(response);
    }
}
