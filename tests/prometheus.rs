//! The monitoring artefacts against a real Prometheus: the service plays the seed story on the
//! embedded broker (incidents, a rollback request and its confirmation, a dead letter), then a
//! human-tier change whose incident waits on a person, who approves it once Prometheus scrapes;
//! a real `prometheus` scrapes its `/metrics` and evaluates `config/rules/guardrail.rules.yml`,
//! every query of every dashboard in `dashboards/` must return data, and every governance series
//! must be in the scrape. `promtool` checks the exposition and the rules file.
//!
//! Needs the `prometheus` and `promtool` binaries on PATH (Debian: `apt-get install prometheus`).
//! Without them the test is skipped, unless `CI` is set, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guardrail::auth::ActorConfig;
use serde_json::Value;

/// The token of the person who decides on the human-tier change (role marketing_owner).
const APPROVER: &str = "approver-token-0123456789abcdef";
const MIN: i64 = 60_000;

/// Every governance series, each of which must be in Prometheus after the run: counters start at
/// 0 for every label value, so the panels over them read 0, not "no data", before anything happens.
const GOVERNANCE_SERIES: &[&str] = &[
    "guardrail_decisions_total",
    "guardrail_decisions_total{action=\"rollback_requested\"}",
    "guardrail_decisions_total{action=\"rollback_already_requested\"}",
    "guardrail_decisions_total{action=\"awaiting_veto_window\"}",
    "guardrail_decisions_total{action=\"needs_human_decision\"}",
    "guardrail_decisions_total{action=\"shadow_rollback\"}",
    "guardrail_decisions_total{action=\"no_candidate\"}",
    "guardrail_decisions_total{action=\"change_not_in_force\"}",
    "guardrail_decisions_total{action=\"vetoed\"}",
    "guardrail_decisions_total{action=\"breaker_open\"}",
    "guardrail_decisions_total{action=\"investigate\"}",
    "guardrail_decisions_total{tier=\"human\"}",
    "guardrail_decisions_total{tier=\"supervised\"}",
    "guardrail_decisions_total{tier=\"autonomous\"}",
    "guardrail_decisions_total{tier=\"none\"}",
    "guardrail_human_decisions_total{verb=\"approve\"}",
    "guardrail_human_decisions_total{verb=\"veto\"}",
    "guardrail_human_decisions_total{verb=\"acknowledge\"}",
    "guardrail_human_decisions_total{verb=\"silence\"}",
    "guardrail_time_to_human_decision_seconds_bucket",
    "guardrail_time_to_human_decision_seconds_sum",
    "guardrail_time_to_human_decision_seconds_count",
    "guardrail_escalations_total",
    "guardrail_circuit_breaker_trips_total",
    "guardrail_circuit_breaker_open",
    "guardrail_decisions_pending{tier=\"human\"}",
    "guardrail_decisions_pending{tier=\"supervised\"}",
    "guardrail_decisions_pending{tier=\"autonomous\"}",
    "guardrail_guards_open",
    "guardrail_guard_verdicts_total{verdict=\"passed\"}",
    "guardrail_guard_verdicts_total{verdict=\"breached\"}",
    "guardrail_guard_verdicts_total{verdict=\"untrustworthy_split\"}",
    "guardrail_incidents_total{kind=\"drop\"}",
    "guardrail_incidents_total{kind=\"spike\"}",
    "guardrail_incidents_total{kind=\"shift\"}",
    "guardrail_incidents_total{kind=\"drift\"}",
    "guardrail_incidents_total{kind=\"data_quality\"}",
    "guardrail_incidents_total{kind=\"srm\"}",
    "guardrail_incidents_total{kind=\"fragmentation\"}",
    "guardrail_incidents_total{kind=\"pressure\"}",
    "guardrail_incidents_total{kind=\"guardrail_breach\"}",
    "guardrail_rollbacks_requested_total",
    "guardrail_rollbacks_confirmed_total",
];

/// A change only a person may roll back (tier human): its incident waits for an approve or veto.
fn human_change(id: &str, ts: i64) -> String {
    serde_json::json!({
        "change_id": id, "ts": guardrail::event::fmt_time(ts), "action": "applied",
        "actor": {"kind": "agent", "name": "copy-optimizer-v3"}, "kind": "wording",
        "scope": {"surfaces": ["checkout"], "dims": {"country": ["FR", "BE"]}},
        "tier": "human", "owner": "team-web", "rollback": {"restore": format!("{id}-before")}
    })
    .to_string()
}

