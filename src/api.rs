//! HTTP: `/metrics`, `/healthz`, `/readyz`, the incident and change API, the control API
//! (approve / veto / acknowledge / silence) and incident pages.
//!
//! The engine publishes a snapshot after each batch that changed something; read handlers use
//! the snapshot and never touch the engine, so the hot path takes no lock per event. Control
//! calls become [`Command`]s on the engine's control channel and wait for its answer.
//!
//! Several instances: an incident, its page or a control call that this instance does not hold
//! is asked of the peers (`[scale] peers`, [`crate::peer`]), and the incident list and a
//! change's audit trail are gathered from them, so any instance answers for the whole group.
//!
//! Access: everything under `/api/` needs `Authorization: Bearer <token>` of a configured actor
//! whose role grants the permission ([`authorize`]). With no actors configured, reads stay open
//! (as before roles existed) and control calls are refused.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::attribute::ChangeState;
use crate::auth::{Auth, Identity, Permission};
use crate::control::{Command, ControlError, ControlSender, DecisionCall, Verb};
use crate::engine::{Engine, HistoryPoint, Incident};
use crate::event::fmt_time;
use crate::peer::{pct_encode, Answer, Found, Peers};
use crate::sink::AuditRecord;
use crate::telemetry::Telemetry;

/// How long a control call waits for the engine (queueing included) before answering 503.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest `reason` accepted on a control call, in characters.
pub const MAX_REASON_CHARS: usize = 2000;

/// The hint given when a control call arrives but nobody may make one.
pub const NO_ACTORS_HINT: &str =
    "no actors are configured: add [[actors]] with a role and token_env to the config";

/// Series history attached to an incident for its page.
#[derive(Debug, Clone, Serialize)]
pub struct IncidentView {
    #[serde(flatten)]
    pub incident: Incident,
    pub onset: String,
    pub detected_at: String,
    pub resolved_at: Option<String>,
    /// The latest closed windows of the incident's series (observed, expected and its band).
    pub history: Vec<HistoryPoint>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub incidents: Vec<IncidentView>,
    pub changes: Vec<ChangeState>,
    pub watermark: Option<String>,
    pub series: usize,
    /// The engine's window, in ms (0: unknown; pages then infer it from a series' history).
    pub window_ms: i64,
}

impl Snapshot {
    pub fn of(eng: &Engine) -> Snapshot {
        let last = eng.last_closed_window().unwrap_or(0);
        Snapshot {
            incidents: eng
                .incidents
                .iter()
                .map(|i| IncidentView {
                    incident: i.clone(),
                    onset: fmt_time(i.onset_ms),
                    detected_at: fmt_time(i.detected_ms),
                    resolved_at: i.resolved_ms.map(fmt_time),
                    // Guards that are not a metric series (sample-ratio mismatch, sprawl,
                    // pressure) have no history to chart.
                    history: i
                        .series_idx
                        .map(|si| eng.series[si].history(last, eng.window_ms(), eng.band_z()))
                        .unwrap_or_default(),
                })
                .collect(),
            changes: eng.registry.all().cloned().collect(),
            watermark: eng.watermark_ms().map(fmt_time),
            series: eng.series_count(),
            window_ms: eng.window_ms(),
        }
    }
}

pub struct ApiState {
    pub telemetry: Arc<Telemetry>,
    pub ready: AtomicBool,
    /// Why not ready, for `/readyz`.
    pub not_ready_reason: RwLock<String>,
    pub snapshot: RwLock<Arc<Snapshot>>,
    /// The engine's control channel; set once at service start ([`ApiState::install`]).
    /// Unset: control calls and audit queries answer 503.
    pub control: OnceLock<ControlSender>,
    /// The configured actors; set once at service start. Unset or empty: reads are open and
    /// control calls answer 403.
    pub auth: OnceLock<Arc<Auth>>,
    /// The other instances' APIs; set once at service start. Unset or empty: every answer
    /// comes from this instance's own state.
    pub peers: OnceLock<Arc<Peers>>,
}

impl ApiState {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<ApiState> {
        Arc::new(ApiState {
            telemetry,
            ready: AtomicBool::new(false),
            not_ready_reason: RwLock::new("starting: not yet assigned any partition".into()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            control: OnceLock::new(),
            auth: OnceLock::new(),
            peers: OnceLock::new(),
        })
    }

    /// Sets the actors and the engine's control channel. Call once, before serving; a second
    /// call changes nothing (and logs a warning).
    pub fn install(&self, auth: Arc<Auth>, control: ControlSender) {
        let auth_was_set = self.auth.set(auth).is_err();
        let control_was_set = self.control.set(control).is_err();
        if auth_was_set || control_was_set {
            tracing::warn!(
                "api: install called more than once; keeping the first actors and control channel"
            );
        }
    }

    /// Sets the peer instances to ask for what this one does not hold. Call once, before
    /// serving.
    pub fn set_peers(&self, peers: Peers) {
        if self.peers.set(Arc::new(peers)).is_err() {
            tracing::warn!("api: set_peers called more than once; keeping the first peers");
        }
    }

    /// The peers to ask on behalf of this request: none if it came from a peer itself (so
    /// requests never loop) or if no peers are configured.
    fn peers_for(&self, headers: &HeaderMap) -> Option<&Peers> {
        self.peers
            .get()
            .map(|p| &**p)
            .filter(|p| !p.is_empty() && !Peers::is_forwarded(headers))
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::Relaxed);
        self.telemetry.ready.set(ready as i64);
        *self.not_ready_reason.write().unwrap() = reason.to_string();
    }

    pub fn publish(&self, snap: Snapshot) {
        *self.snapshot.write().unwrap() = Arc::new(snap);
    }

    /// The engine's watermark as last published to the metrics, if any event was seen.
    pub fn telemetry_watermark_ms(&self) -> Option<i64> {
        let w = self.telemetry.watermark_secs();
        (w > 0.0).then_some((w * 1000.0) as i64)
    }

    /// The latest event time the engine has seen, as last published to the metrics.
    pub fn latest_event_ms(&self) -> Option<i64> {
        let w = self.telemetry.latest_event_secs();
        (w > 0.0).then_some((w * 1000.0) as i64)
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap().clone()
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        // Unauthenticated on purpose: scraped by Prometheus and probed by the orchestrator.
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        // Authenticated: every handler under /api/ calls `authorize` first.
        .route("/api/whoami", get(whoami))
        .route("/api/incidents", get(list_incidents))
        .route("/api/incidents/{id}", get(get_incident))
        .route("/api/incidents/{id}/{verb}", post(decide))
        .route("/api/changes", get(list_changes))
        .route("/api/changes/{id}/audit", get(change_audit))
        // Unauthenticated on purpose: the incident pages are linked from alerts and chat, and
        // are read-only views of what the alert already said. Actions go through /api/.
        .route("/incidents", get(incidents_page))
        .route("/incidents/{id}", get(incident_page))
        .layer(axum::middleware::map_response(safe_headers))
        .with_state(state)
}

/// Pages carry strings from the input (dimension values, change descriptions): escaped where
/// they are written, and a policy that runs no script and loads nothing, in case one escape
/// is ever missed. No response is sniffed into another type.
async fn safe_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    r
}

/// What the HTTP server allows a client, so that slow or idle clients cannot hold it.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's head must arrive within this (also the time an idle keep-alive
    /// connection waits for its next request).
    pub header_read_timeout: Duration,
    /// A request, its body included, must be answered within this.
    pub request_timeout: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Reasons of `guardrail_http_limited_total`.
pub const HTTP_LIMITS: [&str; 2] = ["connections", "request_timeout"];

/// Serves the API on `listener` until `shutdown` completes, with the default [`HttpLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, HttpLimits::default()).await
}

/// [`serve`] with explicit limits: HTTP/1.1 connections, each bounded by `limits`; on
/// `shutdown`, open connections finish their request in flight and close.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: HttpLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let limited = state.telemetry.http_limited.clone();
    let for_requests = limited.clone();
    let app = router(state).layer(axum::middleware::from_fn(move |req, next| {
        request_deadline(req, next, limits.request_timeout, for_requests.clone())
    }));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors and the like: the next accept may work.
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limited.with_label_values(&["connections"]).inc();
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Answers 408 when a request, its body included, is not done within `limit` (a client that
/// trickles its body holds nothing longer than that).
async fn request_deadline(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    limit: Duration,
    limited: prometheus::IntCounterVec,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            limited.with_label_values(&["request_timeout"]).inc();
            (StatusCode::REQUEST_TIMEOUT, "request timed out\n").into_response()
        }
    }
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.telemetry.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = s.not_ready_reason.read().unwrap().clone();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
}

/// Longest silence a person may set: 30 days.
pub const MAX_SILENCE_SECS: u64 = 30 * 86_400;

