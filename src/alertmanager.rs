//! Optional push of alerts to a Prometheus Alertmanager (API v2, `POST /api/v2/alerts`).
//!
//! The Kafka alerts topic stays the contract; this is a convenience for teams that route pages
//! through Alertmanager. A background task owns the firing alerts: the flush path hands it every
//! [`Alert`] through a bounded channel with `try_send` (the pipeline never waits; drops are
//! counted), the task posts new state at once and re-posts every firing alert each
//! `resend_interval_secs` with `endsAt = now + 4 x interval`, as Alertmanager expects. A resolved
//! alert is posted with `endsAt = resolved_at` until one post succeeds. Failed posts are retried
//! on the next tick, logged rate-limited and counted in
//! `guardrail_alertmanager_posts_total{result}`.
//!
//! The HTTP client is a minimal HTTP/1.1 client over [`tokio::net::TcpStream`] (plain `http://`
//! only): one request per connection, `Content-Length` bodies, chunked or sized responses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::{AlertmanagerConfig, Config, MetricKind};
use crate::event::{fmt_time, now_ms, parse_time_str};
use crate::sink::Alert;
use crate::telemetry::Telemetry;

/// Alerts waiting for the task beyond this are dropped (and counted).
const QUEUE: usize = 4096;
/// Largest response read from Alertmanager.
const MAX_RESPONSE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid Alertmanager URL {0:?}: {1}")]
    Url(String, &'static str),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: malformed HTTP response: {1}")]
    Malformed(String, &'static str),
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// An `http://host:port/prefix` URL split for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` (port 80 added when missing).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, Error> {
        let bad = |why| Error::Url(url.to_string(), why);
        if url.starts_with("https://") {
            return Err(bad(
                "https is not supported by the built-in client; use http:// (e.g. via a local TLS-terminating proxy)",
            ));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("must start with http://"))?;
        let (host, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
            return Err(bad("needs a host (user info and spaces are not supported)"));
        }
        let has_port = match host.rfind(':') {
            Some(i) => !host[i..].contains(']'),
            None => false,
        };
        let authority = if has_port {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(HttpUrl { authority, path })
    }

    /// This base URL with `suffix` appended to its path (one `/` between them).
    pub fn join(&self, suffix: &str) -> HttpUrl {
        HttpUrl {
            authority: self.authority.clone(),
            path: format!(
                "{}/{}",
                self.path.trim_end_matches('/'),
                suffix.trim_start_matches('/')
            ),
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// One HTTP/1.1 request (`Connection: close`); returns status and body. JSON bodies only.
pub async fn request(
    method: &str,
    url: &HttpUrl,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), Error> {
    let name = url.to_string();
    match tokio::time::timeout(timeout, request_inner(method, url, body, &name)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(name, timeout)),
    }
}

async fn request_inner(
    method: &str,
    url: &HttpUrl,
    body: Option<&[u8]>,
    name: &str,
) -> Result<(u16, Vec<u8>), Error> {
    let mut s = tokio::net::TcpStream::connect(&url.authority)
        .await
        .map_err(|e| Error::Connect(url.authority.clone(), e))?;
    let _ = s.set_nodelay(true);
    let mut req = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: guardrail/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes();
    if let Some(b) = body {
        req.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    let io = |e| Error::Io(name.to_string(), e);
    s.write_all(&req).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(Error::Malformed(name.to_string(), "response too large"));
        }
        if response_complete(&buf) {
            break;
        }
    }
    parse_response(&buf).map_err(|why| Error::Malformed(name.to_string(), why))
}

/// Whether `buf` holds a whole response whose length is known (sized or chunked).
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return decode_chunked(body).is_ok();
    }
    match header_value(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => body.len() >= n,
        None => false,
    }
}