/// Drives the traffic in 5-minute ticks until an incident blamed on `change` is firing and
/// waiting on a person (or `to` passes); its id.
async fn drive_until_waiting(
    h: &common::Harness,
    sim: &mut guardrail::sim::Sim,
    to: i64,
    change: &str,
) -> Option<String> {
    let url = format!("{}/api/incidents", h.http);
    while sim.now_ms() < to {
        let next = sim.now_ms() + 5 * MIN;
        h.drive(sim, next, 5 * MIN, |_| {}).await;
        let (code, body) = common::http(&url, "GET", Some(APPROVER), None).await;
        assert_eq!(code, 200, "GET /api/incidents: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let waiting = v["incidents"].as_array().into_iter().flatten().find(|i| {
            i["status"] == "firing"
                && i["decision"]["change_id"] == change
                && i["decision"]["action"] == "needs_human_decision"
        });
        if let Some(i) = waiting {
            return i["id"].as_str().map(str::to_string);
        }
    }
    None
}

/// Kills and reaps the Prometheus child process when dropped (also on panic).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Both binaries on PATH, or the reason they are not.
fn tools() -> Result<(PathBuf, PathBuf), String> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    };
    match (find("prometheus"), find("promtool")) {
        (Some(p), Some(t)) => Ok((p, t)),
        (p, t) => Err(format!(
            "not on PATH:{}{} (Debian: apt-get install prometheus)",
            if p.is_none() { " prometheus" } else { "" },
            if t.is_none() { " promtool" } else { "" },
        )),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// A GET that reports connection failures instead of panicking. It speaks HTTP/1.0 so that Go's
/// server answers with a plain body (no chunked transfer encoding) and closes the connection.
async fn get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .ok()??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// GET `url` and parse a Prometheus API answer; `Err` says what went wrong.
async fn api(url: &str) -> Result<Value, String> {
    let (status, body) = get(url).await.ok_or_else(|| "no HTTP answer".to_string())?;
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("HTTP {status}: {body}"));
    }
    Ok(v["data"].clone())
}

/// Grafana's template variables and built-in intervals, as a query over the whole run.
fn substitute(expr: &str) -> String {
    expr.replace("${metric}", ".+")
        .replace("$metric", ".+")
        .replace("${series}", ".+")
        .replace("$series", ".+")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
}

/// Every (dashboard file, panel title, expr) in the dashboard, nested row panels included.
fn panel_exprs(file: &str, dash: &Value, out: &mut Vec<(String, String, String)>) {
    fn walk(file: &str, panels: &Value, out: &mut Vec<(String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["hide"].as_bool() == Some(true) {
                    continue;
                }
                if let Some(e) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                    out.push((file.to_string(), title.clone(), e.to_string()));
                }
            }
            walk(file, &p["panels"], out);
        }
    }
    walk(file, &dash["panels"], out);
    // Pre-schema-16 dashboards keep panels under rows.
    for r in dash["rows"].as_array().into_iter().flatten() {
        walk(file, &r["panels"], out);
    }
}

/// Every (dashboard file, variable name, query) of a query variable.
fn variable_queries(file: &str, dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .or_else(|| v["definition"].as_str())
            .unwrap_or("");
        out.push((
            file.to_string(),
            v["name"].as_str().unwrap_or("?").to_string(),
            q.to_string(),
        ));
    }
    out
}

