//! End to end on the embedded broker: the real service (librdkafka consumer group, producer,
//! HTTP) in process against librdkafka's mock cluster.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{metric_value, start, story_afternoon, HOUR, SECRET};
use guardrail::sim::{Effect, Scenario, Sim};
use guardrail::sink::{stable_id, Signer};

fn change_json(id: &str, ts: i64) -> String {
    serde_json::json!({
        "change_id": id, "ts": guardrail::event::fmt_time(ts), "action": "applied",
        "actor": {"kind": "agent", "name": "copy-optimizer-v3"}, "kind": "wording",
        "scope": {"surfaces": ["checkout"], "dims": {"country": ["FR", "BE"]}},
        "tier": "autonomous", "owner": "team-growth", "rollback": {"restore": "cta-v12"}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversion_drop_after_change_is_detected_attributed_and_rolled_back() {
    let h = start(|c| c.detection.warmup_windows = 48).await;
    let change_ms = story_afternoon();
    let start_ms = change_ms - 5 * HOUR;
    let mut sim = common::story_sim(start_ms);
    // Keep a copy of everything produced, to replay the same input from files afterwards.
    let dir = tempfile::tempdir().unwrap();
    let events_path = dir.path().join("events.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&events_path).unwrap());
    let mut produced = 0u64;
    let mut change_sent = false;
    while sim.now_ms() < change_ms + 2 * HOUR {
        if !change_sent && sim.now_ms() >= change_ms {
            h.send_change(&change_json("chg-t1", change_ms)).await;
            // Only conversions move: a 15% drop in FR and BE.
            sim.scenario_mut().effects.push(Effect {
                change_id: "chg-t1".into(),
                countries: vec!["FR".into(), "BE".into()],
                start_ms: change_ms,
                end_ms: None,
                ctr_mult: 1.0,
                conversion_mult: 0.85,
                ticket_mult: 1.0,
            });
            change_sent = true;
        }
        let to = sim.now_ms() + 5 * 60_000;
        produced += h
            .drive(&mut sim, to, 5 * 60_000, |v| {
                file.write_all(v).unwrap();
                file.write_all(b"\n").unwrap();
            })
            .await;
    }
    file.flush().unwrap();
    let t = h.cfg.kafka.topics.clone();
    let outs = h.read_all(&[&t.alerts, &t.rollbacks, &t.audit], Duration::from_secs(2));
    let alerts: Vec<_> = outs
        .iter()
        .filter(|o| o.topic == t.alerts)
        .map(|o| o.json())
        .collect();
    let conv: Vec<_> = alerts
        .iter()
        .filter(|a| a["status"] == "firing" && a["metric"] == "conversion_rate")
        .collect();
    assert!(!conv.is_empty(), "no conversion alert among {alerts:#?}");
    for a in &conv {
        assert_eq!(a["candidate_changes"][0]["change_id"], "chg-t1", "{a:#}");
        assert_eq!(a["kind"], "drop");
        assert_eq!(a["severity"], "critical");
        let detected =
            guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap();
        assert!(detected > change_ms && detected < change_ms + 2 * HOUR);
        let url = a["url"].as_str().unwrap();
        assert!(url.starts_with(&h.http) && url.ends_with(a["incident_id"].as_str().unwrap()));
        for f in [
            "observed",
            "expected",
            "expected_low",
            "expected_high",
            "onset",
            "emitted_at",
            "top_segments",
            "series",
        ] {
            assert!(!a[f].is_null(), "alert lacks {f}");
        }
    }
    // No alert on the metrics the change did not move.
    assert!(
        alerts.iter().all(|a| a["metric"] == "conversion_rate"),
        "unexpected alerts: {:#?}",
        alerts
            .iter()
            .filter(|a| a["metric"] != "conversion_rate")
            .collect::<Vec<_>>()
    );
    let rollbacks: Vec<_> = outs.iter().filter(|o| o.topic == t.rollbacks).collect();
    assert_eq!(
        rollbacks.len(),
        1,
        "exactly one rollback request for the change"
    );
    let rb = rollbacks[0];
    let signer = Signer::new("k1", SECRET.as_bytes());
    assert!(
        signer.verify(&rb.value, &rb.headers["guardrail-signature"]),
        "signature verifies"
    );
    assert!(!Signer::new("k1", b"wrong").verify(&rb.value, &rb.headers["guardrail-signature"]));
    assert_eq!(rb.headers["guardrail-key-id"], "k1");
    assert_eq!(rb.key.as_deref(), Some("chg-t1"));
    let v = rb.json();
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["type"], "io.guardrail.rollback.requested");
    assert_eq!(v["source"], "guardrail/guardrail-1");
    assert_eq!(v["datacontenttype"], "application/json");
    assert_eq!(v["data"]["change_id"], "chg-t1");
    assert_eq!(v["data"]["tier"], "autonomous");
    assert_eq!(
        v["data"]["rollback"],
        serde_json::json!({"restore": "cta-v12"})
    );
    let inc = v["data"]["incident_id"].as_str().unwrap();
    assert_eq!(v["id"], stable_id("rb-", &[inc, "chg-t1"]));
    // The audit trail has the detection, the policy evaluation and the request, in order.
    let audit: Vec<_> = outs
        .iter()
        .filter(|o| o.topic == t.audit)
        .map(|o| o.json())
        .filter(|a| a["incident_id"] == inc)
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        audit[..3],
        ["detection", "policy_evaluation", "rollback_requested"]
    );

    // Incidents over HTTP.
    let (code, body) = h.get(&format!("/api/incidents/{inc}")).await;
    assert_eq!(code, 200, "{body}");
    let (code, page) = h.get(&format!("/incidents/{inc}")).await;
    assert_eq!(code, 200);
    assert!(page.contains("chg-t1") && page.contains("rollback_requested"));
    let (_, m) = h.get("/metrics").await;
    for l in m.lines().filter(|l| {
        l.starts_with("guardrail_events_rejected_total")
            || l.starts_with("guardrail_windows_closed")
    }) {
        eprintln!("{l}");
    }
    let report = h.stop().await;
    assert_eq!(report.events, produced);

    // The same input replayed from files gives the same incident and rollback id.
    let changes_path = dir.path().join("changes.jsonl");
    std::fs::write(&changes_path, change_json("chg-t1", change_ms) + "\n").unwrap();
    let mut cfg =
        guardrail::config::Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "x").unwrap();
    cfg.detection.warmup_windows = 48;
    let out = dir.path().join("out");
    guardrail::replay::replay(
        &cfg,
        &signer,
        &guardrail::replay::ReplayOptions {
            events: events_path,
            changes: Some(changes_path),
            out: out.clone(),
            progress_every: 0,
        },
    )
    .unwrap();
    for a in &alerts {
        eprintln!(
            "live: {} {} {} {} {}",
            a["status"], a["metric"], a["series"], a["onset"], a["detected_at"]
        );
    }
    for l in std::fs::read_to_string(out.join("alerts.jsonl"))
        .unwrap()
        .lines()
    {
        let a: serde_json::Value = serde_json::from_str(l).unwrap();
        eprintln!(
            "replay: {} {} {} {} {}",
            a["status"], a["metric"], a["series"], a["onset"], a["detected_at"]
        );
    }
    let replayed = std::fs::read_to_string(out.join("rollbacks.jsonl")).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(replayed.lines().next().expect("a rollback")).unwrap();
    assert_eq!(
        line["id"], v["id"],
        "rollback id is stable between live and replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_alert_on_seven_days_of_null_traffic() {
    let h = start(|_| {}).await;
    // A fixed week (Monday 2026-11-02, in the past) so that the traffic, and so the verdict, is
    // the same on every run: the default rate (0.01 per series-week) still allows 0.2 false
    // alarms in these 20 series-weeks, so a wall-clock-relative week would fail now and then.
    let start_ms = guardrail::event::parse_time_str("2026-11-02T00:00:00Z").unwrap();
    let mut sim = Sim::new(
        Scenario {
            seed: 5,
            peak_sessions_per_min: 80.0,
            ..Scenario::default()
        },
        start_ms,
    );
    let produced = h
        .drive(&mut sim, start_ms + 7 * 24 * HOUR, HOUR, |_| {})
        .await;
    let t = h.cfg.kafka.topics.clone();
    let outs = h.read_all(&[&t.alerts, &t.rollbacks], Duration::from_secs(2));
    let (_, metrics) = h.get("/metrics").await;
    let series = metric_value(&metrics, "guardrail_series_tracked").unwrap();
    let windows = metric_value(&metrics, "guardrail_windows_closed_total").unwrap();
    eprintln!(
        "null traffic: {produced} events, {series} series, {windows} windows closed, {} alerts -> {:.4} false alarms per series-week",
        outs.len(),
        outs.len() as f64 / (series * windows / 2016.0)
    );
    assert!(windows >= 2000.0);
    assert!(
        outs.is_empty(),
        "false alarms: {:#?}",
        outs.iter().map(|o| o.json()).collect::<Vec<_>>()
    );
    let report = h.stop().await;
    assert_eq!(report.events, produced);
    assert_eq!(report.rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_reason_and_the_service_keeps_going() {
    let h = start(|_| {}).await;
    let now = guardrail::event::now_ms();
    let ok = |ts: i64, id: &str| {
        format!(r#"{{"type":"session","ts":{ts},"id":"{id}","dims":{{"country":"FR"}}}}"#)
    };
    let big = format!(
        r#"{{"type":"session","ts":{now},"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let corpus: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "invalid_json"),
        (b"{\"type\":\"session\"".to_vec(), "invalid_json"),
        (vec![b'{', 0xff, 0xfe, b'}'], "invalid_utf8"),
        (format!(r#"{{"ts":{now}}}"#).into_bytes(), "missing_field"),
        (br#"{"type":"session"}"#.to_vec(), "missing_field"),
        (
            br#"{"type":"session","ts":"last tuesday"}"#.to_vec(),
            "bad_timestamp",
        ),
        (
            format!(r#"{{"type":"brand_signal","ts":{now},"value":1e999}}"#).into_bytes(),
            "non_finite_value",
        ),
        (
            format!(r#"{{"type":"session","ts":{now},"dims":{{"country":3}}}}"#).into_bytes(),
            "invalid_field",
        ),
        (big.into_bytes(), "too_large"),
        (ok(now + 3_600_000, "f1").into_bytes(), "future_timestamp"),
        (ok(now, "d1").into_bytes(), ""),
        (ok(now, "d1").into_bytes(), "duplicate"),
        (ok(now + 1, "d2").into_bytes(), ""),
        (ok(now - 3_600_000, "late").into_bytes(), "too_late"),
    ];
    for (v, code) in &corpus {
        if *code == "too_late" {
            // Partitions that never delivered hold the watermark until they count as idle;
            // after that an hour-old event is definitely late.
            assert!(h.wait_event_time(now + 1, Duration::from_secs(30)).await);
            tokio::time::sleep(Duration::from_millis(
                guardrail::engine::SOURCE_IDLE_MS as u64 + 500,
            ))
            .await;
            h.heartbeat(now + 2).await;
        }
        h.send_event(v).await;
    }
    h.send_change(r#"{"change_id":"c1","ts":"yesterday","action":"applied","actor":{"kind":"human","name":"x"}}"#).await;
    h.send_change(r#"{"change_id":"c2","action":"applied"}"#)
        .await;
    for _ in 0..100 {
        let (_, m) = h.get("/metrics").await;
        if metric_value(
            &m,
            "guardrail_events_rejected_total{error_code=\"too_late\"}",
        ) == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = h.cfg.kafka.topics.clone();
    let dlq = h.read_all(&[&t.dlq], Duration::from_secs(2));
    let expected: Vec<(&[u8], &str)> = corpus
        .iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(v, c)| (v.as_slice(), *c))
        .collect();
    let event_dlq: Vec<_> = dlq
        .iter()
        .filter(|d| d.headers["guardrail-source"].starts_with(&t.events))
        .collect();
    assert_eq!(
        event_dlq.len(),
        expected.len(),
        "{:#?}",
        dlq.iter().map(|d| &d.headers).collect::<Vec<_>>()
    );
    for (v, code) in &expected {
        let d = event_dlq
            .iter()
            // The bytes, cut at max_event_bytes (64 KiB) for the one that is too large.
            .find(|d| {
                v.starts_with(&d.value)
                    && d.headers["guardrail-original-bytes"] == v.len().to_string()
            })
            .unwrap_or_else(|| panic!("{code} not dead-lettered"));
        assert_eq!(d.headers["guardrail-error-code"], *code);
        assert!(!d.headers["guardrail-error"].is_empty());
        assert!(d.headers["guardrail-source"].starts_with(&format!("{}/", t.events)));
    }
    let change_codes: Vec<_> = dlq
        .iter()
        .filter(|d| d.headers["guardrail-source"].starts_with(&t.changes))
        .map(|d| d.headers["guardrail-error-code"].clone())
        .collect();
    assert_eq!(change_codes, ["bad_timestamp", "missing_field"]);

    let (code, body) = h.get("/metrics").await;
    assert_eq!(code, 200);
    for c in [
        "invalid_json",
        "invalid_utf8",
        "missing_field",
        "bad_timestamp",
        "non_finite_value",
        "invalid_field",
        "too_large",
        "future_timestamp",
        "duplicate",
        "too_late",
    ] {
        let n = metric_value(
            &body,
            &format!("guardrail_events_rejected_total{{error_code=\"{c}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(n >= 1.0, "{c} counted: {n}");
    }
    // d1, d2 and the heartbeat.
    assert_eq!(
        metric_value(&body, "guardrail_events_accepted_total"),
        Some(3.0)
    );
    assert_eq!(h.get("/healthz").await.0, 200);
    assert_eq!(h.get("/readyz").await.0, 200);
    // Still consuming after the bad input.
    h.send_event(ok(now + 3, "after").as_bytes()).await;
    assert!(
        h.wait_event_time(now + 3, Duration::from_secs(30)).await,
        "service kept going"
    );
    let report = h.stop().await;
    assert_eq!(report.events, corpus.len() as u64 + 2);
}
