//! The command line as users run it: the real binary, real files.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_guardrail"))
}

#[test]
fn check_config_accepts_the_default_and_locates_errors() {
    let out = bin()
        .args(["check-config", "config/guardrail.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("6 metrics"));

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[engine]\nwindow_secs = 300\nlateness_secs = 3\n").unwrap();
    let out = bin().arg("check-config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:1"), "{err}");
    assert!(err.contains("unknown field `lateness_secs`"), "{err}");

    std::fs::write(
        &p,
        "[[metrics]]\nname = \"cr\"\nkind = \"ratio\"\nnumerator = { type = \"conversion\" }\n",
    )
    .unwrap();
    let out = bin().arg("check-config").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("bad.toml:1:1") && err.contains("denominator"),
        "{err}"
    );
}

/// `guardrail replay` with the default config and the signing secret "replay-secret".
fn replay(events: &Path, changes: &Path, out: &Path) -> std::process::Output {
    bin()
        .env("GUARDRAIL_SIGNING_SECRET", "replay-secret")
        .args(["replay", "--quiet", "--config", "config/guardrail.toml"])
        .arg("--events")
        .arg(events)
        .arg("--changes")
        .arg(changes)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn simulate_then_replay_writes_the_contract_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let changes = dir.path().join("changes.jsonl");
    let out = dir.path().join("out");
    let st = bin()
        .args([
            "simulate",
            "--hours",
            "17",
            "--story-at-hours",
            "13",
            "--start",
            "2026-11-02T01:00:00Z",
            "--peak-sessions-per-min",
            "2500",
        ])
        .arg("--out")
        .arg(&events)
        .arg("--changes-out")
        .arg(&changes)
        .status()
        .unwrap();
    assert!(st.success());
    // A malformed line in the middle must be dead-lettered, not stop the replay.
    let mut text = std::fs::read_to_string(&events).unwrap();
    let mid = text.len() / 2;
    let nl = text[mid..].find('\n').unwrap() + mid + 1;
    text.insert_str(nl, "{\"type\":\"session\",\"ts\":\"garbage\"}\n");
    std::fs::write(&events, text).unwrap();

    let o = replay(&events, &changes, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["events_rejected"]["bad_timestamp"], 1);
    assert!(summary["events_accepted"].as_u64().unwrap() > 1_000_000);
    assert_eq!(summary["rollbacks_requested"], 1);
    assert_eq!(summary["rollbacks_confirmed"], 1);

    let alerts: Vec<serde_json::Value> = std::fs::read_to_string(out.join("alerts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let firing: Vec<_> = alerts.iter().filter(|a| a["status"] == "firing").collect();
    assert!(firing
        .iter()
        .any(|a| a["metric"] == "conversion_rate" && a["series"]["country"] == "FR"));
    assert!(firing
        .iter()
        .any(|a| a["metric"] == "support_tickets_per_session"));
    assert!(
        firing
            .iter()
            .all(|a| a["candidate_changes"][0]["change_id"] == "chg-0042"),
        "{firing:#?}"
    );
    // Every incident resolves after the rollback (an hour after the change). Counted by
    // incident: one waiting on a person (the total, wider than the change's scope) is re-sent
    // when it escalates.
    let ids = |status: &str| {
        alerts
            .iter()
            .filter(|a| a["status"] == status)
            .map(|a| a["incident_id"].as_str().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(ids("resolved"), ids("firing"));
    // One cause: one group.
    let groups: std::collections::BTreeSet<_> = firing
        .iter()
        .map(|a| a["group_id"].as_str().unwrap())
        .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");

    let rb_text = std::fs::read_to_string(out.join("rollbacks.jsonl")).unwrap();
    let rb_line = rb_text.lines().next().unwrap();
    let rb: serde_json::Value = serde_json::from_str(rb_line).unwrap();
    assert_eq!(rb["data"]["change_id"], "chg-0042");
    assert_eq!(rb["specversion"], "1.0");
    let sigs = std::fs::read_to_string(out.join("rollbacks.signatures.jsonl")).unwrap();
    let sig: serde_json::Value = serde_json::from_str(sigs.lines().next().unwrap()).unwrap();
    let signer = guardrail::sink::Signer::new("k1", b"replay-secret");
    assert!(signer.verify(
        rb_line.as_bytes(),
        sig["headers"]["guardrail-signature"].as_str().unwrap()
    ));
    assert!(!signer.verify(
        rb_line.replace("chg-0042", "chg-0043").as_bytes(),
        sig["headers"]["guardrail-signature"].as_str().unwrap()
    ));

    let audit = std::fs::read_to_string(out.join("audit.jsonl")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for a in [
        "detection",
        "policy_evaluation",
        "rollback_requested",
        "rollback_confirmed",
        "incident_resolved",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "audit lacks {a}: {actions:?}"
        );
    }
    let dead = std::fs::read_to_string(out.join("dead_letters.jsonl")).unwrap();
    assert!(dead.contains("bad_timestamp") && dead.contains("garbage"));

    // The same story with a `human` change: guardrail must not act alone; the alert and the
    // audit say a human decision is needed (a replay has nobody to approve).
    let text = std::fs::read_to_string(&changes).unwrap();
    assert!(text.contains("\"tier\":\"autonomous\""));
    let with_tier = |tier: &str| {
        let p = dir.path().join(format!("changes-{tier}.jsonl"));
        std::fs::write(
            &p,
            text.replace("\"tier\":\"autonomous\"", &format!("\"tier\":\"{tier}\"")),
        )
        .unwrap();
        p
    };
    let out2 = dir.path().join("out-human");
    let o = replay(&events, &with_tier("human"), &out2);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read_to_string(out2.join("rollbacks.jsonl")).unwrap(),
        ""
    );
    let firing: Vec<serde_json::Value> = std::fs::read_to_string(out2.join("alerts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|a| a["status"] == "firing" && !a["escalated"].as_bool().unwrap_or(false))
        .collect();
    assert!(!firing.is_empty());
    for a in &firing {
        assert_eq!(a["decision"]["action"], "needs_human_decision", "{a:#}");
        assert_eq!(a["decision"]["tier"], "human");
    }
    let audit = std::fs::read_to_string(out2.join("audit.jsonl")).unwrap();
    assert_eq!(
        audit
            .matches("\"action\":\"human_decision_requested\"")
            .count(),
        firing.len()
    );

    // `supervised`: nobody vetoes in a replay, so the rollback goes out when the veto window
    // (15 min of event time) ends.
    let out3 = dir.path().join("out-supervised");
    let o = replay(&events, &with_tier("supervised"), &out3);
    assert!(o.status.success());
    let rb: Vec<serde_json::Value> = std::fs::read_to_string(out3.join("rollbacks.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rb.len(), 1, "{rb:#?}");
    assert_eq!(
        rb[0]["data"]["decided_by"]["name"],
        "supervised-veto-window"
    );
    let alerts: Vec<serde_json::Value> = std::fs::read_to_string(out3.join("alerts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = alerts
        .iter()
        .find(|a| a["incident_id"] == rb[0]["data"]["incident_id"])
        .unwrap();
    assert_eq!(first["decision"]["action"], "awaiting_veto_window");
    let deadline = first["decision"]["deadline"].as_str().unwrap();
    let audit3 = std::fs::read_to_string(out3.join("audit.jsonl")).unwrap();
    let elapsed = audit3
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|a| a["action"] == "veto_window_elapsed")
        .unwrap();
    assert!(elapsed["event_time"].as_str().unwrap() >= deadline);
}

/// Issue 19: one event from a fast clock used to move event time for everyone: 290 s ahead
/// (inside the future skew), it closed the windows the rest of the stream was still filling
/// and 45,203 of 46,801 events became `too_late`. An event from year 0001 was accepted.
#[test]
fn one_fast_clock_makes_nothing_late_and_year_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let changes = dir.path().join("changes.jsonl");
    let st = bin()
        .args([
            "simulate",
            "--hours",
            "1",
            "--start",
            "2026-11-02T10:00:00Z",
        ])
        .arg("--out")
        .arg(&events)
        .arg("--changes-out")
        .arg(&changes)
        .status()
        .unwrap();
    assert!(st.success());
    let clean = dir.path().join("clean");
    let o = replay(&events, &changes, &clean);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Ten minutes in: one event 290 s ahead of its neighbours, then one from year 0001.
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.len() / 6;
    let ts = serde_json::from_str::<serde_json::Value>(lines[at]).unwrap()["ts"].clone();
    let ts = match ts {
        serde_json::Value::Number(n) => n.as_i64().unwrap(),
        serde_json::Value::String(s) => guardrail::event::parse_time_str(&s).unwrap(),
        other => panic!("ts {other}"),
    };
    let fast = format!(
        r#"{{"type":"session","ts":{},"user":"fast-clock"}}"#,
        ts + 290_000
    );
    let ancient = r#"{"type":"session","ts":"0001-01-01T00:00:00Z","user":"year-one"}"#;
    let mut skewed: Vec<&str> = lines.clone();
    skewed.insert(at, ancient);
    skewed.insert(at, &fast);
    let skewed_events = dir.path().join("skewed.jsonl");
    std::fs::write(&skewed_events, skewed.join("\n") + "\n").unwrap();
    let out = dir.path().join("skewed");
    let o = replay(&skewed_events, &changes, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap()
    };
    let (a, b) = (summary(&clean), summary(&out));
    assert_eq!(
        b["events_accepted"].as_u64().unwrap(),
        a["events_accepted"].as_u64().unwrap() + 1,
        "every event of the clean replay, and the fast one: {a:#} vs {b:#}"
    );
    assert_eq!(
        b["events_rejected"]["too_late"],
        a["events_rejected"]["too_late"]
    );
    assert_eq!(b["events_rejected"]["bad_timestamp"], 1);
    assert_eq!(b["event_time_jumps_held"], 1);
    assert_eq!(a["event_time_jumps_held"], 0);
    let dlq = std::fs::read_to_string(out.join("dead_letters.jsonl")).unwrap();
    assert!(
        dlq.contains("year-one") && dlq.contains("before 2000-01-01"),
        "{dlq}"
    );
}

#[test]
fn replay_reports_missing_files_clearly() {
    let o = bin()
        .env("GUARDRAIL_SIGNING_SECRET", "s")
        .args([
            "replay",
            "--config",
            "config/guardrail.toml",
            "--events",
            "/nonexistent/e.jsonl",
            "--out",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read /nonexistent/e.jsonl"));
}

#[test]
fn demo_tells_the_whole_story_and_exits_zero() {
    let o = bin().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for needle in [
        "CHANGE",
        "FIRING",
        "ROLLBACK requested for chg-0042",
        "signature verified",
        "AUTOMATION rolled back",
        "RESOLVED",
        "story holds",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
}

/// Startup errors tell the user what to do, and exit non-zero instead of idling.
#[test]
fn run_reports_startup_problems_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let write_cfg = |bootstrap: &str, listen: &str| {
        let text = guardrail::demo::DEFAULT_CONFIG
            .replace(
                "bootstrap_servers = \"127.0.0.1:9092\"",
                &format!("bootstrap_servers = \"{bootstrap}\""),
            )
            .replace(
                "listen = \"127.0.0.1:9464\"",
                &format!("listen = \"{listen}\""),
            );
        let p = dir.path().join(format!("c{}.toml", rand_port()));
        std::fs::write(&p, text).unwrap();
        p
    };
    let run = |cfg: &std::path::Path| {
        bin()
            .env("GUARDRAIL_SIGNING_SECRET", "s")
            .env("RUST_LOG", "error")
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap()
    };

    // The HTTP port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = run(&write_cfg("127.0.0.1:9", &addr));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("another process"),
        "{err}"
    );

    // A topic is missing on a reachable broker.
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("guardrail.events", 1, 1).unwrap();
    let o = run(&write_cfg(&cluster.bootstrap_servers(), "127.0.0.1:0"));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("topic \"guardrail.changes\" does not exist") && err.contains("Create it"),
        "{err}"
    );

    // Nothing listens at the bootstrap address (the metadata request times out after 15 s).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let o = run(&write_cfg(&closed, "127.0.0.1:0"));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot reach Kafka at {closed}"))
            && err.contains("bootstrap_servers"),
        "{err}"
    );

    // No signing secret.
    let o = bin()
        .env_remove("GUARDRAIL_SIGNING_SECRET")
        .args(["run", "--config"])
        .arg(write_cfg(&cluster.bootstrap_servers(), "127.0.0.1:0"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("GUARDRAIL_SIGNING_SECRET"));
}

fn rand_port() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