fn header_value<'a>(head_lower: &'a str, name: &str) -> Option<&'a str> {
    head_lower.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), &'static str> {
    let end = find(buf, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .lines()
        .next()
        .filter(|l| l.starts_with("http/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("no status line")?;
    let body = &buf[end + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        decode_chunked(body)?
    } else if let Some(n) =
        header_value(&head, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        body.get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// Decodes a complete chunked body; `Err` if it is incomplete or malformed.
fn decode_chunked(mut b: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or("incomplete chunk size")?;
        let size_txt = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        // A size from the network: checked, never trusted to fit in the arithmetic.
        let end = size.checked_add(2).ok_or("chunk size out of range")?;
        if b.len() < end {
            return Err("incomplete chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// One element of the `POST /api/v2/alerts` body.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
}

/// Labels that guardrail sets itself; a series dim with one of these names gets a `dim_` prefix.
const RESERVED: [&str; 10] = [
    "alertname",
    "change_owner",
    "metric",
    "severity",
    "tier",
    "owner",
    "team",
    "incident_id",
    "series",
    "kind",
];

/// An Alertmanager label name (`[a-zA-Z_][a-zA-Z0-9_]*`) for a dimension name.
pub fn label_name(dim: &str) -> String {
    let mut s: String = dim
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    // `__` names are reserved for Alertmanager/Prometheus internals.
    if s.starts_with("__") {
        s.insert_str(0, "dim");
    }
    if RESERVED.contains(&s.as_str()) {
        s.insert_str(0, "dim_");
    }
    s
}

fn json_str(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `country=FR,device=mobile`, or `total` for the series over all segments.
pub fn series_label(series: &serde_json::Map<String, serde_json::Value>) -> String {
    if series.is_empty() {
        return "total".into();
    }
    series
        .iter()
        .map(|(k, v)| format!("{k}={}", json_str(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// How alerts become Alertmanager alerts.
#[derive(Debug, Clone, Default)]
pub struct Mapper {
    /// Overrides the `team` label (else the metric owner).
    pub team: Option<String>,
    /// Kind per metric name (`mean` effects are in per-event standard deviations).
    pub metric_kinds: HashMap<String, MetricKind>,
}

impl Mapper {
    pub fn from_config(cfg: &Config) -> Mapper {
        Mapper {
            team: cfg.alertmanager.team_label.clone(),
            metric_kinds: cfg.metrics().map(|m| (m.name.clone(), m.kind)).collect(),
        }
    }

    pub fn labels(&self, a: &Alert) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        for (k, v) in &a.series {
            let v = json_str(v);
            if !v.is_empty() {
                l.insert(label_name(k), v);
            }
        }
        let owner = a.owner.clone().filter(|o| !o.is_empty());
        let tier = a
            .decision
            .as_ref()
            .and_then(|d| d.tier)
            .map(|t| t.as_str())
            .unwrap_or("none");
        for (k, v) in [
            ("alertname", format!("guardrail_{}", a.kind)),
            ("metric", a.metric.clone()),
            ("severity", a.severity.to_string()),
            ("tier", tier.to_string()),
            ("owner", owner.clone().unwrap_or_else(|| "none".into())),
            (
                "team",
                self.team.clone().or(owner).unwrap_or_else(|| "none".into()),
            ),
            (
                "change_owner",
                a.change_owner.clone().unwrap_or_else(|| "none".into()),
            ),
            ("incident_id", a.incident_id.clone()),
            ("series", series_label(&a.series)),
            // One cause, one notification: receivers `group_by: [group_id]` (or change_id).
            (
                "change_id",
                a.candidate_changes
                    .first()
                    .map(|c| c.change_id.clone())
                    .unwrap_or_else(|| "none".into()),
            ),
            ("group_id", a.group_id.clone()),
        ] {
            l.insert(k.to_string(), v);
        }
        l
    }

    pub fn annotations(&self, a: &Alert) -> BTreeMap<String, String> {
        let sd = matches!(
            self.metric_kinds.get(&a.metric),
            Some(MetricKind::Mean | MetricKind::Gauge)
        );
        let effect = if sd {
            format!("{:+.2} sd", a.effect)
        } else {
            format!("{:+.1}%", a.effect * 100.0)
        };
        let mut summary = format!(
            "{}{{{}}} {}: observed {} vs expected {} (99% band {}..{}), effect {effect}",
            a.metric,
            series_label(&a.series),
            a.kind,
            num(a.observed),
            num(a.expected),
            num(a.expected_low),
            num(a.expected_high),
        );
        if a.status == "resolved" {
            summary.push_str(" [resolved]");
        }
        if let Some(lg) = a
            .local_gain_global_loss
            .as_ref()
            .and_then(|v| v["summary"].as_str())
        {
            summary.push_str(&format!("; {lg}"));
        }
        let mut evidence = match a.candidate_changes.first() {
            Some(c) => format!(
                "top candidate {} (score {:.2}): {}",
                c.change_id, c.score, c.evidence
            ),
            None => "no candidate change in force before the onset".into(),
        };
        if let Some(d) = &a.decision {
            evidence.push_str(&format!(
                ". Decision: {} ({}, policy {}): {}",
                d.action.as_str(),
                d.tier.map(|t| t.as_str()).unwrap_or("no tier"),
                d.policy,
                d.reason
            ));
        }
        if let Some(e) = &a.evidence {
            evidence = format!("{e}. {evidence}");
        }
        let mut m = BTreeMap::new();
        m.insert("summary".into(), summary);
        m.insert("evidence".into(), evidence);
        m.insert("incident_url".into(), a.url.clone());
        m.insert("onset".into(), a.onset.clone());
        if let Some(r) = &a.resolution {
            m.insert("resolution".into(), r.clone());
        }
        m
    }
}

fn num(x: f64) -> String {
    if x != 0.0 && x.abs() < 0.01 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

/// What the task keeps per incident.
#[derive(Debug, Clone)]
struct Entry {
    /// Labels from the first sight of the incident, so its resolve matches its firing alert.
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_ms: i64,
    starts_at: String,
    generator_url: String,
    /// Set once the incident resolved: `endsAt`.
    ends_ms: Option<i64>,
}

/// The set of alerts the task pushes: firing ones until resolved, resolved ones until posted.
#[derive(Debug, Default)]
pub struct AlertSet {
    mapper: Mapper,
    entries: HashMap<String, Entry>,
}

impl AlertSet {
    pub fn new(mapper: Mapper) -> AlertSet {
        AlertSet {
            mapper,
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn update(&mut self, a: &Alert, now: i64) {
        let annotations = self.mapper.annotations(a);
        let resolved = a.status == "resolved";
        let ends = resolved.then(|| {
            a.resolved_at
                .as_deref()
                .and_then(parse_time_str)
                .unwrap_or(now)
                .min(now)
        });
        let labels = self.mapper.labels(a);
        let mut retired = None;
        match self.entries.get_mut(&a.incident_id) {
            Some(e) => {
                if e.labels != labels && !resolved {
                    // An escalation changes the severity label, and Alertmanager identifies an
                    // alert by its labels: end the old one and carry on under the new labels,
                    // so routing by severity sees the escalation.
                    let mut old = Entry {
                        labels: std::mem::replace(&mut e.labels, labels),
                        annotations: e.annotations.clone(),
                        starts_ms: e.starts_ms,
                        starts_at: e.starts_at.clone(),
                        generator_url: e.generator_url.clone(),
                        ends_ms: Some(now),
                    };
                    if old.starts_ms > now {
                        old.starts_ms = now;
                    }
                    retired = Some(old);
                }
                e.annotations = annotations;
                e.generator_url = a.url.clone();
                if ends.is_some() {
                    e.ends_ms = ends;
                }
            }
            None => {
                let starts_ms = parse_time_str(&a.detected_at).unwrap_or(now);
                self.entries.insert(
                    a.incident_id.clone(),
                    Entry {
                        labels,
                        annotations,
                        starts_ms,
                        starts_at: a.detected_at.clone(),
                        generator_url: a.url.clone(),
                        ends_ms: ends,
                    },
                );
            }
        }
        if let Some(old) = retired {
            let n = self.entries.len();
            self.entries
                .insert(format!("{}#retired-{n}", a.incident_id), old);
        }
    }

    /// The body to post now: every firing alert (`endsAt = now + hold`) and every resolved one.
    pub fn postable(&self, now: i64, hold_ms: i64) -> Vec<PostableAlert> {
        let mut v: Vec<PostableAlert> = self
            .entries
            .values()
            .map(|e| {
                let ends = e.ends_ms.unwrap_or(now + hold_ms);
                // Alertmanager rejects an end before the start.
                let starts_at = if e.starts_ms > ends {
                    fmt_time(ends)
                } else {
                    e.starts_at.clone()
                };
                PostableAlert {
                    labels: e.labels.clone(),
                    annotations: e.annotations.clone(),
                    starts_at,
                    ends_at: fmt_time(ends),
                    generator_url: e.generator_url.clone(),
                }
            })
            .collect();
        v.sort_by(|a, b| {
            a.labels
                .get("incident_id")
                .cmp(&b.labels.get("incident_id"))
        });
        v
    }

    pub fn has_resolved(&self) -> bool {
        self.entries.values().any(|e| e.ends_ms.is_some())
    }

    /// After a successful post: resolved alerts need no more sends.
    pub fn posted(&mut self) {
        self.entries.retain(|_, e| e.ends_ms.is_none());
    }
}

/// The flush path's handle: forwards alerts to the task without ever waiting.
pub struct Forwarder {
    tx: mpsc::Sender<Alert>,
    dropped: IntCounter,
    task: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Forwarder {
    /// Hands an alert to the task; when its queue is full the alert is dropped and counted.
    pub fn forward(&self, a: &Alert) {
        if self.tx.try_send(a.clone()).is_err() {
            self.dropped.inc();
        }
    }

    /// Closes the queue and lets the task post what is pending (bounded by the timeout).
    pub async fn shutdown(self) {
        let Forwarder {
            tx, task, timeout, ..
        } = self;
        drop(tx);
        let _ = tokio::time::timeout(timeout + Duration::from_secs(1), task).await;
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(t: &Telemetry, c: C) -> C {
    if let Err(e) = t.registry.register(Box::new(c.clone())) {
        tracing::debug!(error = %e, "alertmanager metric already registered");
    }
    c
}

/// Starts the push task when `[alertmanager] url` is set; `Ok(None)` when it is not.
pub fn spawn(cfg: &Config, telemetry: Arc<Telemetry>) -> Result<Option<Forwarder>, Error> {
    let am: &AlertmanagerConfig = &cfg.alertmanager;
    let Some(url) = &am.url else {
        return Ok(None);
    };
    let base = HttpUrl::parse(url)?;
    let endpoint = base.join("api/v2/alerts");
    let posts = register(
        &telemetry,
        IntCounterVec::new(
            Opts::new(
                "guardrail_alertmanager_posts_total",
                "POSTs of alerts to Alertmanager, by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric"),
    );
    let dropped = register(
        &telemetry,
        IntCounter::new(
            "guardrail_alertmanager_alerts_dropped_total",
            "Alerts not handed to the Alertmanager task because its queue was full",
        )
        .expect("valid metric"),
    );
    let timeout = Duration::from_secs(am.timeout_secs.max(1));
    let interval = Duration::from_secs(am.resend_interval_secs.max(1));
    let (tx, rx) = mpsc::channel(QUEUE);
    let set = AlertSet::new(Mapper::from_config(cfg));
    tracing::info!(url = %endpoint, resend_secs = interval.as_secs(), "pushing alerts to Alertmanager");
    let task = tokio::spawn(run_task(
        rx, set, endpoint, interval, timeout, posts, telemetry,
    ));
    Ok(Some(Forwarder {
        tx,
        dropped,
        task,
        timeout,
    }))
}

async fn run_task(
    mut rx: mpsc::Receiver<Alert>,
    mut set: AlertSet,
    endpoint: HttpUrl,
    interval: Duration,
    timeout: Duration,
    posts: IntCounterVec,
    telemetry: Arc<Telemetry>,
) {
    let hold_ms = 4 * interval.as_millis() as i64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let open = tokio::select! {
            m = rx.recv() => match m {
                Some(a) => {
                    set.update(&a, now_ms());
                    while let Ok(a) = rx.try_recv() {
                        set.update(&a, now_ms());
                    }
                    true
                }
                None => false,
            },
            _ = tick.tick() => true,
        };
        // On shutdown only resolved alerts still need a post; firing ones expire by endsAt.
        if !set.is_empty() && (open || set.has_resolved()) {
            let body = set.postable(now_ms(), hold_ms);
            let bytes = serde_json::to_vec(&body).expect("alerts serialise");
            let res = match request("POST", &endpoint, Some(&bytes), timeout).await {
                Ok((200..=299, _)) => Ok(()),
                Ok((status, b)) => Err(Error::Status {
                    url: endpoint.to_string(),
                    status,
                    body: String::from_utf8_lossy(&b).chars().take(300).collect(),
                }),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    posts.with_label_values(&["ok"]).inc();
                    tracing::debug!(alerts = body.len(), "posted to Alertmanager");
                    set.posted();
                }
                Err(e) => {
                    posts.with_label_values(&["error"]).inc();
                    telemetry.log_rate_limited("alertmanager_post", Duration::from_secs(60), || {
                        tracing::warn!(error = %e, alerts = body.len(), "posting alerts to Alertmanager failed; retrying next tick")
                    });
                }
            }
        }
        if !open {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::Candidate;
    use crate::config::Tier;
    use crate::policy::{Decision, DecisionAction};

    fn alert(status: &'static str) -> Alert {
        let mut series = serde_json::Map::new();
        series.insert("country".into(), "FR".into());
        series.insert("app-version".into(), "3.1".into());
        series.insert("metric".into(), "x".into());
        Alert {
            incident_id: "inc-1".into(),
            status,
            severity: "critical",
            metric: "conversion_rate".into(),
            series,
            kind: "drop",
            observed: 0.031,
            expected: 0.0365,
            expected_low: 0.033,
            expected_high: 0.040,
            onset: "2026-11-22T14:00:00.000Z".into(),
            onset_low: Some("2026-11-22T13:50:00.000Z".into()),
            onset_high: Some("2026-11-22T14:05:00.000Z".into()),
            group_id: "grp-1".into(),
            detected_at: "2026-11-22T14:25:00.000Z".into(),
            emitted_at: "2026-11-22T14:25:01.000Z".into(),
            candidate_changes: vec![Candidate {
                change_id: "chg-0042".into(),
                score: 0.9,
                evidence: "applied 0 min before the onset, scope matches".into(),
                reversal: false,
                within_scope: true,
                distance: 0,
            }],
            top_segments: vec![],
            url: "http://g/incidents/inc-1".into(),
            decision: Some({
                let mut d = Decision::new(
                    DecisionAction::RollbackRequested,
                    "tier-autonomous",
                    "autonomous change".into(),
                );
                d.change_id = Some("chg-0042".into());
                d.tier = Some(Tier::Autonomous);
                d
            }),
            effect: -0.15,
            score: 1.3,
            owner: Some("team-growth".into()),
            change_owner: Some("team-web".into()),
            escalated: false,
            comparison: Some("observational"),
            evidence: None,
            local_gain_global_loss: None,
            resolved_at: (status == "resolved").then(|| "2026-11-22T15:10:00.000Z".into()),
            resolution: None,
        }
    }

    #[test]
    fn labels_and_annotations() {
        let m = Mapper::default();
        let l = m.labels(&alert("firing"));
        assert_eq!(l["alertname"], "guardrail_drop");
        assert_eq!(l["severity"], "critical");
        assert_eq!(l["tier"], "autonomous");
        assert_eq!(l["team"], "team-growth");
        assert_eq!(l["owner"], "team-growth");
        assert_eq!(l["country"], "FR");
        assert_eq!(l["app_version"], "3.1");
        assert_eq!(l["dim_metric"], "x");
        assert_eq!(l["metric"], "conversion_rate");
        assert_eq!(l["series"], "app-version=3.1,country=FR,metric=x");
        assert_eq!(l["change_id"], "chg-0042");
        assert_eq!(l["group_id"], "grp-1");
        let a = m.annotations(&alert("firing"));
        assert!(a["summary"].contains("-15.0%"), "{}", a["summary"]);
        assert!(a["evidence"].starts_with("top candidate chg-0042"));
        assert!(a["evidence"].contains("rollback_requested"));
        assert_eq!(a["incident_url"], "http://g/incidents/inc-1");
        let team = Mapper {
            team: Some("sre".into()),
            ..Mapper::default()
        };
        assert_eq!(team.labels(&alert("firing"))["team"], "sre");
        assert_eq!(label_name("9x"), "_9x");
        assert_eq!(label_name("__x"), "dim__x");
    }

    #[test]
    fn firing_holds_resolved_ends_and_is_dropped_after_post() {
        let mut s = AlertSet::new(Mapper::default());
        let now = parse_time_str("2026-11-22T16:00:00Z").unwrap();
        s.update(&alert("firing"), now);
        let p = s.postable(now, 240_000);
        assert_eq!(p[0].starts_at, "2026-11-22T14:25:00.000Z");
        assert_eq!(p[0].ends_at, "2026-11-22T16:04:00.000Z");
        s.posted();
        assert_eq!(s.len(), 1);
        s.update(&alert("resolved"), now);
        let p = s.postable(now, 240_000);
        assert_eq!(p[0].ends_at, "2026-11-22T15:10:00.000Z");
        let json = serde_json::to_value(&p).unwrap();
        assert!(json[0]["generatorURL"].is_string() && json[0]["endsAt"].is_string());
        s.posted();
        assert!(s.is_empty());
    }

    #[test]
    fn an_escalation_ends_the_old_label_set_and_fires_the_new_one() {
        let mut s = AlertSet::new(Mapper::default());
        let now = parse_time_str("2026-11-22T16:00:00Z").unwrap();
        let mut a = alert("firing");
        a.severity = "warning";
        s.update(&a, now);
        s.posted();
        a.severity = "critical";
        a.escalated = true;
        s.update(&a, now + 1000);
        let p = s.postable(now + 1000, 240_000);
        assert_eq!(p.len(), 2);
        let old = p
            .iter()
            .find(|x| x.labels["severity"] == "warning")
            .unwrap();
        let new = p
            .iter()
            .find(|x| x.labels["severity"] == "critical")
            .unwrap();
        assert_eq!(old.ends_at, fmt_time(now + 1000));
        assert_eq!(new.ends_at, fmt_time(now + 1000 + 240_000));
        s.posted();
        assert_eq!(s.len(), 1, "the ended label set is dropped once posted");
    }

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://am:9093").unwrap();
        assert_eq!(
            u.join("api/v2/alerts").to_string(),
            "http://am:9093/api/v2/alerts"
        );
        let u = HttpUrl::parse("http://am/prefix/").unwrap();
        assert_eq!(
            u.join("api/v2/alerts").to_string(),
            "http://am:80/prefix/api/v2/alerts"
        );
        assert!(HttpUrl::parse("https://am:9093").is_err());
        assert!(HttpUrl::parse("am:9093").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokxx").unwrap();
        assert_eq!(r, (200, b"ok".to_vec()));
        let c = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert!(response_complete(c));
        assert!(!response_complete(&c[..c.len() - 5]));
        assert_eq!(parse_response(c).unwrap(), (400, b"abcde".to_vec()));
        // Issue 19: this size used to overflow and panic the push task.
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n0\r\n\r\n";
        assert!(!response_complete(huge));
        assert!(parse_response(huge).is_err());
    }

    #[tokio::test]
    async fn posts_to_a_server_and_counts() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = header_value(&head, "content-length")
                        .unwrap()
                        .parse()
                        .unwrap();
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let mut cfg = Config::from_str_named(crate::demo::DEFAULT_CONFIG, "t").unwrap();
        cfg.alertmanager.url = Some(format!("http://{addr}"));
        let t = Arc::new(Telemetry::new());
        let f = spawn(&cfg, t.clone()).unwrap().unwrap();
        f.forward(&alert("firing"));
        let req = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert!(req.starts_with("POST /api/v2/alerts HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Type: application/json\r\n"));
        let body = &req[req.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v[0]["labels"]["incident_id"], "inc-1");
        f.shutdown().await;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        prometheus::Encoder::encode(&enc, &t.registry.gather(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.contains("guardrail_alertmanager_posts_total{result=\"ok\"} 1"),
            "{text}"
        );
    }
}
