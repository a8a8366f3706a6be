//! guardrail pushing alerts to a real Prometheus Alertmanager (started as a child process):
//! the seed story fires critical alerts that show up in Alertmanager with their labels and
//! annotations and stay active through re-sends; after the change is rolled back and traffic is
//! normal again, the incidents resolve and their alerts leave Alertmanager's active set.
//! Also validates `config/alertmanager.yml` with `amtool check-config`.
//!
//! Needs `prometheus-alertmanager` (and optionally `amtool`); skipped when missing unless `CI`
//! is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guardrail::alertmanager::{request, HttpUrl};
use guardrail::sim;
use serde_json::Value;

const AM_BINARIES: [&str; 3] = [
    "/usr/bin/prometheus-alertmanager",
    "/usr/local/bin/alertmanager",
    "/usr/bin/alertmanager",
];
const AMTOOL: [&str; 2] = ["/usr/bin/amtool", "/usr/local/bin/amtool"];

fn find_bin(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// `None` (and a printed reason) when a tool is missing outside CI; in CI a missing tool fails.
fn require(what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{what} is required in CI but was not found (Debian: apt-get install prometheus-alertmanager)");
        }
        eprintln!("SKIPPED: {what} not found (Debian: apt-get install prometheus-alertmanager)");
    }
    found
}

/// An Alertmanager child process on a free loopback port; killed on drop.
struct Alertmanager {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Alertmanager {
    async fn start(bin: &Path) -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(
            &cfg,
            "route:\n  receiver: \"null\"\n  group_by: [alertname]\nreceivers:\n  - name: \"null\"\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut am = Alertmanager {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = am.get("/-/ready").await {
                return am;
            }
            if let Ok(Some(status)) = am.child.try_wait() {
                panic!("alertmanager exited ({status}):\n{}", am.log());
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager not ready after 30 s:\n{}",
                am.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Result<(u16, String), guardrail::alertmanager::Error> {
        let url = HttpUrl::parse(&format!("{}{path}", self.url)).unwrap();
        let (status, body) = request("GET", &url, None, Duration::from_secs(10)).await?;
        Ok((status, String::from_utf8_lossy(&body).to_string()))
    }

    /// Active (firing, not resolved) alerts.
    async fn active(&self) -> Vec<Value> {
        let (status, body) = self
            .get("/api/v2/alerts?active=true&silenced=true&inhibited=true")
            .await
            .expect("GET /api/v2/alerts");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("alerts JSON");
        v.as_array().cloned().unwrap_or_default()
    }
}

fn label<'a>(a: &'a Value, k: &str) -> &'a str {
    a["labels"][k].as_str().unwrap_or("")
}

fn is_story_alert(a: &Value) -> bool {
    matches!(
        label(a, "metric"),
        "conversion_rate" | "support_tickets_per_session"
    ) && label(a, "severity") == "critical"
}

