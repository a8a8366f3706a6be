//! The authenticated control API over real HTTP: the API served in process on a loopback port,
//! actors with roles and inline tokens, and a fake engine answering the control channel.

use std::sync::{Arc, Mutex};

use guardrail::api::ApiState;
use guardrail::auth::{ActorConfig, Auth, Permission, RolesConfig};
use guardrail::control::{Command, ControlError, DecisionCall, Outcome};
use guardrail::event::Actor;
use guardrail::policy::{Decision, DecisionAction};
use guardrail::sink::AuditRecord;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "alice-moderator-token-0001";
const BOB: &str = "bob-operator-token-00000002";
const VIC: &str = "vic-viewer-token-000000003";

/// An incident the fake engine knows and accepts calls on.
const KNOWN: &str = "inc-known";
/// An incident already decided: every call conflicts.
const DECIDED: &str = "inc-decided";
/// A change with audit records.
const CHANGE: &str = "chg-1";

fn roles() -> RolesConfig {
    let mut r = RolesConfig::new();
    r.insert("operator".into(), Permission::ALL.to_vec());
    r.insert(
        "model_moderator".into(),
        vec![Permission::Read, Permission::Veto, Permission::Acknowledge],
    );
    r.insert("viewer".into(), vec![Permission::Read]);
    r
}

fn actor(name: &str, role: &str, token: &str) -> ActorConfig {
    ActorConfig {
        name: name.into(),
        role: role.into(),
        token: Some(token.into()),
        token_env: None,
    }
}

fn actors() -> Vec<ActorConfig> {
    vec![
        actor("alice", "model_moderator", ALICE),
        actor("bob", "operator", BOB),
        actor("vic", "viewer", VIC),
    ]
}

struct Server {
    addr: String,
    /// Every decision call the fake engine received.
    calls: Arc<Mutex<Vec<DecisionCall>>>,
}

/// Serves the API with `actors`, the control channel answered by a fake engine (or, with
/// `engine: false`, a channel whose receiver is gone).
async fn start_with(roles: &RolesConfig, actors: &[ActorConfig], engine: bool) -> Server {
    let state = ApiState::new(Arc::new(guardrail::telemetry::Telemetry::new()));
    let auth = Arc::new(Auth::from_config(roles, actors).expect("actors load"));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Command>(16);
    state.install(auth, tx);
    let calls = Arc::new(Mutex::new(Vec::new()));
    if engine {
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Decide { call, reply } => {
                        seen.lock().unwrap().push(call.clone());
                        let _ = reply.send(fake_decide(&call));
                    }
                    Command::ChangeAudit { change_id, reply } => {
                        let _ = reply.send(fake_audit(&change_id));
                    }
                }
            }
        });
    } else {
        drop(rx);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(guardrail::api::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Server { addr, calls }
}

async fn start() -> Server {
    start_with(&roles(), &actors(), true).await
}

fn fake_decide(call: &DecisionCall) -> Result<Outcome, ControlError> {
    match call.incident_id.as_str() {
        KNOWN => Ok(Outcome {
            incident_id: call.incident_id.clone(),
            verb: call.verb,
            audit_id: "audit-1".into(),
            decision: Decision::new(
                DecisionAction::NeedsHumanDecision,
                "test",
                "fake engine".into(),
            ),
            message: format!(
                "{} by {} ({})",
                call.verb.as_str(),
                call.principal.name,
                call.principal.role
            ),
        }),
        DECIDED => Err(ControlError::Conflict(format!(
            "{DECIDED} is already decided (vetoed); nothing to {}",
            call.verb.as_str()
        ))),
        other => Err(ControlError::NotFound(other.to_string())),
    }
}

fn fake_audit(change_id: &str) -> Vec<AuditRecord> {
    if change_id != CHANGE {
        return Vec::new();
    }
    vec![AuditRecord {
        audit_id: "audit-1".into(),
        at: "2024-05-01T10:00:00.000Z".into(),
        seq: 1,
        event_time: None,
        incident_id: Some(KNOWN.into()),
        change_id: Some(CHANGE.into()),
        action: "rollback_requested",
        actor: Actor::system("guardrail"),
        evidence: serde_json::json!({}),
        policy: serde_json::json!({}),
    }]
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A minimal HTTP/1.1 request over a real TCP connection (`Connection: close`).
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" || !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn get_as(srv: &Server, path: &str, token: &str) -> Resp {
    let auth = bearer(token);
    request(&srv.addr, "GET", path, &[("Authorization", &auth)], None).await
}

async fn post_as(srv: &Server, path: &str, token: &str, body: Option<&str>) -> Resp {
    let auth = bearer(token);
    let mut h = vec![("Authorization", auth.as_str())];
    if body.is_some() {
        h.push(("Content-Type", "application/json"));
    }
    request(&srv.addr, "POST", path, &h, body).await
}

fn assert_unauthorized(r: &Resp) {
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"guardrail\""),
        "{:?}",
        r.headers
    );
    assert_eq!(r.json()["error"], "unauthorized");
    assert!(!r.message().is_empty());
}