/// An API error: `{"error": code, "message": message}` with its status; 401s also carry
/// `WWW-Authenticate: Bearer realm="guardrail"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    fn forbidden(message: String) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn unavailable(message: String) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    fn not_found(message: String) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"guardrail\""),
            );
        }
        r
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let (status, code) = match &e {
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// The one access check of the API: who is calling, and may they do `need`?
///
/// - Actors configured: the request must carry `Authorization: Bearer <token>` of one of them
///   (401 otherwise) whose role grants `need` (403 otherwise); returns the identity.
/// - No actors configured (or none installed yet): `read` is open (`Ok(None)`), anything else
///   is 403 with a hint on how to configure actors.
pub fn authorize(
    s: &ApiState,
    headers: &HeaderMap,
    need: Permission,
) -> Result<Option<Identity>, ApiError> {
    let auth = match s.auth.get() {
        Some(a) if !a.is_empty() => a,
        _ if need == Permission::Read => return Ok(None),
        _ => {
            return Err(ApiError::forbidden(format!(
                "{NO_ACTORS_HINT}; nobody may {need} until then"
            )))
        }
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing Authorization header: send `Authorization: Bearer <token>` with your actor's token",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(ApiError::unauthorized(
            "malformed Authorization header: expected `Authorization: Bearer <token>`",
        ));
    };
    let Some(id) = auth.authenticate(token) else {
        return Err(ApiError::unauthorized(
            "unknown token: no configured actor has this token",
        ));
    };
    if !id.may(need) {
        return Err(ApiError::forbidden(format!(
            "actor {} (role {}) may not {need}; allowed: {}",
            id.name,
            id.role,
            id.permissions_str()
        )));
    }
    Ok(Some(id.clone()))
}

/// As [`authorize`], for calls that need a person: no actors configured is 403.
fn authorize_actor(
    s: &ApiState,
    headers: &HeaderMap,
    need: Permission,
) -> Result<Identity, ApiError> {
    authorize(s, headers, need)?.ok_or_else(|| {
        ApiError::forbidden(format!(
            "{NO_ACTORS_HINT}; until then reads need no token and nobody can act"
        ))
    })
}

/// `GET /api/whoami`: the caller's actor, role and permissions.
async fn whoami(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Identity>, ApiError> {
    Ok(Json(authorize_actor(&s, &headers, Permission::Read)?))
}

/// The query of `GET /api/incidents`: `?group=GRP` lists one group's incidents. Other
/// parameters are ignored, as they were before there were any.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    group: Option<String>,
}

async fn list_incidents(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Permission::Read)?;
    let watermark = s.snap().watermark.clone();
    let (incidents, peers) =
        group_incidents(&s, &headers, "/api/incidents", q.group.as_deref()).await;
    Ok(incident_list(watermark, incidents, peers))
}

/// A list of the group's incidents: `partial` when some peer could not be asked.
fn incident_list(
    watermark: Option<String>,
    incidents: Vec<serde_json::Value>,
    peers: Vec<PeerReport>,
) -> Response {
    let partial = peers.iter().any(|p| p.status != "ok");
    Json(serde_json::json!({
        "incidents": incidents,
        "watermark": watermark,
        "peers": peers,
        "partial": partial,
    }))
    .into_response()
}

async fn get_incident(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Permission::Read)?;
    let snap = s.snap();
    match snap.incidents.iter().find(|i| i.incident.id == id) {
        Some(i) => Ok(Json(i).into_response()),
        None => Ok(incident_from_peers(&s, &headers, "/api/incidents", &id).await),
    }
}

/// An incident this instance does not hold, from the peer that does: `{prefix}/{id}` there.
async fn incident_from_peers(
    s: &ApiState,
    headers: &HeaderMap,
    prefix: &str,
    id: &str,
) -> Response {
    let path = format!("{prefix}/{}", pct_encode(id));
    from_peers(
        s,
        headers,
        Method::GET,
        &path,
        Bytes::new(),
        not_found_error(id),
    )
    .await
}

