//! Governance end to end on the embedded broker: the real service (consumer group, producer,
//! authenticated HTTP control API) deciding by tier. One afternoon of simulated traffic, three
//! harmful changes in turn:
//!
//! - `chg-sup` (supervised): the rollback waits for the veto window, then goes out;
//! - `chg-veto` (supervised): a person vetoes within the window, no rollback ever goes out;
//! - `chg-hum` (human): guardrail waits, escalates when nobody decides, then a person approves.
//!
//! Then the audit trail of one change is read back, through the API and through
//! `guardrail audit` on the audit topic, complete and in order.

mod common;

use std::time::Duration;

use common::{
    alice_and_victor, drive_until_incident, http, start, story_afternoon, story_sim,
    tiered_change as change, tiered_effect as effect, Harness, Out, ALICE, HOUR, VICTOR,
};
use serde_json::Value;

const MIN: i64 = 60_000;

struct Outputs {
    alerts: Vec<Value>,
    rollbacks: Vec<Out>,
    audit: Vec<Value>,
}

fn outputs(h: &Harness) -> Outputs {
    let t = h.cfg.kafka.topics.clone();
    let outs = h.read_all(
        &[&t.alerts, &t.rollbacks, &t.audit],
        Duration::from_millis(700),
    );
    let of =
        |topic: &str| -> Vec<Out> { outs.iter().filter(|o| o.topic == topic).cloned().collect() };
    Outputs {
        alerts: of(&t.alerts).iter().map(|o| o.json()).collect(),
        rollbacks: of(&t.rollbacks),
        audit: of(&t.audit).iter().map(|o| o.json()).collect(),
    }
}