#[tokio::test]
async fn missing_token_is_401_with_www_authenticate() {
    let srv = start().await;
    let r = request(
        &srv.addr,
        "POST",
        &format!("/api/incidents/{KNOWN}/approve"),
        &[],
        None,
    )
    .await;
    assert_unauthorized(&r);
    assert!(r.message().contains("Authorization"), "{}", r.body);
    // Reads too, once actors exist.
    for path in [
        "/api/incidents",
        "/api/incidents/x",
        "/api/changes",
        "/api/whoami",
    ] {
        let r = request(&srv.addr, "GET", path, &[], None).await;
        assert_unauthorized(&r);
    }
    assert!(srv.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn wrong_or_malformed_token_is_401() {
    let srv = start().await;
    let path = format!("/api/incidents/{KNOWN}/approve");
    let r = post_as(&srv, &path, "not-a-real-token-0000000000", None).await;
    assert_unauthorized(&r);
    assert!(r.message().contains("unknown token"), "{}", r.body);
    // The token is never echoed back.
    assert!(!r.body.contains("not-a-real-token"));
    for value in [BOB.to_string(), format!("Basic {BOB}"), "Bearer ".into()] {
        let r = request(&srv.addr, "POST", &path, &[("Authorization", &value)], None).await;
        assert_unauthorized(&r);
        assert!(r.message().contains("malformed"), "{value}: {}", r.body);
    }
    // The scheme is case-insensitive.
    let lower = format!("bearer {BOB}");
    let r = request(
        &srv.addr,
        "GET",
        "/api/whoami",
        &[("Authorization", &lower)],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(srv.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn role_without_approve_is_403_naming_actor_and_role() {
    let srv = start().await;
    let r = post_as(
        &srv,
        &format!("/api/incidents/{KNOWN}/approve"),
        ALICE,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "forbidden");
    assert_eq!(
        r.message(),
        "actor alice (role model_moderator) may not approve; allowed: read, veto, acknowledge"
    );
    let r = post_as(&srv, &format!("/api/incidents/{KNOWN}/veto"), VIC, None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.message(),
        "actor vic (role viewer) may not veto; allowed: read"
    );
    assert!(srv.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn approve_reaches_the_engine_with_the_principal() {
    let srv = start().await;
    let r = post_as(
        &srv,
        &format!("/api/incidents/{KNOWN}/approve"),
        BOB,
        Some(r#"{"reason": "conversion is down 30%, roll it back"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["incident_id"], KNOWN);
    assert_eq!(j["verb"], "approve");
    assert_eq!(j["audit_id"], "audit-1");
    assert_eq!(j["message"], "approve by bob (operator)");
    assert_eq!(j["decision"]["action"], "needs_human_decision");
    let calls = srv.calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.incident_id, KNOWN);
    assert_eq!(c.verb, guardrail::control::Verb::Approve);
    assert_eq!(c.principal.name, "bob");
    assert_eq!(c.principal.role, "operator");
    assert_eq!(
        c.reason.as_deref(),
        Some("conversion is down 30%, roll it back")
    );
    assert_eq!(c.silence_secs, None);
}

#[tokio::test]
async fn veto_by_a_role_with_veto_is_200_without_a_body() {
    let srv = start().await;
    let r = post_as(&srv, &format!("/api/incidents/{KNOWN}/veto"), ALICE, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "veto by alice (model_moderator)");
    let calls = srv.calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].principal.name, "alice");
    assert_eq!(calls[0].principal.role, "model_moderator");
    assert_eq!(calls[0].reason, None);
}

#[tokio::test]
async fn silence_passes_its_duration() {
    let srv = start().await;
    let r = post_as(
        &srv,
        &format!("/api/incidents/{KNOWN}/silence"),
        BOB,
        Some(r#"{"silence_secs": 3600}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(srv.calls.lock().unwrap()[0].silence_secs, Some(3600));
    // Only silence takes a duration.
    let r = post_as(
        &srv,
        &format!("/api/incidents/{KNOWN}/acknowledge"),
        BOB,
        Some(r#"{"silence_secs": 3600}"#),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.message().contains("silence_secs"), "{}", r.body);
    assert_eq!(srv.calls.lock().unwrap().len(), 1);
    // Issue 19: a duration that overflowed event time; now bounded to 30 days.
    for secs in ["18446744073709551615", "2592001"] {
        let r = post_as(
            &srv,
            &format!("/api/incidents/{KNOWN}/silence"),
            BOB,
            Some(&format!(r#"{{"silence_secs": {secs}}}"#)),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.message().contains("between 1 and 2592000"), "{}", r.body);
    }
    assert_eq!(srv.calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_incident_is_404() {
    let srv = start().await;
    let r = post_as(&srv, "/api/incidents/inc-nope/acknowledge", ALICE, None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"], "not_found");
    assert!(r.message().contains("inc-nope"), "{}", r.body);
}

#[tokio::test]
async fn decided_incident_is_409() {
    let srv = start().await;
    let r = post_as(
        &srv,
        &format!("/api/incidents/{DECIDED}/approve"),
        BOB,
        None,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "conflict");
    assert!(r.message().contains("already decided"), "{}", r.body);
}

#[tokio::test]
async fn bad_json_body_is_400() {
    let srv = start().await;
    let path = format!("/api/incidents/{KNOWN}/veto");
    let r = post_as(&srv, &path, ALICE, Some(r#"{"reason": "#)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_request");
    assert!(r.message().contains("invalid JSON body"), "{}", r.body);
    let r = post_as(&srv, &path, ALICE, Some(r#"{"reasn": "typo"}"#)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.message().contains("unknown field `reasn`"), "{}", r.body);
    let r = post_as(&srv, &path, ALICE, Some(r#"{"silence_secs": -1}"#)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(srv.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_verb_is_404_with_the_list() {
    let srv = start().await;
    let r = post_as(&srv, &format!("/api/incidents/{KNOWN}/rollback"), BOB, None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "not_found");
    assert_eq!(
        j["verbs"],
        serde_json::json!(["approve", "veto", "acknowledge", "silence"])
    );
    assert!(r.message().contains("approve, veto, acknowledge, silence"));
    // Strangers learn nothing.
    let r = request(
        &srv.addr,
        "POST",
        &format!("/api/incidents/{KNOWN}/rollback"),
        &[],
        None,
    )
    .await;
    assert_unauthorized(&r);
}

#[tokio::test]
async fn no_actors_reads_open_and_control_closed() {
    let srv = start_with(&roles(), &[], true).await;
    let r = request(&srv.addr, "GET", "/api/incidents", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["incidents"].is_array());
    let r = request(&srv.addr, "GET", "/api/changes", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        &srv.addr,
        "GET",
        &format!("/api/changes/{CHANGE}/audit"),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for token in [None, Some(BOB)] {
        let auth = token.map(bearer);
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = request(
            &srv.addr,
            "POST",
            &format!("/api/incidents/{KNOWN}/approve"),
            &h,
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.json()["error"], "forbidden");
        assert!(
            r.message().contains(
                "no actors are configured: add [[actors]] with a role and token_env to the config"
            ),
            "{}",
            r.body
        );
    }
    assert!(srv.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn pages_and_metrics_stay_open() {
    let srv = start().await;
    for (path, want) in [
        ("/metrics", 200),
        ("/healthz", 200),
        ("/incidents", 200),
        ("/readyz", 503),
        ("/incidents/inc-nope", 404),
    ] {
        let r = request(&srv.addr, "GET", path, &[], None).await;
        assert_eq!(r.status, want, "{path}: {}", r.body);
        assert!(r.header("www-authenticate").is_none(), "{path}");
    }
}

#[tokio::test]
async fn reads_need_the_read_permission() {
    let srv = start().await;
    for token in [ALICE, BOB, VIC] {
        let r = get_as(&srv, "/api/incidents", token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = get_as(&srv, "/api/changes", token).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut roles = roles();
    roles.insert("bot".into(), vec![Permission::Acknowledge]);
    let srv = start_with(&roles, &[actor("ack-bot", "bot", BOB)], true).await;
    let r = get_as(&srv, "/api/incidents", BOB).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.message(),
        "actor ack-bot (role bot) may not read; allowed: acknowledge"
    );
}

#[tokio::test]
async fn whoami_names_the_caller() {
    let srv = start().await;
    let r = get_as(&srv, "/api/whoami", ALICE).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({
            "name": "alice",
            "role": "model_moderator",
            "permissions": ["read", "veto", "acknowledge"],
        })
    );
    let r = get_as(&srv, "/api/whoami", "wrong-token-000000000000").await;
    assert_unauthorized(&r);
    let open = start_with(&roles(), &[], true).await;
    let r = request(&open.addr, "GET", "/api/whoami", &[], None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.message().contains("no actors are configured"));
}

#[tokio::test]
async fn change_audit_lists_records() {
    let srv = start().await;
    let r = get_as(&srv, &format!("/api/changes/{CHANGE}/audit"), VIC).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["change_id"], CHANGE);
    assert_eq!(j["records"].as_array().unwrap().len(), 1);
    assert_eq!(j["records"][0]["audit_id"], "audit-1");
    let r = get_as(&srv, "/api/changes/chg-nope/audit", VIC).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.message().contains("chg-nope"), "{}", r.body);
    let r = request(
        &srv.addr,
        "GET",
        &format!("/api/changes/{CHANGE}/audit"),
        &[],
        None,
    )
    .await;
    assert_unauthorized(&r);
}

#[tokio::test]
async fn engine_gone_is_503() {
    let srv = start_with(&roles(), &actors(), false).await;
    let r = post_as(&srv, &format!("/api/incidents/{KNOWN}/approve"), BOB, None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "unavailable");
    let r = get_as(&srv, &format!("/api/changes/{CHANGE}/audit"), BOB).await;
    assert_eq!(r.status, 503, "{}", r.body);
}

/// Serves the bare API (no actors) with `limits`: its address and telemetry.
async fn start_limited(
    limits: guardrail::api::HttpLimits,
) -> (String, Arc<guardrail::telemetry::Telemetry>) {
    let telemetry = Arc::new(guardrail::telemetry::Telemetry::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(guardrail::api::serve_with(
        listener,
        ApiState::new(telemetry.clone()),
        std::future::pending(),
        limits,
    ));
    (addr, telemetry)
}

/// Sends `bytes` on a new connection and reads until the server closes it (failing if it
/// has not within 10 s): what the server sent.
async fn send_until_closed(addr: &str, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn slow_idle_and_surplus_clients_are_cut_off() {
    use guardrail::api::HttpLimits;
    use std::time::Duration;
    let short = Duration::from_millis(300);
    let (addr, tel) = start_limited(HttpLimits {
        header_read_timeout: short,
        request_timeout: short,
        max_connections: 8,
    })
    .await;
    // A half-sent head, and an idle keep-alive connection after its answer: both closed.
    send_until_closed(&addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let idle = send_until_closed(&addr, HEALTH).await;
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");
    // A body trickled in: 408, counted.
    let slow = send_until_closed(
        &addr,
        b"POST /api/incidents/x/approve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await;
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(tel
        .render()
        .contains("guardrail_http_limited_total{reason=\"request_timeout\"} 1"));

    // Two connections at most: a third is closed unanswered until one of the two leaves.
    let (addr, tel) = start_limited(HttpLimits {
        header_read_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        max_connections: 2,
    })
    .await;
    let first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert_eq!(send_until_closed(&addr, HEALTH).await, "");
    assert!(tel
        .render()
        .contains("guardrail_http_limited_total{reason=\"connections\"} 1"));
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(HEALTH).await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap_or(0);
        if buf[..n].starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