/// Does an instant-query result hold at least one sample that is a number (not NaN)?
fn has_data(data: &Value) -> bool {
    let finite = |s: &Value| {
        s.as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| finite(&r["value"][1])),
        Some("matrix") => data["result"].as_array().into_iter().flatten().any(|r| {
            r["values"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| finite(&v[1]))
        }),
        Some("scalar") => finite(&data["result"][1]),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_work_against_a_real_prometheus() {
    let (prometheus, promtool) = match tools() {
        Ok(t) => t,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but the Prometheus check cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED dashboards_and_rules_work_against_a_real_prometheus: {why}");
            return;
        }
    };
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("config/rules/guardrail.rules.yml");

    // The rules file first: cheap, and a broken file would also stop Prometheus from starting.
    let out = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("run promtool check rules");
    println!(
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed");

    // The service through the whole story: incidents, an autonomous rollback request, its
    // confirmation, recovery; plus one malformed event so the dead-letter counters have a sample.
    let h = common::start(|c| {
        c.detection.warmup_windows = 48;
        c.actors = vec![ActorConfig {
            name: "alice".into(),
            role: "marketing_owner".into(),
            token: Some(APPROVER.into()),
            token_env: None,
        }];
    })
    .await;
    let story = common::play_story(&h, 5, 2, Some(25)).await;
    h.send_event(b"not json").await;
    // Then a human-tier change hurts clicks: its decision waits on a person. The approval comes
    // once Prometheus scrapes, so the time-to-decision histogram moves inside the queried range
    // (its quantiles are NaN, not data, over a range without a call).
    let mut sim = common::story_sim(story.end_ms);
    h.send_change(&human_change("chg-hum", story.end_ms)).await;
    sim.scenario_mut().effects.push(guardrail::sim::Effect {
        change_id: "chg-hum".into(),
        countries: vec!["FR".into(), "BE".into()],
        start_ms: story.end_ms,
        end_ms: None,
        ctr_mult: 0.6,
        conversion_mult: 1.0,
        ticket_mult: 1.0,
    });
    let waiting = drive_until_waiting(&h, &mut sim, story.end_ms + 50 * MIN, "chg-hum")
        .await
        .expect("chg-hum's click-through drop is detected and waits on a person");
    let stats = h.get("/metrics").await.1;
    for (series, at_least) in [
        ("guardrail_rollbacks_requested_total", 1.0),
        ("guardrail_rollbacks_confirmed_total", 1.0),
        ("guardrail_alerts_total{status=\"firing\"}", 1.0),
        (
            "guardrail_decisions_total{action=\"rollback_requested\",tier=\"autonomous\"}",
            1.0,
        ),
        (
            "guardrail_decisions_total{action=\"needs_human_decision\",tier=\"human\"}",
            1.0,
        ),
        ("guardrail_decisions_pending{tier=\"human\"}", 1.0),
        ("guardrail_guards_open", 1.0),
    ] {
        let v = common::metric_value(&stats, series).unwrap_or(0.0);
        assert!(
            v >= at_least,
            "the story should leave {series} >= {at_least}, got {v}"
        );
    }
    println!(
        "story played in {:.1?} ({} events, then {} until {waiting} waited on a person)",
        t0.elapsed(),
        story.produced,
        guardrail::event::fmt_time(sim.now_ms()),
    );

    // A real Prometheus scraping the service every second, evaluating the repo's rules.
    let dir = tempfile::tempdir().unwrap();
    let target = h.http.strip_prefix("http://").unwrap().to_string();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules:?}\n\
         scrape_configs:\n  - job_name: guardrail\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [{target:?}]\n",
        rules = rules.display().to_string(),
    );
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let port = free_port();
    let prom = format!("http://127.0.0.1:{port}");
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(&prometheus)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let mut guard = ChildGuard(child);
    let prom_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Wait for a successful scrape, keeping live traffic flowing (heartbeat events, which no
    // metric reads) so rates and the batch-time histogram move as on a running system.
    let mut hb = sim.now_ms();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(status)) = guard.0.try_wait() {
            panic!("prometheus exited early ({status}):\n{}", prom_log());
        }
        let up = api(&format!("{prom}/api/v1/query?query=up")).await;
        if let Ok(d) = &up {
            if d["result"][0]["value"][1] == "1" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped guardrail successfully (last answer {up:?}):\n{}",
            prom_log()
        );
        hb += 250;
        h.heartbeat(hb).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A person approves the waiting rollback now that Prometheus has a sample from before it.
    let (code, body) = common::http(
        &format!("{}/api/incidents/{waiting}/approve", h.http),
        "POST",
        Some(APPROVER),
        Some(r#"{"reason":"clicks matter more"}"#),
    )
    .await;
    assert_eq!(code, 200, "approve {waiting}: {body}");
    // rate() needs two samples inside its range: let several scrapes land.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(6) {
        hb += 250;
        h.heartbeat(hb).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("prometheus up and scraping after {:.1?}", t0.elapsed());
    let stats = h.get("/metrics").await.1;
    for (series, at_least) in [
        ("guardrail_human_decisions_total{verb=\"approve\"}", 1.0),
        ("guardrail_time_to_human_decision_seconds_count", 1.0),
        ("guardrail_rollbacks_requested_total", 2.0),
    ] {
        let v = common::metric_value(&stats, series).unwrap_or(0.0);
        assert!(
            v >= at_least,
            "the approval should leave {series} >= {at_least}, got {v}"
        );
    }

    // Every governance series is in the scrape, every label value included.
    let mut failures = Vec::new();
    for series in GOVERNANCE_SERIES {
        match api(&format!(
            "{prom}/api/v1/query?query={}",
            guardrail::peer::pct_encode(series)
        ))
        .await
        {
            Ok(d) if has_data(&d) => {}
            Ok(d) => failures.push(format!("{series} is not in the scrape: {d}")),
            Err(e) => failures.push(format!("querying {series} failed: {e}")),
        }
    }

    // Every panel query of every dashboard returns data.
    let mut checked = 0usize;
    let mut variables = 0usize;
    let mut files: Vec<_> = std::fs::read_dir(root.join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards found");
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        let mut exprs = Vec::new();
        panel_exprs(&file, &dash, &mut exprs);
        assert!(!exprs.is_empty(), "{file} has no panel queries");
        for (file, title, expr) in exprs {
            // A stat's `or vector(0)` fallback would hide a query that never matches: the query
            // itself must return data.
            let core = expr
                .trim()
                .strip_suffix("or vector(0)")
                .map(str::trim)
                .unwrap_or(expr.trim());
            let q = substitute(core);
            checked += 1;
            match api(&format!(
                "{prom}/api/v1/query?query={}",
                guardrail::peer::pct_encode(&q)
            ))
            .await
            {
                Ok(d) if has_data(&d) => {}
                Ok(d) => failures.push(format!(
                    "{file} / {title:?}: no data for `{expr}` (queried `{q}`): {d}"
                )),
                Err(e) => failures.push(format!("{file} / {title:?}: `{expr}` failed: {e}")),
            }
        }
        for (file, name, query) in variable_queries(&file, &dash) {
            variables += 1;
            let q = substitute(&query);
            let inner = q
                .trim()
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'));
            let Some(inner) = inner else {
                failures.push(format!(
                    "{file} / variable ${name}: unsupported query `{query}`"
                ));
                continue;
            };
            let (url, label) = match inner.rsplit_once(',') {
                Some((sel, label)) => (
                    format!(
                        "{prom}/api/v1/series?match[]={}",
                        guardrail::peer::pct_encode(sel.trim())
                    ),
                    label.trim().to_string(),
                ),
                None => (
                    format!("{prom}/api/v1/label/{}/values", inner.trim()),
                    String::new(),
                ),
            };
            match api(&url).await {
                Ok(d) => {
                    let values: Vec<&str> = d
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| {
                            if label.is_empty() {
                                s.as_str()
                            } else {
                                s[&label].as_str()
                            }
                        })
                        .collect();
                    if values.is_empty() {
                        failures.push(format!(
                            "{file} / variable ${name}: no values for `{query}`: {d}"
                        ));
                    }
                }
                Err(e) => {
                    failures.push(format!("{file} / variable ${name}: `{query}` failed: {e}"))
                }
            }
        }
    }
    println!(
        "checked {checked} panel queries and {variables} template variables in {} dashboard(s)",
        files.len()
    );

    // The rules load and evaluate without errors against the real series.
    match api(&format!("{prom}/api/v1/rules")).await {
        Ok(d) => {
            let mut n = 0;
            for g in d["groups"].as_array().into_iter().flatten() {
                for r in g["rules"].as_array().into_iter().flatten() {
                    n += 1;
                    if r["health"] == "err" {
                        failures.push(format!(
                            "rule {} fails to evaluate: {}",
                            r["name"], r["lastError"]
                        ));
                    }
                }
            }
            if n == 0 {
                failures.push("prometheus loaded no rules".into());
            }
            println!("prometheus loaded {n} rules");
        }
        Err(e) => failures.push(format!("/api/v1/rules failed: {e}")),
    }

    // The exposition itself, as promtool lints it. Exit 1 means it could not be parsed (a hard
    // error); exit 3 means lint findings (naming, help), which are printed but tolerated.
    let (status, exposition) = h.get("/metrics").await;
    assert_eq!(status, 200, "/metrics answers");
    let mut lint = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool check metrics");
    {
        use std::io::Write;
        let mut stdin = lint.stdin.take().unwrap();
        stdin.write_all(exposition.as_bytes()).unwrap();
    }
    let out = lint.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => println!("promtool check metrics: clean"),
        Some(3) => println!("promtool check metrics: lint findings (tolerated):\n{findings}"),
        _ => failures.push(format!(
            "promtool check metrics failed ({}): {findings}",
            out.status
        )),
    }

    drop(guard);
    h.stop().await;
    println!("done in {:.1?}", t0.elapsed());
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