#[test]
fn example_config_passes_amtool_check_config() {
    let Some(amtool) = require("amtool", find_bin("GUARDRAIL_AMTOOL", &AMTOOL)) else {
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alertmanager.yml");
    let out = Command::new(&amtool)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run amtool");
    assert!(
        out.status.success(),
        "amtool check-config {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn story_alerts_fire_and_resolve_in_alertmanager() {
    let Some(bin) = require(
        "prometheus-alertmanager",
        find_bin("GUARDRAIL_ALERTMANAGER", &AM_BINARIES),
    ) else {
        return;
    };
    let t0 = Instant::now();
    let am = Alertmanager::start(&bin).await;
    let am_url = am.url.clone();
    let h = common::start(|c| {
        c.detection.warmup_windows = 48;
        c.alertmanager.url = Some(am_url);
        c.alertmanager.resend_interval_secs = 1;
    })
    .await;

    // The seed story without its rollback: 5 h of normal traffic, then change chg-0042 (FR+BE:
    // conversions -15%, tickets x3) for an hour, so its incidents are firing (like
    // `common::play_story(&h, 5, 1, None)`), then the recovery below.
    let change_ms = common::story_afternoon();
    let mut sim = common::story_sim(change_ms - 5 * common::HOUR);
    h.drive(&mut sim, change_ms, 5 * 60_000, |_| {}).await;
    h.send_change(&sim::story_change("chg-0042", change_ms))
        .await;
    sim.scenario_mut()
        .effects
        .push(sim::story_effect("chg-0042", change_ms));
    let end_ms = change_ms + common::HOUR;
    h.drive(&mut sim, end_ms, 5 * 60_000, |_| {}).await;
    eprintln!("story played in {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(30);
    let firing = loop {
        let f: Vec<Value> = am
            .active()
            .await
            .into_iter()
            .filter(is_story_alert)
            .collect();
        if !f.is_empty() || Instant::now() > deadline {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !firing.is_empty(),
        "no critical story alert in Alertmanager; active: {:?}\nincidents: {}",
        am.active().await,
        h.get("/api/incidents").await.1
    );
    for a in &firing {
        eprintln!(
            "firing in Alertmanager: {} {}",
            a["labels"], a["annotations"]["summary"]
        );
        assert!(!label(a, "incident_id").is_empty(), "{a}");
        assert!(label(a, "alertname").starts_with("guardrail_"), "{a}");
        assert_eq!(label(a, "tier"), "autonomous", "{a}");
        assert!(
            !label(a, "team").is_empty() && label(a, "team") != "none",
            "{a}"
        );
        assert_eq!(a["status"]["state"], "active", "{a}");
        let url = a["annotations"]["incident_url"].as_str().unwrap_or("");
        assert!(
            url.starts_with(&format!("{}/incidents/", h.http)),
            "incident_url {url:?}"
        );
        let summary = a["annotations"]["summary"].as_str().unwrap_or("");
        assert!(summary.contains(label(a, "metric")), "{summary}");
        let evidence = a["annotations"]["evidence"].as_str().unwrap_or("");
        assert!(evidence.contains("chg-0042"), "{evidence}");
    }
    let watched: Vec<String> = firing
        .iter()
        .map(|a| label(a, "incident_id").to_string())
        .collect();

    if let Some(amtool) = find_bin("GUARDRAIL_AMTOOL", &AMTOOL) {
        let out = Command::new(amtool)
            .arg(format!("--alertmanager.url={}", am.url))
            .args(["alert", "query", "-o", "extended"])
            .arg(format!("incident_id={}", watched[0]))
            .output()
            .expect("run amtool");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&watched[0]),
            "amtool alert query:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Firing alerts are re-sent (endsAt = now + 4 x 1 s): after 6 s they are still active.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let active = am.active().await;
    for id in &watched {
        assert!(
            active.iter().any(|a| label(a, "incident_id") == id),
            "{id} expired although it is still firing: not re-sent?"
        );
    }

    // The automation rolls the change back; traffic is normal again until every watched
    // incident has resolved and its alert left Alertmanager's active set (at most 3 h).
    sim.end_effect("chg-0042", end_ms);
    h.send_change(&sim::rolled_back_change(
        "chg-0042",
        end_ms,
        "test-automation",
    ))
    .await;
    let limit = (guardrail::event::now_ms() - 60_000).min(end_ms + 3 * common::HOUR);
    let mut remaining = watched.clone();
    while !remaining.is_empty() && sim.now_ms() < limit {
        let to = (sim.now_ms() + 5 * 60_000).min(limit);
        h.drive(&mut sim, to, 5 * 60_000, |_| {}).await;
        // Give the push a moment, then see what is still active.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let active = am.active().await;
        remaining.retain(|id| active.iter().any(|a| label(a, "incident_id") == id));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !remaining.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let active = am.active().await;
        remaining.retain(|id| active.iter().any(|a| label(a, "incident_id") == id));
    }
    assert!(
        remaining.is_empty(),
        "still active in Alertmanager after {} min of normal traffic: {remaining:?}\nincidents: {}",
        (sim.now_ms() - end_ms) / 60_000,
        h.get("/api/incidents").await.1
    );
    eprintln!(
        "resolved in Alertmanager after {} min of event time; total {:?}",
        (sim.now_ms() - end_ms) / 60_000,
        t0.elapsed()
    );
    // They left because guardrail resolved them (endsAt = resolved_at), not by expiry.
    for id in &watched {
        let (status, body) = h.get(&format!("/api/incidents/{id}")).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(
            (status, v["status"].as_str()),
            (200, Some("resolved")),
            "{body}"
        );
    }

    let (_, metrics) = h.get("/metrics").await;
    let ok = common::metric_value(
        &metrics,
        r#"guardrail_alertmanager_posts_total{result="ok"}"#,
    )
    .unwrap_or(0.0);
    assert!(ok >= 2.0, "posts ok = {ok}\n{metrics}");
    let errors = common::metric_value(
        &metrics,
        r#"guardrail_alertmanager_posts_total{result="error"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "posts failed:\n{}", am.log());
    h.stop().await;
}
