//! One API for a group of instances (`[scale] peers`): two real services on the embedded
//! broker, each told the other's address. The incident is raised on one; the other answers for
//! it (its JSON, its page, the lists, its audit trail) and carries a person's veto to it, over
//! real HTTP both ways. Then the holder stops: the other says it cannot tell, never "no such
//! incident".

mod common;

use std::time::Duration;

use common::{
    alice_and_victor, drive_until_incident, http, http_get, http_with, metric_value, start_on,
    story_afternoon, story_sim, tiered_change, tiered_effect, Harness, ALICE, HOUR, VICTOR,
};
use guardrail::config::Config;
use serde_json::Value;

const MIN: i64 = 60_000;

fn group_member(c: &mut Config, instance: &str, peer: &str) {
    c.service.instance = instance.into();
    c.scale.peers = vec![peer.into()];
    c.scale.peer_timeout_ms = 1000;
    c.detection.warmup_windows = 48;
    c.policy.veto_window_secs = 20 * 60;
    c.policy.escalate_after_secs = 20 * 60;
    c.actors = alice_and_victor();
}

async fn get_json(url: &str, token: &str) -> (u16, Value) {
    let (code, body) = http(url, "GET", Some(token), None).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"));
    (code, v)
}

async fn peer_requests(h: &Harness, result: &str) -> f64 {
    let (_, m) = http_get(&format!("{}/metrics", h.http)).await;
    metric_value(
        &m,
        &format!("guardrail_peer_requests_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_instance_answers_and_acts_for_the_incident_another_holds() {
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (url_a, url_b) = (
        format!("http://{}", la.local_addr().unwrap()),
        format!("http://{}", lb.local_addr().unwrap()),
    );
    let a = start_on(la, |c| group_member(c, "guardrail-a", &url_b)).await;
    let b = start_on(lb, |c| group_member(c, "guardrail-b", &url_a)).await;

    // The incident happens on B (its input); A holds nothing.
    let t0 = story_afternoon();
    let mut sim = story_sim(t0 - 5 * HOUR);
    b.drive(&mut sim, t0, 5 * MIN, |_| {}).await;
    b.send_change(&tiered_change("chg-sup", t0, "supervised"))
        .await;
    sim.scenario_mut()
        .effects
        .push(tiered_effect("chg-sup", t0, 1.3, 3.0));
    let inc = drive_until_incident(&b, &mut sim, t0 + 40 * MIN, "chg-sup", VICTOR)
        .await
        .expect("the ticket spike is detected on B");
    let id = inc["id"].as_str().unwrap().to_string();
    assert_eq!(inc["decision"]["action"], "awaiting_veto_window", "{inc:#}");
    let (_, on_b) = get_json(&format!("{}/api/incidents/{id}", b.http), VICTOR).await;

    // --- A answers for it: the JSON, relayed as B gave it, and marked with who gave it ----
    let (code, headers, body) = http_with(
        &format!("{}/api/incidents/{id}", a.http),
        "GET",
        &[("Authorization", &format!("Bearer {VICTOR}"))],
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let on_a: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(on_a["id"], on_b["id"]);
    assert_eq!(on_a["decision"], on_b["decision"]);
    assert_eq!(on_a["history"], on_b["history"]);
    assert_eq!(headers.get("x-guardrail-served-by"), Some(&url_b));
    assert!(peer_requests(&a, "ok").await >= 1.0);
    // Access is checked where the call arrives: no token, no forwarding.
    let (code, _) = http(&format!("{}/api/incidents/{id}", a.http), "GET", None, None).await;
    assert_eq!(code, 401);
    // A request from a peer is answered from the peer's own state only: nothing loops.
    let (code, _, body) = http_with(
        &format!("{}/api/incidents/{id}", a.http),
        "GET",
        &[
            ("Authorization", &format!("Bearer {VICTOR}")),
            ("x-guardrail-forwarded", "guardrail-b"),
        ],
        None,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    // An id nobody holds is 404, and says it was asked around.
    let (code, v) = get_json(
        &format!("{}/api/incidents/no-such-incident", a.http),
        VICTOR,
    )
    .await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("1 peer instances"),
        "{v}"
    );

    // --- the alert's link works on A: the page, and the lists of the whole group ----------
    let (code, page) = http_get(&format!("{}/incidents/{id}", a.http)).await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains(&id) && page.contains("<svg") && page.contains("chg-sup"),
        "the incident page with its chart and its change"
    );
    let (code, list) = get_json(&format!("{}/api/incidents", a.http), VICTOR).await;
    assert_eq!(code, 200);
    assert!(
        list["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id.as_str()),
        "{list:#}"
    );
    assert_eq!(list["partial"], false, "{list:#}");
    assert_eq!(list["peers"][0]["url"], url_b.as_str());
    assert_eq!(list["peers"][0]["status"], "ok");
    // B's own list has the same incidents once (A's list of B's is not counted twice).
    let (_, list_b) = get_json(&format!("{}/api/incidents", b.http), VICTOR).await;
    assert_eq!(
        list_b["incidents"].as_array().unwrap().len(),
        list["incidents"].as_array().unwrap().len()
    );
    let (code, page) = http_get(&format!("{}/incidents", a.http)).await;
    assert_eq!(code, 200);
    assert!(
        page.contains(&format!("href=\"/incidents/{id}\"")),
        "{page}"
    );
    assert!(page.contains("1 peer(s)"), "{page}");
    // The page's data, as open as the page (peers gather it for their pages this way).
    let (code, body) = http_get(&format!("{}/incidents?format=json", a.http)).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["id"] == id.as_str()));
    let (code, body) = http_get(&format!("{}/incidents?format=xml", a.http)).await;
    assert_eq!(code, 400, "{body}");

    // --- a person vetoes through A: B decides, audits, and A shows B's trail -----------
    let veto_on_a = format!("{}/api/incidents/{id}/veto", a.http);
    let (code, body) = http(&veto_on_a, "POST", Some(VICTOR), None).await;
    assert_eq!(code, 403, "a viewer may not veto, on any instance: {body}");
    let (code, body) = http(
        &veto_on_a,
        "POST",
        Some(ALICE),
        Some(r#"{"reason":"planned promotion"}"#),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["decision"]["action"], "vetoed", "{out:#}");
    let (_, now_on_b) = get_json(&format!("{}/api/incidents/{id}", b.http), VICTOR).await;
    assert_eq!(now_on_b["decision"]["action"], "vetoed", "B holds the veto");
    let (code, body) = http(&veto_on_a, "POST", Some(ALICE), None).await;
    assert_eq!(code, 409, "B's answer to a second veto, relayed: {body}");
    let (code, trail) = get_json(&format!("{}/api/changes/chg-sup/audit", a.http), VICTOR).await;
    assert_eq!(code, 200, "{trail}");
    let veto = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "veto")
        .unwrap_or_else(|| panic!("the veto is in the trail A shows: {trail:#}"));
    assert!(veto["actor"]["name"].as_str().unwrap().starts_with("alice"));
    assert_eq!(veto["evidence"]["reason"], "planned promotion");

    // --- B stops: A cannot tell, and says so --------------------------------------------
    b.stop().await;
    let unreachable_before = peer_requests(&a, "unreachable").await;
    let (code, v) = get_json(&format!("{}/api/incidents/{id}", a.http), VICTOR).await;
    assert_eq!(code, 503, "may exist on a peer that is down: {v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("could not be asked"),
        "{v}"
    );
    let (code, list) = get_json(&format!("{}/api/incidents", a.http), VICTOR).await;
    assert_eq!(code, 200);
    assert_eq!(list["partial"], true, "{list:#}");
    assert_eq!(list["peers"][0]["status"], "unreachable", "{list:#}");
    let (_, page) = http_get(&format!("{}/incidents", a.http)).await;
    assert!(page.contains("Incomplete: peer"), "{page}");
    assert!(peer_requests(&a, "unreachable").await >= unreachable_before + 2.0);
    tokio::time::timeout(Duration::from_secs(30), a.stop())
        .await
        .expect("A stops");
}