fn rollbacks_for(o: &Outputs, change: &str) -> Vec<Value> {
    o.rollbacks
        .iter()
        .map(|r| r.json())
        .filter(|r| r["data"]["change_id"] == change)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_decide_as_configured_and_people_are_accountable() {
    let h = start(|c| {
        c.detection.warmup_windows = 48;
        c.policy.veto_window_secs = 20 * 60;
        c.policy.escalate_after_secs = 20 * 60;
        c.actors = alice_and_victor();
    })
    .await;
    let t0 = story_afternoon();
    let mut sim = story_sim(t0 - 5 * HOUR);
    h.drive(&mut sim, t0, 5 * MIN, |_| {}).await;

    // --- supervised: the rollback waits for the veto window, then goes out ---------------
    h.send_change(&change("chg-sup", t0, "supervised")).await;
    sim.scenario_mut()
        .effects
        .push(effect("chg-sup", t0, 1.2, 3.0));
    let inc = drive_until_incident(&h, &mut sim, t0 + 40 * MIN, "chg-sup", VICTOR)
        .await
        .expect("the ticket spike is detected and blamed on chg-sup");
    assert_eq!(inc["decision"]["action"], "awaiting_veto_window", "{inc:#}");
    let deadline =
        guardrail::event::parse_time_str(inc["decision"]["deadline"].as_str().unwrap()).unwrap();
    let detected = guardrail::event::parse_time_str(inc["detected_at"].as_str().unwrap()).unwrap();
    assert_eq!(deadline - detected, 20 * MIN);
    // Local gain (clicks +20%), global loss (tickets x3), observational: no holdout here.
    // (The baseline learns a gain, as it is no harm: a larger one, once rolled back, would be
    // a click drop of its own, blamed on the rollback, holding the series when chg-hum hurts
    // clicks below.)
    assert_eq!(inc["comparison"], "observational", "{inc:#}");
    let lg = &inc["local_gain_global_loss"];
    assert_eq!(lg["target"]["metric"], "click_through_rate", "{inc:#}");
    assert!(lg["target"]["effect"].as_f64().unwrap() > 0.1, "{lg:#}");
    h.drive(&mut sim, deadline - 5 * MIN, 5 * MIN, |_| {}).await;
    assert!(
        rollbacks_for(&outputs(&h), "chg-sup").is_empty(),
        "no rollback inside the veto window"
    );
    h.drive(&mut sim, deadline + 10 * MIN, 5 * MIN, |_| {})
        .await;
    let o = outputs(&h);
    let rb = rollbacks_for(&o, "chg-sup");
    assert_eq!(rb.len(), 1, "one rollback once the window ended: {rb:#?}");
    assert_eq!(rb[0]["data"]["tier"], "supervised");
    assert_eq!(rb[0]["data"]["decided_by"]["kind"], "policy");
    assert_eq!(
        rb[0]["data"]["decided_by"]["name"],
        "supervised-veto-window"
    );
    assert_eq!(rb[0]["data"]["rollback"]["restore"], "chg-sup-before");
    let at = guardrail::event::parse_time_str(
        o.audit
            .iter()
            .find(|a| a["action"] == "veto_window_elapsed" && a["change_id"] == "chg-sup")
            .expect("veto window end audited")["event_time"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(at >= deadline, "rollback not before the deadline");
    let now = sim.now_ms();
    sim.end_effect("chg-sup", now);
    h.send_change(&guardrail::sim::rolled_back_change(
        "chg-sup",
        now,
        "rollout-bot",
    ))
    .await;

    // --- supervised, vetoed within the window -------------------------------------------
    let t1 = t0 + 90 * MIN;
    h.drive(&mut sim, t1, 5 * MIN, |_| {}).await;
    h.send_change(&change("chg-veto", t1, "supervised")).await;
    // Tickets only: a click gain reverted by hand below would itself be a click drop (blamed
    // on the revert) that holds the click series when chg-hum hurts clicks later.
    sim.scenario_mut()
        .effects
        .push(effect("chg-veto", t1, 1.0, 3.0));
    let inc = drive_until_incident(&h, &mut sim, t1 + 40 * MIN, "chg-veto", VICTOR)
        .await
        .expect("chg-veto's spike is detected");
    let id = inc["incident_id"]
        .as_str()
        .or(inc["id"].as_str())
        .unwrap()
        .to_string();
    let veto_url = format!("{}/api/incidents/{id}/veto", h.http);
    let (code, body) = http(&veto_url, "POST", None, None).await;
    assert_eq!(code, 401, "no token: {body}");
    let (code, body) = http(&veto_url, "POST", Some("not-a-known-token-at-all"), None).await;
    assert_eq!(code, 401, "unknown token: {body}");
    let (code, body) = http(&veto_url, "POST", Some(VICTOR), None).await;
    assert_eq!(code, 403, "a viewer may not veto: {body}");
    assert!(body.contains("victor"), "{body}");
    let (code, body) = http(
        &veto_url,
        "POST",
        Some(ALICE),
        Some(r#"{"reason":"planned promotion: tickets expected"}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["decision"]["action"], "vetoed", "{out:#}");
    let (code, _) = http(&veto_url, "POST", Some(ALICE), None).await;
    assert_eq!(code, 409, "a second veto conflicts");
    h.drive(&mut sim, t1 + 60 * MIN, 5 * MIN, |_| {}).await;
    let o = outputs(&h);
    assert!(
        rollbacks_for(&o, "chg-veto").is_empty(),
        "vetoed: never rolled back"
    );
    let veto = o
        .audit
        .iter()
        .find(|a| a["action"] == "veto" && a["change_id"] == "chg-veto")
        .expect("veto audited");
    assert_eq!(veto["actor"]["kind"], "human");
    assert!(
        veto["actor"]["name"].as_str().unwrap().starts_with("alice"),
        "{veto:#}"
    );
    assert_eq!(
        veto["evidence"]["reason"],
        "planned promotion: tickets expected"
    );
    // A person reverts it by hand later.
    let now = sim.now_ms();
    sim.end_effect("chg-veto", now);
    h.send_change(&guardrail::sim::rolled_back_change(
        "chg-veto", now, "alice",
    ))
    .await;

    // --- human: waits, escalates, then a person approves ------------------------------
    let t2 = t1 + 150 * MIN;
    h.drive(&mut sim, t2, 5 * MIN, |_| {}).await;
    h.send_change(&change("chg-hum", t2, "human")).await;
    sim.scenario_mut()
        .effects
        .push(effect("chg-hum", t2, 0.6, 1.0));
    let inc = drive_until_incident(&h, &mut sim, t2 + 50 * MIN, "chg-hum", VICTOR)
        .await
        .expect("the click-through drop is detected");
    assert_eq!(inc["decision"]["action"], "needs_human_decision", "{inc:#}");
    assert_eq!(inc["severity"], "warning");
    let id = inc["incident_id"]
        .as_str()
        .or(inc["id"].as_str())
        .unwrap()
        .to_string();
    let deadline =
        guardrail::event::parse_time_str(inc["decision"]["deadline"].as_str().unwrap()).unwrap();
    h.drive(&mut sim, deadline + 10 * MIN, 5 * MIN, |_| {})
        .await;
    let o = outputs(&h);
    assert!(
        rollbacks_for(&o, "chg-hum").is_empty(),
        "human tier never acts alone"
    );
    let sent: Vec<&Value> = o
        .alerts
        .iter()
        .filter(|a| a["incident_id"] == id.as_str())
        .collect();
    assert_eq!(sent.len(), 2, "the alert, then its escalation: {sent:#?}");
    assert_eq!(sent[0]["severity"], "warning");
    assert_eq!(sent[1]["severity"], "critical");
    assert_eq!(sent[1]["escalated"], true);
    assert_eq!(sent[1]["status"], "firing");
    assert!(o
        .audit
        .iter()
        .any(|a| a["action"] == "escalation" && a["incident_id"] == id.as_str()));
    let (code, body) = http(
        &format!("{}/api/incidents/{id}/approve", h.http),
        "POST",
        Some(ALICE),
        Some(r#"{"reason":"clicks matter more"}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let o = outputs(&h);
    let rb = rollbacks_for(&o, "chg-hum");
    assert_eq!(rb.len(), 1, "approved: one rollback: {rb:#?}");
    assert_eq!(rb[0]["data"]["decided_by"]["kind"], "human");
    assert!(rb[0]["data"]["decided_by"]["name"]
        .as_str()
        .unwrap()
        .starts_with("alice"));
    let raw = o
        .rollbacks
        .iter()
        .find(|r| r.json()["data"]["change_id"] == "chg-hum")
        .unwrap();
    assert!(raw.headers["guardrail-signature"].starts_with("v1="));

    // --- the story of one change, complete and in order -------------------------------
    let (code, body) = http(
        &format!("{}/api/changes/chg-veto/audit", h.http),
        "GET",
        Some(VICTOR),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let api: Value = serde_json::from_str(&body).unwrap();
    let api_ids: Vec<String> = api["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["audit_id"].as_str().unwrap().to_string())
        .collect();
    let actions: Vec<String> = api["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    let pos = |a: &str| {
        actions
            .iter()
            .position(|x| x == a)
            .unwrap_or_else(|| panic!("{a} missing from {actions:?}"))
    };
    assert!(pos("guard_opened") < pos("detection"), "{actions:?}");
    assert!(
        pos("detection") < pos("human_decision_requested"),
        "{actions:?}"
    );
    assert!(pos("human_decision_requested") < pos("veto"), "{actions:?}");
    assert!(pos("veto") < pos("guard_closed"), "{actions:?}");
    assert!(
        !actions.iter().any(|a| a == "rollback_requested"),
        "{actions:?}"
    );
    let seqs: Vec<u64> = api["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    // Every record of the topic that names chg-veto is in the story.
    let on_topic = o
        .audit
        .iter()
        .filter(|a| a["change_id"] == "chg-veto")
        .count();
    assert!(on_topic > 0 && on_topic <= api_ids.len());

    let t = h.cfg.kafka.topics.clone();
    let cli = tokio::task::spawn_blocking({
        let brokers = h.cluster.bootstrap_servers();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_guardrail"))
                .args([
                    "audit",
                    "--change",
                    "chg-veto",
                    "--brokers",
                    &brokers,
                    "--topic",
                    &t.audit,
                    "--json",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli_ids: Vec<String> = String::from_utf8_lossy(&cli.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["audit_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        cli_ids, api_ids,
        "the CLI reads the same story from the audit topic"
    );

    let m = h.get("/metrics").await.1;
    assert!(
        common::metric_value(&m, "guardrail_human_decisions_total{verb=\"veto\"}").unwrap() >= 1.0
    );
    assert!(
        common::metric_value(&m, "guardrail_human_decisions_total{verb=\"approve\"}").unwrap()
            >= 1.0
    );
    assert!(common::metric_value(&m, "guardrail_escalations_total").unwrap() >= 1.0);
    h.stop().await;
}