/// Asks the peers for what this instance does not hold (`missing` is its own 404) and relays
/// the answer of the one that has it. Nobody has it: 404. Not found, but some peers could not
/// be asked: 503 (it may well exist; try again).
async fn from_peers(
    s: &ApiState,
    headers: &HeaderMap,
    method: Method,
    path: &str,
    body: Bytes,
    missing: ApiError,
) -> Response {
    let Some(peers) = s.peers_for(headers) else {
        return missing.into_response();
    };
    let auth = headers.get(header::AUTHORIZATION);
    match peers.find(method, path, auth, body).await {
        Found::Answer(a) => relay(a),
        Found::Nowhere => ApiError {
            message: format!(
                "{}, here or on any of the {} peer instances",
                missing.message,
                peers.len()
            ),
            ..missing
        }
        .into_response(),
        Found::Unknown(failed) => ApiError::unavailable(format!(
            "{} here or on the peers that answered, and {} peer(s) could not be asked ({}); try again",
            missing.message,
            failed.len(),
            failed
                .iter()
                .map(|(u, e)| format!("{u}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        ))
        .into_response(),
    }
}

/// A peer's answer, passed on as it came, marked with who gave it.
fn relay(a: Answer) -> Response {
    let mut r = (a.status, a.body).into_response();
    if let Some(ct) = a.content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Ok(v) = HeaderValue::from_str(&a.peer) {
        r.headers_mut().insert(crate::peer::SERVED_BY, v);
    }
    r
}

/// How one peer answered a gathering request, for the `peers` field of lists.
#[derive(Debug, Clone, Serialize)]
struct PeerReport {
    url: String,
    /// `ok`, `unreachable` (not asked: down, timed out), or `error` (it answered with an error).
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Asks every peer for the list at `path`; returns the `field` arrays of the peers that
/// answered 200 (404 counts as an empty list), and a report per peer.
async fn gather_from_peers(
    s: &ApiState,
    headers: &HeaderMap,
    path: &str,
    field: &str,
) -> (Vec<serde_json::Value>, Vec<PeerReport>) {
    let Some(peers) = s.peers_for(headers) else {
        return (Vec::new(), Vec::new());
    };
    let mut items = Vec::new();
    let mut reports = Vec::new();
    for (url, r) in peers.gather(path, headers.get(header::AUTHORIZATION)).await {
        let (status, error) = match r {
            Ok(a) if a.status == StatusCode::NOT_FOUND => ("ok", None),
            Ok(a) if a.status == StatusCode::OK => {
                match serde_json::from_slice::<serde_json::Value>(&a.body) {
                    Ok(mut v) => match v.get_mut(field).map(serde_json::Value::take) {
                        Some(serde_json::Value::Array(list)) => {
                            items.extend(list);
                            ("ok", None)
                        }
                        _ => ("error", Some(format!("answer has no {field:?} list"))),
                    },
                    Err(e) => ("error", Some(format!("answer is not JSON: {e}"))),
                }
            }
            Ok(a) => (
                "error",
                Some(format!(
                    "HTTP {}: {}",
                    a.status.as_u16(),
                    String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
                )),
            ),
            Err(e) => ("unreachable", Some(e.to_string())),
        };
        reports.push(PeerReport { url, status, error });
    }
    (items, reports)
}

/// Every incident of the instance group: this instance's, then its peers' (asked at
/// `peer_path`), one per id, in the order they were detected. `group`: only the incidents of
/// that group (`group_id`); peers are asked for their whole list and filtered here, so a peer
/// that does not know groups yet still answers.
async fn group_incidents(
    s: &ApiState,
    headers: &HeaderMap,
    peer_path: &str,
    group: Option<&str>,
) -> (Vec<serde_json::Value>, Vec<PeerReport>) {
    let snap = s.snap();
    let mut list: Vec<serde_json::Value> = snap
        .incidents
        .iter()
        .filter(|i| group.map_or(true, |g| i.incident.group_id == g))
        .map(|i| serde_json::to_value(i).unwrap_or_default())
        .collect();
    let (theirs, reports) = gather_from_peers(s, headers, peer_path, "incidents").await;
    if !reports.is_empty() {
        let mut seen: std::collections::HashSet<String> = list
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect();
        list.extend(theirs.into_iter().filter(|v| {
            group.map_or(true, |g| v["group_id"].as_str() == Some(g))
                && v["id"]
                    .as_str()
                    .is_some_and(|id| seen.insert(id.to_string()))
        }));
        list.sort_by_key(|v| v["detected_ms"].as_i64().unwrap_or(0));
    }
    (list, reports)
}

/// An incident's group id in its JSON: `None` when it has none (an older peer's incident, or
/// one the engine left ungrouped), so that it forms a group of its own.
fn group_of(v: &serde_json::Value) -> Option<&str> {
    v["group_id"].as_str().filter(|g| !g.is_empty())
}

/// The incidents (as JSON) gathered by cause: one group per `group_id`, and one per incident
/// without one. In each group the leader comes first: the most specific series (most
/// dimensions), then the highest score, then the earliest detection (then the id, so the
/// choice never depends on the order incidents arrived in); the other members follow in order
/// of detection. Groups come newest activity first (latest detection of a member), as the
/// incidents did before they were grouped.
fn group_by_cause(incidents: &[serde_json::Value]) -> Vec<Vec<&serde_json::Value>> {
    let mut groups: Vec<Vec<&serde_json::Value>> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for v in incidents {
        match group_of(v) {
            Some(g) => match index.get(g) {
                Some(k) => groups[*k].push(v),
                None => {
                    index.insert(g, groups.len());
                    groups.push(vec![v]);
                }
            },
            None => groups.push(vec![v]),
        }
    }
    let detected = |v: &serde_json::Value| v["detected_ms"].as_i64().unwrap_or(0);
    let id = |v: &serde_json::Value| v["id"].as_str().unwrap_or("").to_string();
    let dims = |v: &serde_json::Value| v["series"].as_object().map_or(0, |m| m.len());
    let score = |v: &serde_json::Value| v["score"].as_f64().unwrap_or(f64::NEG_INFINITY);
    for g in &mut groups {
        g.sort_by_key(|a| (detected(a), id(a)));
        let lead = (0..g.len())
            .max_by(|i, j| {
                let (a, b) = (g[*i], g[*j]);
                dims(a)
                    .cmp(&dims(b))
                    .then(score(a).total_cmp(&score(b)))
                    .then(detected(b).cmp(&detected(a)))
                    .then(id(b).cmp(&id(a)))
            })
            .unwrap_or(0);
        let leader = g.remove(lead);
        g.insert(0, leader);
    }
    let latest = |g: &Vec<&serde_json::Value>| g.iter().map(|v| detected(v)).max().unwrap_or(0);
    groups.sort_by(|a, b| {
        latest(b)
            .cmp(&latest(a))
            .then_with(|| id(a[0]).cmp(&id(b[0])))
    });
    groups
}

async fn list_changes(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Permission::Read)?;
    Ok(Json(serde_json::json!({"changes": s.snap().changes})).into_response())
}

/// The optional body of a control call.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    reason: Option<String>,
    silence_secs: Option<u64>,
}

/// Sends `cmd` to the engine and waits for the answer on `rx`, for at most [`CONTROL_TIMEOUT`].
async fn ask<T>(
    s: &ApiState,
    cmd: Command,
    rx: tokio::sync::oneshot::Receiver<T>,
) -> Result<T, ApiError> {
    let Some(tx) = s.control.get() else {
        return Err(ApiError::unavailable(
            "the engine's control channel is not connected (service starting?)".into(),
        ));
    };
    let call = async {
        let closed = || ApiError::from(ControlError::Unavailable);
        tx.send(cmd).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    };
    tokio::time::timeout(CONTROL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::unavailable(format!(
                "the engine did not answer within {} s; it may be busy or stuck, try again",
                CONTROL_TIMEOUT.as_secs()
            )))
        })
}

/// `POST /api/incidents/{id}/{verb}`: approve, veto, acknowledge or silence an incident's
/// decision. Body (optional): `{"reason": "...", "silence_secs": 3600}`.
async fn decide(
    State(s): State<Arc<ApiState>>,
    Path((id, verb)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(v) = Verb::parse(&verb) else {
        // Only for callers who may read: do not answer strangers.
        authorize(&s, &headers, Permission::Read)?;
        let verbs: Vec<&str> = Verb::ALL.iter().map(|v| v.as_str()).collect();
        return Ok((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": "not_found",
                "message": format!("unknown action {verb:?}; use one of: {}", verbs.join(", ")),
                "verbs": verbs,
            })),
        )
            .into_response());
    };
    let who = authorize_actor(&s, &headers, Permission::for_verb(v))?;
    let b: DecideBody = if body.iter().all(|c| c.is_ascii_whitespace()) {
        DecideBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid JSON body: {e}; expected {{\"reason\": \"...\", \"silence_secs\": 3600}} or no body"
            ))
        })?
    };
    if b.silence_secs.is_some() && v != Verb::Silence {
        return Err(ApiError::bad_request(format!(
            "silence_secs applies only to silence, not to {}",
            v.as_str()
        )));
    }
    if b.silence_secs
        .is_some_and(|x| !(1..=MAX_SILENCE_SECS).contains(&x))
    {
        return Err(ApiError::bad_request(format!(
            "silence_secs must be between 1 and {MAX_SILENCE_SECS} (30 days)"
        )));
    }
    let reason = b
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(ApiError::bad_request(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    let forward = body.clone();
    let call = DecisionCall {
        incident_id: id.clone(),
        verb: v,
        principal: who.principal(),
        reason,
        silence_secs: b.silence_secs,
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    let answer = ask(&s, Command::Decide { call, reply }, rx)
        .await
        .and_then(|a| a.map_err(ApiError::from));
    if let Err(e) = &answer {
        if e.status == StatusCode::NOT_FOUND && s.peers_for(&headers).is_some() {
            // Not this instance's incident: the peer that holds it decides (and audits).
            let path = format!("/api/incidents/{}/{}", pct_encode(&id), v.as_str());
            let r = from_peers(&s, &headers, Method::POST, &path, forward, e.clone()).await;
            tracing::info!(
                actor = %who.name,
                role = %who.role,
                verb = v.as_str(),
                incident = %id,
                status = r.status().as_u16(),
                peer = ?r.headers().get(crate::peer::SERVED_BY),
                "api: control call forwarded"
            );
            return Ok(r);
        }
    }
    tracing::info!(
        actor = %who.name,
        role = %who.role,
        verb = v.as_str(),
        incident = %id,
        status = answer.as_ref().map(|_| 200).unwrap_or_else(|e| e.status.as_u16()),
        "api: control call"
    );
    Ok(Json(answer?).into_response())
}

/// `GET /api/changes/{id}/audit`: every audit record about a change and its incidents.
async fn change_audit(
    State(s): State<Arc<ApiState>>,
    Path(change_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Permission::Read)?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let cmd = Command::ChangeAudit {
        change_id: change_id.clone(),
        reply,
    };
    let mut records = ask(&s, cmd, rx).await?;
    let path = format!("/api/changes/{}/audit", pct_encode(&change_id));
    let (theirs, peers) = gather_from_peers(&s, &headers, &path, "records").await;
    if !peers.is_empty() {
        let mut seen: std::collections::HashSet<String> =
            records.iter().map(|r| r.audit_id.clone()).collect();
        records.extend(
            theirs
                .into_iter()
                .filter_map(|v| serde_json::from_value::<AuditRecord>(v).ok())
                .filter(|r| seen.insert(r.audit_id.clone())),
        );
        // `at` is RFC 3339 in UTC with a fixed width, so it sorts as text.
        records.sort_by(|a, b| (&a.at, a.seq).cmp(&(&b.at, b.seq)));
    }
    let partial = peers.iter().any(|p| p.status != "ok");
    if records.is_empty() {
        return Err(if partial {
            ApiError::unavailable(format!(
                "no audit records for change {change_id} here or on the peers that answered; some peers could not be asked: try again"
            ))
        } else {
            ApiError::not_found(format!(
                "no audit records for change {change_id}: unknown change, or nothing recorded about it yet"
            ))
        });
    }
    Ok(Json(serde_json::json!({
        "change_id": change_id,
        "records": records,
        "peers": peers,
        "partial": partial,
    }))
    .into_response())
}

fn not_found_error(id: &str) -> ApiError {
    ApiError::not_found(format!("no incident {id}"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}\
table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f4f4f6}.firing{color:#b00}.resolved{color:#070}.num{text-align:right;font-variant-numeric:tabular-nums}\
.muted{color:#666}.kv th{width:11em}.kv td.num{text-align:left}h1{margin-bottom:.2em}h2{margin-top:1.4em;border-bottom:1px solid #ddd}\
.chartbox{border:1px solid #ddd;padding:.5em;display:inline-block;background:#fff}\
.legend{font-size:.85em;color:#444;margin:.3em 0 0}.legend span{margin-right:1.2em;white-space:nowrap}\
.sw{display:inline-block;width:1.6em;height:.7em;vertical-align:middle;margin-right:.35em}\
.action{font-weight:bold;font-size:1.1em}code{background:#f4f4f6;padding:0 .2em}\
tr.group-row td{border-bottom:none}tr.group-line td{border-top:none;padding-top:0;font-size:.85em;color:#444}";

fn status_str(inc: &Incident) -> &'static str {
    if inc.status == crate::engine::IncidentStatus::Firing {
        "firing"
    } else {
        "resolved"
    }
}

fn series_str(series: &serde_json::Map<String, serde_json::Value>) -> String {
    if series.is_empty() {
        return "total".into();
    }
    series
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            v => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A metric value with about four significant digits.
fn fmt_val(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    let dec = if a == 0.0 {
        0
    } else {
        (3 - a.log10().floor() as i64).clamp(0, 8) as usize
    };
    format!("{v:.dec$}")
}

fn fmt_opt_time(ms: Option<i64>) -> String {
    ms.map(fmt_time).unwrap_or_else(|| "-".into())
}

fn hhmm(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%H:%M").to_string())
        .unwrap_or_default()
}

/// `?format=json` on `/incidents`: the page's data, with the page's (open) access. Peers
/// gather each other's lists for the page this way, since the page itself carries no token.
/// `?group=GRP`: one group's incidents (HTML: one row each; JSON: the filtered list).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    format: Option<String>,
    group: Option<String>,
}

/// The cells of an incident's row on the list, from its JSON (the peers' come as JSON):
/// id, status, metric, series, kind, severity, effect, decision, detected.
fn incident_cells(v: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| esc(v.as_str().unwrap_or("-"));
    let series = v["series"].as_object().map(series_str).unwrap_or_default();
    format!(
        "<td><a href=\"/incidents/{href}\">{id}</a></td><td class=\"{st}\">{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:+.1}%</td><td>{}</td><td>{}</td>",
        text(&v["metric"]),
        esc(&series),
        text(&v["kind"]),
        text(&v["severity"]),
        v["effect"].as_f64().unwrap_or(0.0) * 100.0,
        text(&v["decision"]["action"]),
        text(&v["detected_at"]),
        href = pct_encode(v["id"].as_str().unwrap_or("")),
        id = text(&v["id"]),
        st = json_status(v),
    )
}

fn json_status(v: &serde_json::Value) -> &'static str {
    if v["status"] == "firing" {
        "firing"
    } else {
        "resolved"
    }
}

/// `metric series` of an incident's JSON, escaped: `conversion_rate country=FR`.
fn json_label(v: &serde_json::Value) -> String {
    let series = v["series"].as_object().map(series_str).unwrap_or_default();
    esc(&format!("{} {series}", v["metric"].as_str().unwrap_or("-")))
}

/// The link to the list of one group's incidents.
fn group_href(group: &str) -> String {
    format!("/incidents?group={}", pct_encode(group))
}

/// `N incident(s)`, and how many fire when some do.
fn count_str(members: &[&serde_json::Value]) -> String {
    let n = members.len();
    let firing = members.iter().filter(|v| v["status"] == "firing").count();
    let mut out = format!("{n} incident{}", if n == 1 { "" } else { "s" });
    if firing > 0 && n > 1 {
        out.push_str(&format!(", {firing} firing"));
    }
    out
}

async fn incidents_page(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<PageQuery>,
) -> Response {
    let json = match q.format.as_deref() {
        None | Some("html") => false,
        Some("json") => true,
        Some(other) => {
            return ApiError::bad_request(format!(
                "unknown format {other:?}; use html (the default) or json"
            ))
            .into_response()
        }
    };
    let watermark = s.snap().watermark.clone();
    let group = q.group.as_deref();
    let (incidents, peers) = group_incidents(&s, &headers, "/incidents?format=json", group).await;
    if json {
        return incident_list(watermark, incidents, peers);
    }
    let mut rows = String::new();
    let (title, intro) = match group {
        // One group: every member, newest first.
        Some(g) => {
            for v in incidents.iter().rev() {
                rows.push_str(&format!(
                    "<tr class=\"incident\">{}</tr>",
                    incident_cells(v)
                ));
            }
            let all: Vec<&serde_json::Value> = incidents.iter().collect();
            (
                format!("Incidents of group <code>{}</code>", esc(g)),
                format!(
                    "<p class=\"group-summary\" data-members=\"{}\">{}, one cause. <a href=\"/incidents\">&larr; all incidents</a></p>",
                    all.len(),
                    count_str(&all)
                ),
            )
        }
        // Every incident: one row per group, its leader's, and under it a line with the
        // group, its count and the other members.
        None => {
            for members in group_by_cause(&incidents) {
                let lead = members[0];
                let mut line = match group_of(lead) {
                    Some(g) => format!(
                        "group <a href=\"{}\"><code>{}</code></a> &middot; {}",
                        esc(&group_href(g)),
                        esc(g),
                        count_str(&members)
                    ),
                    None => format!("no group &middot; {}", count_str(&members)),
                };
                let others: Vec<String> = members[1..]
                    .iter()
                    .map(|v| {
                        format!(
                            "<a href=\"/incidents/{}\">{}</a> <span class=\"{st}\">{st}</span>",
                            pct_encode(v["id"].as_str().unwrap_or("")),
                            json_label(v),
                            st = json_status(v),
                        )
                    })
                    .collect();
                if !others.is_empty() {
                    line.push_str(&format!(
                        " &middot; members: <span class=\"members\">{}</span>",
                        others.join(", ")
                    ));
                }
                rows.push_str(&format!(
                    "<tr class=\"group-row\">{}</tr><tr class=\"group-line\"><td></td><td colspan=\"8\" class=\"group\" data-group=\"{}\" data-members=\"{}\">{line}</td></tr>",
                    incident_cells(lead),
                    esc(group_of(lead).unwrap_or("")),
                    members.len(),
                ));
            }
            ("Incidents".to_string(), String::new())
        }
    };
    if rows.is_empty() {
        rows.push_str(&format!(
            "<tr><td colspan=\"{}\" class=\"muted\">no incidents{}</td></tr>",
            9,
            if group.is_some() {
                " in this group"
            } else {
                ""
            }
        ));
    }
    let mut notes = String::new();
    for p in peers.iter().filter(|p| p.status != "ok") {
        notes.push_str(&format!(
            "<p class=\"firing\">Incomplete: peer {} could not be asked ({}); its incidents are missing here.</p>",
            esc(&p.url),
            esc(p.error.as_deref().unwrap_or(p.status))
        ));
    }
    let instances = if peers.is_empty() {
        String::new()
    } else {
        format!(" &middot; this instance and {} peer(s)", peers.len())
    };
    let lead_note = if group.is_none() {
        " &middot; one row per group of incidents with one cause (its most specific series)"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>guardrail incidents</title><style>{STYLE}</style></head><body><h1>{title}</h1><p class=\"muted\">watermark {}{instances}{lead_note}</p>{intro}{notes}<table><tr><th>id</th><th>status</th><th>metric</th><th>series</th><th>kind</th><th>severity</th><th>effect</th><th>decision</th><th>detected</th></tr>{rows}</table></body></html>",
        esc(watermark.as_deref().unwrap_or("-"))
    ))
    .into_response()
}

/// "Nice" tick positions (1, 2 or 5 times a power of ten) covering `[lo, hi]`, about `n` of them.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 && out.len() < 50 {
        out.push(t);
        t += step;
    }
    (out, step)
}

/// Places labels left to right in rows so that none overlaps the previous one in its row;
/// returns the row of each label (input: x and approximate width in pixels).
fn label_rows(items: &[(f64, f64)]) -> Vec<usize> {
    let mut ends: Vec<f64> = Vec::new();
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| items[*a].0.total_cmp(&items[*b].0));
    let mut rows = vec![0; items.len()];
    for i in order {
        let (x, w) = items[i];
        let r = match ends.iter().position(|e| *e + 4.0 <= x) {
            Some(r) => r,
            None => {
                ends.push(f64::NEG_INFINITY);
                ends.len() - 1
            }
        };
        ends[r] = x + w;
        rows[i] = r;
    }
    rows
}

const CHART_W: f64 = 900.0;
const CHART_H: f64 = 300.0;
const M_LEFT: f64 = 64.0;
const M_RIGHT: f64 = 16.0;
const M_TOP: f64 = 12.0;
const M_BOTTOM: f64 = 40.0;

/// The inline SVG chart of an incident's series: observed, expected and its band, change
/// markers, onset (its estimate, and its 95% confidence set as a shaded band), detection and
/// resolution.
/// Also returns whether it drew the onset's confidence set (for the legend).
fn chart_svg(i: &IncidentView, changes: &[ChangeState], window_ms: i64) -> (String, bool) {
    let inc = &i.incident;
    let h = &i.history;
    let win = window_of(h, window_ms);
    let (t0, t1) = match (h.first(), h.last()) {
        (Some(a), Some(b)) => (a.start_ms, b.start_ms + win),
        _ => {
            let end = inc.resolved_ms.unwrap_or(inc.detected_ms);
            (inc.onset_ms - 3_600_000, end + 3_600_000)
        }
    };
    let t1 = t1.max(t0 + 1);
    // Value range over everything drawn.
    let mut vals: Vec<f64> = Vec::new();
    for p in h {
        vals.extend(
            [p.observed, p.expected, p.expected_low, p.expected_high]
                .into_iter()
                .flatten()
                .filter(|v| v.is_finite()),
        );
    }
    if vals.is_empty() {
        vals.extend(
            [inc.observed, inc.expected_low, inc.expected_high]
                .into_iter()
                .filter(|v| v.is_finite()),
        );
    }
    let (mut lo, mut hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, u), v| {
            (l.min(*v), u.max(*v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(1e-9);
    // Rates and counts never go below zero: do not invent a negative axis for them.
    lo = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    hi += pad;
    let (yticks, ystep) = nice_ticks(lo, hi, 5);
    if let (Some(f), Some(l)) = (yticks.first(), yticks.last()) {
        lo = lo.min(*f);
        hi = hi.max(*l);
    }
    let pw = CHART_W - M_LEFT - M_RIGHT;
    let ph = CHART_H - M_TOP - M_BOTTOM;
    let x = |t: i64| M_LEFT + (t - t0) as f64 / (t1 - t0) as f64 * pw;
    let y = |v: f64| M_TOP + (hi - v) / (hi - lo) * ph;
    let inside = |t: i64| t >= t0 && t <= t1;
    let mid = |p: &HistoryPoint| p.start_ms + win / 2;

    let mut svg = format!(
        "<svg id=\"chart\" width=\"{CHART_W}\" height=\"{CHART_H}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" role=\"img\" aria-label=\"{} over time: observed against expected\" font-family=\"system-ui,sans-serif\" font-size=\"11\">",
        esc(&inc.metric)
    );
    svg.push_str(&format!(
        "<rect x=\"{M_LEFT}\" y=\"{M_TOP}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"#fcfcfd\" stroke=\"#bbb\"/>"
    ));
    // The incident's span, from onset to resolution (or the chart's end while firing).
    let span_a = inc.onset_ms.clamp(t0, t1);
    let span_b = inc.resolved_ms.unwrap_or(t1).clamp(t0, t1);
    if span_b > span_a {
        svg.push_str(&format!(
            "<rect class=\"incident-span\" x=\"{:.1}\" y=\"{M_TOP}\" width=\"{:.1}\" height=\"{ph:.1}\" fill=\"#fde8e8\" opacity=\"0.7\"><title>incident: onset to {}</title></rect>",
            x(span_a),
            x(span_b) - x(span_a),
            if inc.resolved_ms.is_some() { "resolution" } else { "now (firing)" }
        ));
    }
    // The onset's 95% confidence set: the windows it may have started in, shaded.
    let mut drew_set = false;
    if let Some((a, b)) = onset_span(inc, win) {
        let (ca, cb) = (a.clamp(t0, t1), b.clamp(t0, t1));
        if cb > ca {
            // At least two pixels, so that a one-window set on a long chart stays visible.
            let w = (x(cb) - x(ca)).max(2.0);
            svg.push_str(&format!(
                "<rect class=\"onset-set\" x=\"{:.1}\" y=\"{M_TOP}\" width=\"{w:.1}\" height=\"{ph:.1}\" fill=\"#ffb74d\" fill-opacity=\"0.45\" stroke=\"#ef6c00\" stroke-opacity=\"0.6\" stroke-dasharray=\"3 2\"><title>onset, 95% confidence set: {} to {} ({}); estimate {}</title></rect>",
                x(ca),
                esc(&fmt_time(a)),
                esc(&fmt_time(b)),
                windows_str((b - a) / win.max(1)),
                esc(&fmt_time(inc.onset_ms)),
            ));
            drew_set = true;
        }
    }
    // Value grid and ticks.
    // Enough decimals to tell the ticks apart (0.0025 needs four).
    let ydec = (0..=8usize)
        .find(|d| {
            let m = ystep * 10f64.powi(*d as i32);
            (m - m.round()).abs() < 1e-6 * m.max(1.0)
        })
        .unwrap_or(8);
    for v in &yticks {
        let yy = y(*v);
        svg.push_str(&format!(
            "<line class=\"ytick\" x1=\"{M_LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e4e4e8\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{v:.ydec$}</text>",
            M_LEFT + pw,
            M_LEFT - 6.0,
            yy + 4.0
        ));
    }
    // Time ticks, aligned to whole minutes of UTC.
    let span_min = (t1 - t0) as f64 / 60_000.0;
    let step_min = [5, 10, 15, 30, 60, 120, 180, 240, 360, 720, 1440]
        .into_iter()
        .find(|s| span_min / *s as f64 <= 9.0)
        .unwrap_or(2880) as i64;
    let step_ms = step_min * 60_000;
    let mut t = t0.div_euclid(step_ms) * step_ms;
    if t < t0 {
        t += step_ms;
    }
    while t <= t1 {
        let xx = x(t);
        svg.push_str(&format!(
            "<line class=\"xtick\" x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{M_TOP}\" y2=\"{:.1}\" stroke=\"#eeeef2\"/><line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            M_TOP + ph,
            M_TOP + ph,
            M_TOP + ph + 4.0,
            M_TOP + ph + 16.0,
            hhmm(t)
        ));
        t += step_ms;
    }
    svg.push_str(&format!(
        "<text class=\"ylabel\" transform=\"translate(13 {:.1}) rotate(-90)\" text-anchor=\"middle\" fill=\"#777\">{}</text>",
        M_TOP + ph / 2.0,
        esc(&inc.metric)
    ));
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#777\">time (UTC)</text>",
        M_LEFT + pw,
        CHART_H - 4.0
    ));
    // Expected band: one polygon per run of windows that have one.
    let mut runs: Vec<Vec<&HistoryPoint>> = vec![Vec::new()];
    for p in h {
        if p.expected_low.is_some() && p.expected_high.is_some() {
            runs.last_mut().unwrap().push(p);
        } else if !runs.last().unwrap().is_empty() {
            runs.push(Vec::new());
        }
    }
    for run in runs.iter().filter(|r| !r.is_empty()) {
        // A single window still gets a visible band: draw it across its own width.
        let pts: Vec<(i64, f64, f64)> = if run.len() == 1 {
            let p = run[0];
            let (l, u) = (p.expected_low.unwrap(), p.expected_high.unwrap());
            vec![(p.start_ms, l, u), (p.start_ms + win, l, u)]
        } else {
            run.iter()
                .map(|p| (mid(p), p.expected_low.unwrap(), p.expected_high.unwrap()))
                .collect()
        };
        let mut poly = String::new();
        for (t, _, u) in &pts {
            poly.push_str(&format!("{:.1},{:.1} ", x(*t), y(*u)));
        }
        for (t, l, _) in pts.iter().rev() {
            poly.push_str(&format!("{:.1},{:.1} ", x(*t), y(*l)));
        }
        svg.push_str(&format!(
            "<polygon class=\"band\" points=\"{}\" fill=\"#8fb3e0\" fill-opacity=\"0.35\" stroke=\"none\"><title>99% band of the expected value</title></polygon>",
            poly.trim_end()
        ));
    }
    // Expected line, dashed, broken where there is no expectation.
    let mut seg = String::new();
    let flush = |seg: &mut String, svg: &mut String| {
        if seg.split(' ').filter(|s| !s.is_empty()).count() >= 2 {
            svg.push_str(&format!(
                "<polyline class=\"expected\" points=\"{}\" fill=\"none\" stroke=\"#3a5a85\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
                seg.trim_end()
            ));
        }
        seg.clear();
    };
    for p in h {
        match p.expected {
            Some(e) if e.is_finite() => seg.push_str(&format!("{:.1},{:.1} ", x(mid(p)), y(e))),
            _ => flush(&mut seg, &mut svg),
        }
    }
    flush(&mut seg, &mut svg);
    // Observed: one polyline over the windows that have a value, and a dot per window, red when
    // outside the band.
    let obs: Vec<(&HistoryPoint, f64)> = h
        .iter()
        .filter_map(|p| p.observed.filter(|v| v.is_finite()).map(|v| (p, v)))
        .collect();
    let pts: Vec<String> = obs
        .iter()
        .map(|(p, v)| format!("{:.1},{:.1}", x(mid(p)), y(*v)))
        .collect();
    svg.push_str(&format!(
        "<polyline class=\"observed\" points=\"{}\" fill=\"none\" stroke=\"#0b2f6b\" stroke-width=\"2\" stroke-linejoin=\"round\"/>",
        pts.join(" ")
    ));
    for (p, v) in &obs {
        let out =
            matches!((p.expected_low, p.expected_high), (Some(l), Some(u)) if *v < l || *v > u);
        svg.push_str(&format!(
            "<circle class=\"obs-point{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"{}\" fill=\"{}\"><title>{} observed {} expected {} (band {} to {}), volume {}</title></circle>",
            if out { " outside" } else { "" },
            x(mid(p)),
            y(*v),
            if out { 3.2 } else { 2.2 },
            if out { "#d32f2f" } else { "#0b2f6b" },
            hhmm(p.start_ms),
            fmt_val(*v),
            p.expected.map(fmt_val).unwrap_or_else(|| "-".into()),
            p.expected_low.map(fmt_val).unwrap_or_else(|| "-".into()),
            p.expected_high.map(fmt_val).unwrap_or_else(|| "-".into()),
            fmt_val(p.volume),
        ));
    }
    // Vertical markers: changes (labels at the top), incident times (labels at the bottom).
    let mut top: Vec<(i64, String, &'static str, &'static str)> = Vec::new();
    for c in changes {
        if let Some(a) = c.applied_ms.filter(|a| inside(*a)) {
            top.push((
                a,
                format!("{} applied", c.change_id),
                "change-marker applied",
                "#7b1fa2",
            ));
        }
        if let Some(r) = c.rolled_back_ms.filter(|r| inside(*r)) {
            top.push((
                r,
                format!("{} rolled back", c.change_id),
                "change-marker rolled-back",
                "#00897b",
            ));
        }
    }
    let mut bottom: Vec<(i64, String, &'static str, &'static str)> = Vec::new();
    for (t, label, class, color) in [
        (Some(inc.onset_ms), "onset", "onset", "#ef6c00"),
        (Some(inc.detected_ms), "detected", "detected", "#c62828"),
        (inc.resolved_ms, "resolved", "resolved", "#2e7d32"),
    ] {
        if let Some(t) = t.filter(|t| inside(*t)) {
            bottom.push((t, label.to_string(), class, color));
        }
    }
    let width_of = |s: &str| s.chars().count() as f64 * 6.3 + 6.0;
    let top_rows = label_rows(
        &top.iter()
            .map(|(t, l, ..)| (x(*t), width_of(l)))
            .collect::<Vec<_>>(),
    );
    let bottom_rows = label_rows(
        &bottom
            .iter()
            .map(|(t, l, ..)| (x(*t), width_of(l)))
            .collect::<Vec<_>>(),
    );
    for (k, (t, label, class, color)) in top.iter().enumerate() {
        let xx = x(*t);
        let dash = if class.contains("rolled-back") {
            " stroke-dasharray=\"5 3\""
        } else {
            ""
        };
        let ly = M_TOP + 13.0 + 14.0 * top_rows[k] as f64;
        svg.push_str(&format!(
            "<g class=\"{class}\"><line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{M_TOP}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"13\" fill=\"#fff\" fill-opacity=\"0.85\"/><text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"{color}\" font-weight=\"600\">{}</text><title>{} at {}</title></g>",
            M_TOP + ph,
            xx + 2.0,
            ly - 10.5,
            width_of(label) - 2.0,
            xx + 4.0,
            esc(label),
            esc(label),
            fmt_time(*t),
        ));
    }
    for (k, (t, label, class, color)) in bottom.iter().enumerate() {
        let xx = x(*t);
        let ly = M_TOP + ph - 5.0 - 14.0 * bottom_rows[k] as f64;
        svg.push_str(&format!(
            "<g class=\"{class}\"><line class=\"{class}\" x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{M_TOP}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"1.5\" stroke-dasharray=\"2 3\"/><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"13\" fill=\"#fff\" fill-opacity=\"0.85\"/><text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"{color}\" font-weight=\"600\">{}</text><title>{} at {}</title></g>",
            M_TOP + ph,
            xx + 2.0,
            ly - 10.5,
            width_of(label) - 2.0,
            xx + 4.0,
            label,
            label,
            fmt_time(*t),
        ));
    }
    if h.is_empty() {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#777\">no closed windows of this series yet</text>",
            M_LEFT + pw / 2.0,
            M_TOP + ph / 2.0
        ));
    }
    svg.push_str("</svg>");
    (svg, drew_set)
}

/// The chart's legend; `onset_set`: the chart shows the onset's confidence set.
fn legend(onset_set: bool) -> String {
    let mut out = String::from("<p class=\"legend\">\
<span><i class=\"sw\" style=\"border-top:2px solid #0b2f6b;height:0\"></i>observed</span>\
<span><i class=\"sw\" style=\"border-top:2px dashed #3a5a85;height:0\"></i>expected</span>\
<span><i class=\"sw\" style=\"background:#8fb3e0;opacity:.6\"></i>99% band</span>\
<span><i class=\"sw\" style=\"background:#d32f2f;width:.6em;height:.6em;border-radius:50%\"></i>outside the band</span>\
<span><i class=\"sw\" style=\"background:#fde8e8\"></i>incident</span>");
    if onset_set {
        out.push_str("<span class=\"legend-onset\"><i class=\"sw\" style=\"border-top:2px dotted #ef6c00;height:0\"></i>onset (estimate)</span>\
<span class=\"legend-onset-set\"><i class=\"sw\" style=\"background:#ffb74d;opacity:.6;outline:1px dashed #ef6c00\"></i>onset 95% set</span>");
    }
    out.push_str("<span><i class=\"sw\" style=\"border-top:2px solid #7b1fa2;height:0\"></i>change applied</span>\
<span><i class=\"sw\" style=\"border-top:2px dashed #00897b;height:0\"></i>change rolled back</span></p>");
    out
}

/// The window length for an incident's page: the engine's when known, else the spacing of
/// the series' history, else 5 minutes.
fn window_of(h: &[HistoryPoint], known: i64) -> i64 {
    if known > 0 {
        return known;
    }
    h.windows(2)
        .map(|p| p[1].start_ms - p[0].start_ms)
        .filter(|d| *d > 0)
        .min()
        .unwrap_or(300_000)
}

/// The onset's 95% confidence set as a time span: from its first window's start to its last
/// window's end (`onset_high_ms` is the last window's start).
fn onset_span(inc: &Incident, win: i64) -> Option<(i64, i64)> {
    let (a, b) = (inc.onset_low_ms?, inc.onset_high_ms?);
    Some((a.min(b), a.max(b) + win))
}

fn windows_str(n: i64) -> String {
    format!("{n} window{}", if n == 1 { "" } else { "s" })
}

/// A time shown next to `reference`: `HH:MM` (`HH:MM:SS` off the minute) on the same UTC
/// day, else with its date.
fn near_time(ms: i64, reference: i64) -> String {
    let (Some(t), Some(r)) = (
        chrono::DateTime::from_timestamp_millis(ms),
        chrono::DateTime::from_timestamp_millis(reference),
    ) else {
        return fmt_time(ms);
    };
    let clock = if ms.rem_euclid(60_000) == 0 {
        "%H:%M"
    } else {
        "%H:%M:%S"
    };
    if t.date_naive() == r.date_naive() {
        t.format(clock).to_string()
    } else {
        t.format(&format!("%Y-%m-%d {clock}")).to_string()
    }
}

/// The onset's 95% confidence set in words, e.g. `95% set 13:50 to 14:15 UTC (5 windows)`;
/// `None` for incidents without one (guards that are not a drop, spike or shift).
fn onset_set_text(inc: &Incident, win: i64) -> Option<String> {
    let (a, b) = onset_span(inc, win)?;
    Some(format!(
        "95% set {} to {} UTC ({})",
        near_time(a, inc.onset_ms),
        near_time(b, inc.onset_ms),
        windows_str((b - a) / win.max(1))
    ))
}

/// An incident's group on its page: a line under the title ("Group grp-... with 3
/// incidents", linking to the group's list) and a section listing the other members, from
/// this instance and its peers. Both empty when the incident has no group.
async fn group_html(s: &ApiState, headers: &HeaderMap, inc: &Incident) -> (String, String) {
    let g = inc.group_id.as_str();
    if g.is_empty() {
        return (String::new(), String::new());
    }
    let (members, peers) = group_incidents(s, headers, "/incidents?format=json", Some(g)).await;
    let all: Vec<&serde_json::Value> = members.iter().collect();
    let link = format!(
        "<a href=\"{}\"><code>{}</code></a>",
        esc(&group_href(g)),
        esc(g)
    );
    let line = format!(
        "<p class=\"group-summary\" data-group=\"{}\" data-members=\"{}\">Group {link} with {}.</p>",
        esc(g),
        all.len(),
        count_str(&all)
    );
    let why = match inc.candidates.first() {
        Some(c) => format!(
            "incidents whose top candidate is change <code>{}</code>",
            esc(&c.change_id)
        ),
        None => "incidents without a candidate change whose onset sets meet, on nested series"
            .to_string(),
    };
    let mut rows = String::new();
    for v in all
        .iter()
        .filter(|v| v["id"].as_str() != Some(inc.id.as_str()))
    {
        rows.push_str(&format!(
            "<tr class=\"member\"><td><a href=\"/incidents/{}\">{}</a></td><td class=\"{st}\">{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            pct_encode(v["id"].as_str().unwrap_or("")),
            esc(v["id"].as_str().unwrap_or("-")),
            esc(v["metric"].as_str().unwrap_or("-")),
            esc(&v["series"].as_object().map(series_str).unwrap_or_default()),
            esc(v["kind"].as_str().unwrap_or("-")),
            esc(v["onset"].as_str().unwrap_or("-")),
            esc(v["detected_at"].as_str().unwrap_or("-")),
            st = json_status(v),
        ));
    }
    if rows.is_empty() {
        rows.push_str(
            "<tr><td colspan=\"7\" class=\"muted\">no other incident in this group</td></tr>",
        );
    }
    let mut notes = String::new();
    for p in peers.iter().filter(|p| p.status != "ok") {
        notes.push_str(&format!(
            "<p class=\"firing\">Incomplete: peer {} could not be asked ({}); its members are missing here.</p>",
            esc(&p.url),
            esc(p.error.as_deref().unwrap_or(p.status))
        ));
    }
    if Peers::is_forwarded(headers) {
        notes.push_str(&format!(
            "<p class=\"muted\">Members as known to the instance that holds this incident; the group's <a href=\"{}\">list</a> asks every instance.</p>",
            esc(&group_href(g))
        ));
    }
    let section = format!(
        "<h2>Group</h2><p>Group {link} with {}: {why}.</p>{notes}<table><tr><th>incident</th><th>status</th><th>metric</th><th>series</th><th>kind</th><th>onset</th><th>detected</th></tr>{rows}</table>",
        count_str(&all)
    );
    (line, section)
}

async fn incident_page(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let snap = s.snap();
    let Some(i) = snap.incidents.iter().find(|i| i.incident.id == id) else {
        return incident_from_peers(&s, &headers, "/incidents", &id).await;
    };
    let inc = &i.incident;
    let d = &inc.decision;
    let change_of = |id: &str| snap.changes.iter().find(|c| c.change_id == id);
    let mut cands = String::new();
    for c in &inc.candidates {
        let ch = change_of(&c.change_id);
        cands.push_str(&format!(
            "<tr><td><code>{}</code></td><td class=\"num\">{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.change_id),
            c.score,
            esc(&c.evidence),
            ch.map(|c| esc(&format!("{} {}", c.actor.kind, c.actor.name)))
                .unwrap_or_default(),
            ch.and_then(|c| c.tier).map(|t| t.as_str()).unwrap_or("-"),
            esc(ch.and_then(|c| c.description.as_deref()).unwrap_or("-")),
            esc(&fmt_opt_time(ch.and_then(|c| c.applied_ms))),
            esc(&fmt_opt_time(ch.and_then(|c| c.rolled_back_ms))),
        ));
    }
    if cands.is_empty() {
        cands.push_str("<tr><td colspan=\"8\" class=\"muted\">no change in force explains this incident</td></tr>");
    }
    let mut segs = String::new();
    for sg in &inc.top_segments {
        segs.push_str(&format!(
            "<tr><td>{}</td><td class=\"num\">{:.1}%</td></tr>",
            esc(&series_str(&sg.dims)),
            sg.contribution * 100.0
        ));
    }
    if segs.is_empty() {
        segs.push_str("<tr><td colspan=\"2\" class=\"muted\">none</td></tr>");
    }
    let mut trail = String::new();
    for e in &inc.trail {
        trail.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td class=\"muted\">{}</td></tr>",
            esc(&e.at),
            esc(e.action),
            esc(&e.actor.kind),
            esc(&e.actor.name),
            esc(e.change_id.as_deref().unwrap_or("-")),
            esc(&e.audit_id),
        ));
    }
    if trail.is_empty() {
        trail.push_str("<tr><td colspan=\"6\" class=\"muted\">no entries</td></tr>");
    }
    let mut hist = String::new();
    for p in i.history.iter().rev() {
        let f = |x: Option<f64>| x.map(fmt_val).unwrap_or_else(|| "-".into());
        hist.push_str(&format!(
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&fmt_time(p.start_ms)),
            f(p.observed),
            f(p.expected),
            f(p.expected_low),
            f(p.expected_high),
            fmt_val(p.volume),
        ));
    }
    let win = window_of(&i.history, snap.window_ms);
    let (chart, drew_set) = chart_svg(i, &snap.changes, win);
    let legend = legend(drew_set);
    let onset = match onset_set_text(inc, win) {
        Some(set) => format!("{}, {set}", i.onset),
        None => i.onset.clone(),
    };
    let (group_line, group_section) = group_html(&s, &headers, inc).await;
    // What people and deadlines add to the decision, and the guard's own evidence.
    let mut govern = String::new();
    let mut row = |k: &str, v: String| {
        govern.push_str(&format!("<tr><th>{k}</th><td>{}</td></tr>", esc(&v)));
    };
    if let Some(dl) = &d.deadline {
        row("deadline", dl.clone());
    }
    if let Some(a) = &d.decided_by {
        row("decided by", format!("{} {}", a.kind, a.name));
    }
    if let Some(a) = &d.acknowledged_by {
        row("acknowledged by", format!("{} {}", a.kind, a.name));
    }
    if d.escalated {
        row("escalated", "yes: nobody decided in time".into());
    }
    if d.shadow {
        row("shadow mode", "decided and audited, not acted on".into());
    }
    if let Some(c) = inc.comparison {
        row("comparison", c.to_string());
    }
    if let Some(e) = &inc.evidence {
        row("evidence", e.clone());
    }
    if let Some(s) = inc
        .local_gain_global_loss
        .as_ref()
        .and_then(|v| v["summary"].as_str())
    {
        row("local gain, global loss", s.to_string());
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{id} &middot; {metric}</title><style>{STYLE}</style></head><body>\
<p><a href=\"/incidents\">&larr; all incidents</a></p>\
<h1>{metric} {kind} <span class=\"{st}\">{st}</span></h1>\
<p class=\"muted\">Incident <code>{id}</code> &middot; series {series} &middot; severity {sev}</p>{group_line}\
<p>Observed <b>{obs}</b> against expected <b>{exp}</b> (99% band {lo} to {hi}): effect <b>{eff:+.1}%</b>. \
<b>Decision:</b> <span class=\"action\">{action}</span>{chg}.</p>\
<div class=\"chartbox\">{chart}{legend}</div>\
<h2>Evidence</h2><table class=\"kv\">\
<tr><th>metric</th><td>{metric}</td></tr><tr><th>series</th><td>{series}</td></tr>\
<tr><th>kind</th><td>{kind}</td></tr><tr><th>severity</th><td>{sev}</td></tr>\
<tr><th>status</th><td class=\"{st}\">{st}{resolution}</td></tr>\
<tr><th>observed</th><td class=\"num\">{obs}</td></tr><tr><th>expected</th><td class=\"num\">{exp}</td></tr>\
<tr><th>99% band</th><td class=\"num\">{lo} to {hi}</td></tr>\
<tr><th>effect</th><td class=\"num\">{eff:+.1}%</td></tr><tr><th>score</th><td class=\"num\">{score:.2}</td></tr>\
<tr><th>onset</th><td class=\"onset\">{onset}</td></tr><tr><th>detected</th><td>{det} ({dw} windows, {de:.0} events after onset)</td></tr>\
<tr><th>resolved</th><td>{res}</td></tr></table>\
<h2>Decision</h2><table class=\"kv\">\
<tr><th>action</th><td class=\"action\">{action}</td></tr><tr><th>change</th><td>{dchange}</td></tr>\
<tr><th>tier</th><td>{tier}</td></tr><tr><th>policy</th><td><code>{policy}</code></td></tr>\
<tr><th>reason</th><td>{reason}</td></tr>{govern}<tr><th>rollback id</th><td><code>{rb}</code></td></tr></table>\
{group_section}\
<h2>Candidate changes</h2><table><tr><th>change</th><th>score</th><th>evidence</th><th>actor</th><th>tier</th><th>description</th><th>applied</th><th>rolled back</th></tr>{cands}</table>\
<h2>Top segments</h2><table><tr><th>segment</th><th>contribution</th></tr>{segs}</table>\
<h2>Decision trail</h2><table><tr><th>at</th><th>action</th><th>actor kind</th><th>actor</th><th>change</th><th>audit id</th></tr>{trail}</table>\
<details><summary>Recent windows ({n})</summary><table><tr><th>window start</th><th>observed</th><th>expected</th><th>band low</th><th>band high</th><th>volume</th></tr>{hist}</table></details>\
<p><a href=\"/incidents\">&larr; all incidents</a></p>\
</body></html>",
        id = esc(&inc.id),
        metric = esc(&inc.metric),
        kind = esc(inc.kind),
        govern = govern,
        sev = esc(inc.severity),
        st = status_str(inc),
        resolution = inc
            .resolution
            .as_deref()
            .map(|r| format!(" ({})", esc(r)))
            .unwrap_or_default(),
        series = esc(&series_str(&inc.series)),
        onset = esc(&onset),
        det = esc(&i.detected_at),
        dw = inc.delay_windows,
        de = inc.delay_events,
        res = esc(i.resolved_at.as_deref().unwrap_or("-")),
        obs = fmt_val(inc.observed),
        exp = fmt_val(inc.expected),
        lo = fmt_val(inc.expected_low),
        hi = fmt_val(inc.expected_high),
        eff = inc.effect * 100.0,
        score = inc.score,
        action = d.action.as_str(),
        chg = d
            .change_id
            .as_deref()
            .map(|c| format!(" for <code>{}</code>", esc(c)))
            .unwrap_or_default(),
        dchange = esc(d.change_id.as_deref().unwrap_or("-")),
        tier = d.tier.map(|t| t.as_str()).unwrap_or("-"),
        policy = esc(&d.policy),
        reason = esc(&d.reason),
        rb = esc(inc.rollback_id.as_deref().unwrap_or("-")),
        n = i.history.len(),
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::IncidentHead;
    use serde_json::json;

    const MIN: i64 = 60_000;
    /// 2026-11-22T14:00:00Z.
    const T14: i64 = 1_795_356_000_000;

    fn incident(id: &str, series: serde_json::Value, group: &str) -> Incident {
        let mut inc = Incident::blank(IncidentHead {
            id: id.into(),
            metric: "conversion_rate".into(),
            metric_idx: Some(0),
            series_idx: Some(0),
            label: String::new(),
            series: series.as_object().cloned().unwrap_or_default(),
            kind: "drop",
            severity: "page",
            onset_ms: T14,
            detected_ms: T14 + 20 * MIN,
        });
        inc.group_id = group.into();
        inc
    }

    fn view(inc: Incident, history: Vec<HistoryPoint>) -> IncidentView {
        IncidentView {
            onset: fmt_time(inc.onset_ms),
            detected_at: fmt_time(inc.detected_ms),
            resolved_at: inc.resolved_ms.map(fmt_time),
            incident: inc,
            history,
        }
    }

    /// Two hours of 5-minute windows from 12:30, flat at 0.05 with a band.
    fn history() -> Vec<HistoryPoint> {
        (0..24)
            .map(|k| HistoryPoint {
                start_ms: T14 - 90 * MIN + k * 5 * MIN,
                observed: Some(0.05),
                volume: 1000.0,
                expected: Some(0.05),
                expected_low: Some(0.045),
                expected_high: Some(0.055),
            })
            .collect()
    }

    fn brief(
        id: &str,
        group: Option<&str>,
        dims: usize,
        score: f64,
        detected: i64,
    ) -> serde_json::Value {
        let series: serde_json::Map<String, serde_json::Value> =
            [("country", "FR"), ("device", "mobile")]
                .iter()
                .take(dims)
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
        let mut v = json!({"id": id, "metric": "conversion_rate", "series": series,
            "score": score, "detected_ms": detected, "status": "firing"});
        if let Some(g) = group {
            v["group_id"] = json!(g);
        }
        v
    }

    fn ids(g: &[&serde_json::Value]) -> Vec<String> {
        g.iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn api_groups_lead_with_the_most_specific_series() {
        let list = vec![
            brief("total", Some("grp-a"), 0, 9.0, 100),
            brief("fr", Some("grp-a"), 1, 5.0, 200),
            brief("fr-mobile", Some("grp-a"), 2, 1.0, 220),
            brief("be", Some("grp-a"), 1, 7.0, 150),
            brief("old-peer", None, 1, 3.0, 300),
            brief("empty-group", Some(""), 0, 3.0, 50),
            brief("alone", Some("grp-b"), 0, 3.0, 250),
        ];
        let groups = group_by_cause(&list);
        let got: Vec<Vec<String>> = groups.iter().map(|g| ids(g)).collect();
        assert_eq!(
            got,
            vec![
                vec!["old-peer".to_string()],
                vec!["alone".to_string()],
                // Leader: two dims; then the others by detection.
                vec!["fr-mobile".into(), "total".into(), "be".into(), "fr".into()],
                vec!["empty-group".to_string()],
            ]
        );
        // Ties on dims: the highest score, then the earliest detection.
        let list = vec![
            brief("fr", Some("g"), 1, 5.0, 200),
            brief("be", Some("g"), 1, 7.0, 150),
        ];
        assert_eq!(ids(&group_by_cause(&list)[0]), ["be", "fr"]);
        let list = vec![
            brief("late", Some("g"), 1, 5.0, 200),
            brief("early", Some("g"), 1, 5.0, 150),
        ];
        assert_eq!(ids(&group_by_cause(&list)[0]), ["early", "late"]);
        // The order of arrival never matters.
        let mut list = vec![
            brief("a", Some("g"), 1, 5.0, 150),
            brief("b", Some("g"), 1, 5.0, 150),
        ];
        let first = ids(&group_by_cause(&list)[0]);
        list.reverse();
        assert_eq!(ids(&group_by_cause(&list)[0]), first);
    }

    #[test]
    fn api_onset_set_text_spans_its_windows() {
        let mut inc = incident("i", json!({}), "g");
        assert_eq!(onset_set_text(&inc, 5 * MIN), None);
        inc.onset_low_ms = Some(T14 - 10 * MIN);
        inc.onset_high_ms = Some(T14 + 10 * MIN);
        assert_eq!(
            onset_set_text(&inc, 5 * MIN).unwrap(),
            "95% set 13:50 to 14:15 UTC (5 windows)"
        );
        inc.onset_low_ms = Some(T14);
        inc.onset_high_ms = Some(T14);
        assert_eq!(
            onset_set_text(&inc, 5 * MIN).unwrap(),
            "95% set 14:00 to 14:05 UTC (1 window)"
        );
        // Across midnight: the other day's end carries its date.
        inc.onset_ms = T14 + 595 * MIN; // 23:55
        inc.onset_low_ms = Some(inc.onset_ms - 5 * MIN);
        inc.onset_high_ms = Some(inc.onset_ms);
        assert_eq!(
            onset_set_text(&inc, 5 * MIN).unwrap(),
            "95% set 23:50 to 2026-11-23 00:00 UTC (2 windows)"
        );
    }

    #[test]
    fn api_chart_shades_the_onset_set() {
        let mut inc = incident("i", json!({"country": "FR"}), "g");
        let (svg, drew) = chart_svg(&view(inc.clone(), history()), &[], 5 * MIN);
        assert!(!drew && !svg.contains("onset-set"), "no set, no band");
        inc.onset_low_ms = Some(T14 - 10 * MIN);
        inc.onset_high_ms = Some(T14 + 10 * MIN);
        let (svg, drew) = chart_svg(&view(inc, history()), &[], 5 * MIN);
        assert!(drew);
        let tag = &svg[svg.find("<rect class=\"onset-set\"").expect("band")..];
        let num = |name: &str| -> f64 {
            let k = format!(" {name}=\"");
            let i = tag.find(&k).unwrap() + k.len();
            tag[i..].split('"').next().unwrap().parse().unwrap()
        };
        // The chart spans 12:30 to 14:30 over the plot's width; the set 13:50 to 14:15.
        let pw = CHART_W - M_LEFT - M_RIGHT;
        let x = |t: i64| M_LEFT + (t - (T14 - 90 * MIN)) as f64 / (120 * MIN) as f64 * pw;
        assert!((num("x") - x(T14 - 10 * MIN)).abs() < 0.2, "{tag:.200}");
        assert!((num("width") - (x(T14 + 15 * MIN) - x(T14 - 10 * MIN))).abs() < 0.2);
        assert!(tag.contains("95% confidence set"));
        // The onset estimate's line is still drawn, inside the band.
        assert!(svg.contains("<line class=\"onset\""));
        assert!(legend(true).contains("onset 95% set"));
        assert!(!legend(false).contains("onset 95% set"));
    }

    async fn body(r: Response) -> String {
        let b = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn api_pages_show_the_onset_set_and_the_groups() {
        let s = ApiState::new(Arc::new(Telemetry::new()));
        let mut lead = incident("inc-fr", json!({"country": "FR"}), "grp-<1>");
        lead.onset_low_ms = Some(T14 - 10 * MIN);
        lead.onset_high_ms = Some(T14 + 10 * MIN);
        let mut total = incident("inc-total", json!({}), "grp-<1>");
        total.score = 9.0;
        let other = incident("inc-other", json!({}), "grp-2");
        s.publish(Snapshot {
            incidents: vec![
                view(total, history()),
                view(lead, history()),
                view(other, history()),
            ],
            window_ms: 5 * MIN,
            ..Snapshot::default()
        });
        let page = |q: PageQuery| {
            incidents_page(State(s.clone()), HeaderMap::new(), axum::extract::Query(q))
        };
        let list = body(
            page(PageQuery {
                format: None,
                group: None,
            })
            .await,
        )
        .await;
        assert_eq!(
            list.matches("<tr class=\"group-row\">").count(),
            2,
            "{list}"
        );
        assert!(!list.contains("grp-<1>"), "the group id is escaped");
        assert!(
            list.contains("data-group=\"grp-&lt;1&gt;\" data-members=\"2\""),
            "{list}"
        );
        assert!(
            list.contains("href=\"/incidents?group=grp-%3C1%3E\""),
            "{list}"
        );
        // The leader (the segment) has the row; the total is listed under it.
        let row = list
            .split("<tr class=\"group-row\">")
            .find(|r| r.contains("grp-&lt;1&gt;"))
            .unwrap();
        assert!(
            row.starts_with("<td><a href=\"/incidents/inc-fr\">"),
            "{row}"
        );
        assert!(
            row.contains("<a href=\"/incidents/inc-total\">conversion_rate total</a>"),
            "{row}"
        );

        let one = body(
            page(PageQuery {
                format: None,
                group: Some("grp-<1>".into()),
            })
            .await,
        )
        .await;
        assert_eq!(one.matches("<tr class=\"incident\">").count(), 2, "{one}");
        assert!(one.contains("data-members=\"2\""));
        assert!(!one.contains("inc-other"));
        let json = body(
            page(PageQuery {
                format: Some("json".into()),
                group: Some("grp-2".into()),
            })
            .await,
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["incidents"].as_array().unwrap().len(), 1);
        assert_eq!(v["incidents"][0]["group_id"], "grp-2");

        let r = incident_page(State(s.clone()), Path("inc-fr".into()), HeaderMap::new()).await;
        let p = body(r).await;
        assert!(
            p.contains("2026-11-22T14:00:00.000Z, 95% set 13:50 to 14:15 UTC (5 windows)"),
            "{p}"
        );
        assert!(p.contains("<rect class=\"onset-set\""));
        assert!(p.contains("onset 95% set"));
        assert!(p.contains("Group <a href=\"/incidents?group=grp-%3C1%3E\"><code>grp-&lt;1&gt;</code></a> with 2 incidents, 2 firing."), "{p}");
        assert!(
            p.contains("<tr class=\"member\"><td><a href=\"/incidents/inc-total\">inc-total</a>")
        );
        assert!(!p.contains("grp-<1>"));
        // Without a set, no band and no legend entry.
        let p =
            body(incident_page(State(s.clone()), Path("inc-total".into()), HeaderMap::new()).await)
                .await;
        assert!(!p.contains("onset-set") && !p.contains("95% set"));
    }
}
