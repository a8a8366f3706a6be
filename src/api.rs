//! HTTP: `/metrics`, `/healthz`, `/readyz`, the incident and change API, and incident pages.
//!
//! The engine publishes a snapshot after each batch that changed something; handlers read the
//! snapshot and never touch the engine, so the hot path takes no lock per event.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::attribute::ChangeState;
use crate::engine::{Engine, HistoryPoint, Incident};
use crate::event::fmt_time;
use crate::telemetry::Telemetry;

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
                    history: eng.series[i.series_idx].history(last, eng.window_ms(), eng.band_z()),
                })
                .collect(),
            changes: eng.registry.all().cloned().collect(),
            watermark: eng.watermark_ms().map(fmt_time),
            series: eng.series_count(),
        }
    }
}

pub struct ApiState {
    pub telemetry: Arc<Telemetry>,
    pub ready: AtomicBool,
    /// Why not ready, for `/readyz`.
    pub not_ready_reason: RwLock<String>,
    pub snapshot: RwLock<Arc<Snapshot>>,
}

impl ApiState {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<ApiState> {
        Arc::new(ApiState {
            telemetry,
            ready: AtomicBool::new(false),
            not_ready_reason: RwLock::new("starting: not yet assigned any partition".into()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
        })
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
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/incidents", get(list_incidents))
        .route("/api/incidents/{id}", get(get_incident))
        .route("/api/changes", get(list_changes))
        .route("/incidents", get(incidents_page))
        .route("/incidents/{id}", get(incident_page))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
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

async fn list_incidents(State(s): State<Arc<ApiState>>) -> Response {
    let snap = s.snap();
    Json(serde_json::json!({"incidents": snap.incidents, "watermark": snap.watermark}))
        .into_response()
}

async fn get_incident(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let snap = s.snap();
    match snap.incidents.iter().find(|i| i.incident.id == id) {
        Some(i) => Json(i).into_response(),
        None => not_found(&id),
    }
}

async fn list_changes(State(s): State<Arc<ApiState>>) -> Response {
    Json(serde_json::json!({"changes": s.snap().changes})).into_response()
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "not_found", "message": format!("no incident {id}")})),
    )
        .into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.firing{color:#b00}.resolved{color:#070}";

async fn incidents_page(State(s): State<Arc<ApiState>>) -> Html<String> {
    let snap = s.snap();
    let mut rows = String::new();
    for i in snap.incidents.iter().rev() {
        let inc = &i.incident;
        let st = if inc.status == crate::engine::IncidentStatus::Firing {
            "firing"
        } else {
            "resolved"
        };
        rows.push_str(&format!(
            "<tr><td><a href=\"/incidents/{id}\">{id}</a></td><td class=\"{st}\">{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{:+.1}%</td><td>{}</td></tr>",
            esc(&inc.metric),
            esc(&serde_json::Value::Object(inc.series.clone()).to_string()),
            inc.kind,
            inc.effect * 100.0,
            esc(&i.detected_at),
            id = esc(&inc.id),
        ));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>guardrail incidents</title><style>{STYLE}</style></head><body><h1>Incidents</h1><p>watermark {}</p><table><tr><th>id</th><th>status</th><th>metric</th><th>series</th><th>kind</th><th>effect</th><th>detected</th></tr>{rows}</table></body></html>",
        esc(snap.watermark.as_deref().unwrap_or("-"))
    ))
}

async fn incident_page(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let snap = s.snap();
    let Some(i) = snap.incidents.iter().find(|i| i.incident.id == id) else {
        return not_found(&id);
    };
    let inc = &i.incident;
    let mut cands = String::new();
    for c in &inc.candidates {
        cands.push_str(&format!(
            "<tr><td>{}</td><td>{:.3}</td><td>{}</td></tr>",
            esc(&c.change_id),
            c.score,
            esc(&c.evidence)
        ));
    }
    let mut segs = String::new();
    for sg in &inc.top_segments {
        segs.push_str(&format!(
            "<tr><td>{}</td><td>{:.1}%</td></tr>",
            esc(&serde_json::Value::Object(sg.dims.clone()).to_string()),
            sg.contribution * 100.0
        ));
    }
    let mut hist = String::new();
    for p in &i.history {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.5}")).unwrap_or_else(|| "-".into());
        hist.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&fmt_time(p.start_ms)),
            f(p.observed),
            f(p.expected)
        ));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{id}</title><style>{STYLE}</style></head><body>\
<h1>{metric} {kind} <span class=\"{st}\">{st}</span></h1>\
<p>Series {series} &middot; onset {onset} &middot; detected {det} &middot; resolved {res}</p>\
<p>Observed {obs:.5} against expected {exp:.5} (99% band {lo:.5} to {hi:.5}), effect {eff:+.1}%.</p>\
<h2>Decision</h2><p><b>{action}</b> ({policy}): {reason}</p>\
<h2>Candidate changes</h2><table><tr><th>change</th><th>score</th><th>evidence</th></tr>{cands}</table>\
<h2>Top segments</h2><table><tr><th>segment</th><th>contribution</th></tr>{segs}</table>\
<h2>Recent windows</h2><table><tr><th>window</th><th>observed</th><th>expected</th></tr>{hist}</table>\
</body></html>",
        id = esc(&inc.id),
        metric = esc(&inc.metric),
        kind = inc.kind,
        st = if inc.resolved_ms.is_some() { "resolved" } else { "firing" },
        series = esc(&serde_json::Value::Object(inc.series.clone()).to_string()),
        onset = esc(&i.onset),
        det = esc(&i.detected_at),
        res = esc(i.resolved_at.as_deref().unwrap_or("-")),
        obs = inc.observed,
        exp = inc.expected,
        lo = inc.expected_low,
        hi = inc.expected_high,
        eff = inc.effect * 100.0,
        action = inc.decision.action.as_str(),
        policy = inc.decision.policy,
        reason = esc(&inc.decision.reason),
    ))
    .into_response()
}
