//! Change guards and the stream-wide guards through `guardrail replay` (real files, the real
//! binary): a harmful change caught by treatment vs holdout, a broken split reported as SRM
//! (and not as harm), the circuit breaker stopping a second automatic rollback, variation
//! sprawl and customer pressure.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

fn t0() -> i64 {
    guardrail::event::parse_time_str("2026-11-04T14:00:00Z").unwrap()
}

/// One exposure arm of a change for a country's sessions.
#[derive(Clone)]
struct Arms {
    change_id: &'static str,
    country: &'static str,
    from_ms: i64,
    /// Share of sessions the holdout actually gets.
    holdout_share: f64,
    /// Conversion rate multiplier in treatment.
    treatment_mult: f64,
}

/// Sessions on checkout at `per_min` per country, 5% conversion, from `start` for `minutes`;
/// sessions of a country under a change carry `change_id` and `arm`.
fn write_traffic(
    path: &Path,
    start: i64,
    minutes: i64,
    per_min: u32,
    countries: &[&str],
    arms: &[Arms],
    seed: u64,
) {
    write_traffic_with(path, start, minutes, per_min, countries, arms, seed, None)
}

/// As [`write_traffic`], with an optional tracking outage: no conversion events from
/// `country` in [from, to).
#[allow(clippy::too_many_arguments)]
fn write_traffic_with(
    path: &Path,
    start: i64,
    minutes: i64,
    per_min: u32,
    countries: &[&str],
    arms: &[Arms],
    seed: u64,
    outage: Option<(&str, i64, i64)>,
) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut user = 0u64;
    for m in 0..minutes {
        let t = start + m * MIN;
        for c in countries {
            for k in 0..per_min {
                user += 1;
                let ts = t + (k as i64 * MIN) / per_min as i64;
                let mut p = 0.05;
                let mut extra = String::new();
                if let Some(a) = arms.iter().find(|a| a.country == *c && ts >= a.from_ms) {
                    let holdout = rng.gen::<f64>() < a.holdout_share;
                    if !holdout {
                        p *= a.treatment_mult;
                    }
                    extra = format!(
                        r#","change_id":"{}","arm":"{}""#,
                        a.change_id,
                        if holdout { "holdout" } else { "treatment" }
                    );
                }
                writeln!(
                    f,
                    r#"{{"type":"session","ts":{ts},"user":"u{user}","surface":"checkout","dims":{{"country":"{c}"}}{extra}}}"#
                )
                .unwrap();
                let lost = outage
                    .map(|(oc, a, b)| oc == *c && ts >= a && ts < b)
                    .unwrap_or(false);
                if rng.gen::<f64>() < p && !lost {
                    writeln!(
                        f,
                        r#"{{"type":"conversion","ts":{},"user":"u{user}","surface":"checkout","dims":{{"country":"{c}"}}{extra}}}"#,
                        ts + 1
                    )
                    .unwrap();
                }
            }
        }
    }
    f.flush().unwrap();
}

fn change(id: &str, ts: i64, country: &str, holdout: f64) -> Value {
    json!({"change_id": id, "ts": guardrail::event::fmt_time(ts), "action": "applied",
        "actor": {"kind": "agent", "name": "offer-bandit"}, "kind": "offer", "tier": "autonomous",
        "holdout": holdout, "owner": "team-offers",
        "scope": {"surfaces": ["checkout"], "dims": {"country": [country]}},
        "rollback": {"restore": format!("{id}-off")}})
}

fn shipped() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/guardrail.toml"
    ))
    .unwrap()
}

/// Runs `guardrail replay` over `dir/events.jsonl` with config `cfg`; returns (alerts,
/// rollbacks, audit).
fn replay(dir: &Path, cfg: &str, changes: &[Value]) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let cfg_path = dir.join("g.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let ch = dir.join("changes.jsonl");
    std::fs::write(
        &ch,
        changes.iter().map(|c| format!("{c}\n")).collect::<String>(),
    )
    .unwrap();
    let out = dir.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_guardrail"))
        .args(["replay", "--quiet", "--config"])
        .arg(&cfg_path)
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--changes")
        .arg(&ch)
        .arg("--out")
        .arg(&out)
        .env("GUARDRAIL_SIGNING_SECRET", "s3cret")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |n: &str| -> Vec<Value> {
        std::fs::read_to_string(out.join(n))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    (
        read("alerts.jsonl"),
        read("rollbacks.jsonl"),
        read("audit.jsonl"),
    )
}

#[test]
fn treatment_worse_than_holdout_is_a_breach_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    write_traffic(
        &dir.path().join("events.jsonl"),
        t - HOUR,
        4 * 60,
        600,
        &["FR"],
        &[Arms {
            change_id: "chg-h",
            country: "FR",
            from_ms: t,
            holdout_share: 0.1,
            treatment_mult: 0.75,
        }],
        1,
    );
    let (alerts, rollbacks, audit) =
        replay(dir.path(), &shipped(), &[change("chg-h", t, "FR", 0.1)]);
    let breach: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["kind"] == "guardrail_breach" && a["status"] == "firing")
        .collect();
    assert_eq!(breach.len(), 1, "{alerts:#?}");
    let b = breach[0];
    assert_eq!(b["metric"], "conversion_rate");
    assert_eq!(b["series"]["change_id"], "chg-h");
    assert_eq!(b["comparison"], "treatment_vs_holdout");
    assert!(b["evidence"].as_str().unwrap().contains("mSPRT"), "{b:#}");
    assert!(b["effect"].as_f64().unwrap() < -0.1, "{b:#}");
    assert_eq!(b["candidate_changes"][0]["change_id"], "chg-h");
    assert!(b["observed"].as_f64().unwrap() < b["expected"].as_f64().unwrap());
    let rb: Vec<&Value> = rollbacks
        .iter()
        .filter(|r| r["data"]["change_id"] == "chg-h")
        .collect();
    assert_eq!(rb.len(), 1, "{rollbacks:#?}");
    assert_eq!(rb[0]["data"]["rollback"]["restore"], "chg-h-off");
    assert!(audit
        .iter()
        .any(|a| a["action"] == "guard_opened" && a["change_id"] == "chg-h"));
    // No split problem was reported for a healthy 10% holdout.
    assert!(!alerts.iter().any(|a| a["kind"] == "srm"), "{alerts:#?}");
}

#[test]
fn a_broken_split_is_reported_as_srm_not_as_harm() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    // The change says 10% holdout; assignment actually sends 8% there. No effect at all.
    write_traffic(
        &dir.path().join("events.jsonl"),
        t - HOUR,
        3 * 60,
        600,
        &["FR"],
        &[Arms {
            change_id: "chg-s",
            country: "FR",
            from_ms: t,
            holdout_share: 0.08,
            treatment_mult: 1.0,
        }],
        2,
    );
    let (alerts, rollbacks, audit) =
        replay(dir.path(), &shipped(), &[change("chg-s", t, "FR", 0.1)]);
    let srm: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["kind"] == "srm" && a["status"] == "firing")
        .collect();
    assert_eq!(srm.len(), 1, "{alerts:#?}");
    assert_eq!(srm[0]["series"]["change_id"], "chg-s");
    assert_eq!(srm[0]["decision"]["action"], "investigate");
    assert!(
        srm[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("not trustworthy"),
        "{:#}",
        srm[0]
    );
    assert!((srm[0]["observed"].as_f64().unwrap() - 0.08).abs() < 0.01);
    assert!(
        !alerts.iter().any(|a| a["kind"] == "guardrail_breach"),
        "{alerts:#?}"
    );
    assert!(rollbacks.is_empty(), "{rollbacks:#?}");
    // The watch ends with the split named as the reason comparisons cannot be trusted.
    let closed = audit
        .iter()
        .find(|a| a["action"] == "guard_closed" && a["change_id"] == "chg-s");
    if let Some(c) = closed {
        assert_ne!(c["evidence"]["verdict"], "breached", "{c:#}");
    }
}

#[test]
fn the_circuit_breaker_stops_the_second_automatic_rollback_and_asks_a_human() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    write_traffic(
        &dir.path().join("events.jsonl"),
        t - HOUR,
        4 * 60,
        500,
        &["FR", "DE"],
        &[
            Arms {
                change_id: "chg-a",
                country: "FR",
                from_ms: t,
                holdout_share: 0.1,
                treatment_mult: 0.6,
            },
            Arms {
                change_id: "chg-b",
                country: "DE",
                from_ms: t + 20 * MIN,
                holdout_share: 0.1,
                treatment_mult: 0.6,
            },
        ],
        3,
    );
    // The shipped limit is 2 per surface and hour; this test tightens it to 1.
    let cfg = shipped().replace(
        "max_auto_rollbacks_per_hour_per_surface = 2",
        "max_auto_rollbacks_per_hour_per_surface = 1",
    );
    let (alerts, rollbacks, audit) = replay(
        dir.path(),
        &cfg,
        &[
            change("chg-a", t, "FR", 0.1),
            change("chg-b", t + 20 * MIN, "DE", 0.1),
        ],
    );
    let ids: Vec<&str> = rollbacks
        .iter()
        .map(|r| r["data"]["change_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["chg-a"],
        "one automatic rollback per surface and hour: {rollbacks:#?}"
    );
    let trip = audit
        .iter()
        .find(|a| a["action"] == "circuit_breaker")
        .expect("the breaker trip is audited");
    assert_eq!(trip["change_id"], "chg-b");
    assert!(
        trip["evidence"]["reason"]
            .as_str()
            .unwrap()
            .contains("surface checkout"),
        "{trip:#}"
    );
    let paged: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["decision"]["action"] == "breaker_open")
        .collect();
    assert!(!paged.is_empty(), "the breaker pages a human: {alerts:#?}");
    assert_eq!(paged[0]["severity"], "critical");
    assert!(paged[0]["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("circuit breaker open"));
}

#[test]
fn too_many_variants_on_a_surface_is_sprawl() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("events.jsonl")).unwrap());
    // Two hours of page views on home with 3 variants, then an hour in which an optimiser
    // puts 20 variants live.
    for m in 0..(3 * 60) {
        let n_variants = if m < 120 { 3 } else { 20 };
        for k in 0..40 {
            let ts = t + m * MIN + k * 1000;
            writeln!(
                f,
                r#"{{"type":"page_view","ts":{ts},"surface":"home","variant":"v{}"}}"#,
                (m * 40 + k) % n_variants
            )
            .unwrap();
        }
    }
    f.flush().unwrap();
    drop(f);
    let (alerts, _, _) = replay(dir.path(), &shipped(), &[]);
    let sprawl: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["kind"] == "fragmentation")
        .collect();
    assert_eq!(sprawl.len(), 1, "{alerts:#?}");
    let a = sprawl[0];
    assert_eq!(a["metric"], "variation_sprawl");
    assert_eq!(a["series"]["surface"], "home");
    assert!(
        a["observed"].as_f64().unwrap() > 12.0,
        "over the limit of 12: {a:#}"
    );
    assert!(
        a["evidence"].as_str().unwrap().contains("3 in the window"),
        "{a:#}"
    );
    assert_eq!(a["decision"]["action"], "investigate");
    let onset = guardrail::event::parse_time_str(a["onset"].as_str().unwrap()).unwrap();
    assert_eq!(onset, t + 2 * HOUR);
}

#[test]
fn messages_per_recipient_above_the_cap_is_pressure_with_unsubscribes() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0() - 14 * HOUR; // midnight UTC
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("events.jsonl")).unwrap());
    // Day 1: 200 recipients get 2 emails each. Day 2: 5 each, and 12 unsubscribe.
    let mut lines: Vec<(i64, String)> = Vec::new();
    for day in 0..2i64 {
        let per_user = if day == 0 { 2 } else { 5 };
        for k in 0..per_user {
            for u in 0..200 {
                let ts = t + day * 24 * HOUR + k * 2 * HOUR + u * 1000;
                lines.push((
                    ts,
                    format!(
                        r#"{{"type":"message_sent","ts":{ts},"user":"u{u}","surface":"email"}}"#
                    ),
                ));
            }
        }
    }
    for u in 0..12 {
        let ts = t + 24 * HOUR + HOUR + u * 1000;
        lines.push((
            ts,
            format!(r#"{{"type":"unsubscribe","ts":{ts},"user":"u{u}","surface":"email"}}"#),
        ));
    }
    lines.sort();
    for (_, l) in &lines {
        writeln!(f, "{l}").unwrap();
    }
    // Event time runs to the end of day 2.
    writeln!(
        f,
        r#"{{"type":"heartbeat","ts":{}}}"#,
        t + 48 * HOUR + 10 * MIN
    )
    .unwrap();
    f.flush().unwrap();
    drop(f);
    let (alerts, _, _) = replay(dir.path(), &shipped(), &[]);
    let p: Vec<&Value> = alerts.iter().filter(|a| a["kind"] == "pressure").collect();
    assert_eq!(
        p.len(),
        2,
        "fires on day 2 only, then resolves when the day ends: {alerts:#?}"
    );
    assert_eq!(p[0]["status"], "firing");
    assert_eq!(p[0]["series"]["surface"], "email");
    assert!(p[0]["observed"].as_f64().unwrap() > 3.0);
    let ev = p[0]["evidence"].as_str().unwrap();
    assert!(ev.contains("unsubscribes 12"), "{ev}");
    assert!(ev.contains("yesterday"), "{ev}");
    assert_eq!(p[1]["status"], "resolved");
}

#[test]
fn a_tracking_outage_is_data_quality_not_a_conversion_drop() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    // Four hours of learning, then FR's conversion events stop for an hour (sessions go on).
    write_traffic_with(
        &dir.path().join("events.jsonl"),
        t - 4 * HOUR,
        6 * 60,
        600,
        &["FR", "DE"],
        &[],
        4,
        Some(("FR", t, t + HOUR)),
    );
    let cfg = shipped().replace("warmup_windows = 144", "warmup_windows = 24");
    assert!(cfg.contains("warmup_windows = 24"));
    let (alerts, rollbacks, _) = replay(dir.path(), &cfg, &[]);
    let conv: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["metric"] == "conversion_rate" && a["status"] == "firing")
        .collect();
    assert!(!conv.is_empty(), "{alerts:#?}");
    for a in &conv {
        assert_eq!(a["kind"], "data_quality", "never a business drop: {a:#}");
        assert_eq!(a["decision"]["action"], "investigate");
    }
    let fr = conv
        .iter()
        .find(|a| a["series"]["country"] == "FR")
        .expect("FR's outage is named");
    assert!(
        fr["evidence"]
            .as_str()
            .unwrap()
            .contains("no `conversion` events"),
        "{fr:#}"
    );
    let onset = guardrail::event::parse_time_str(fr["onset"].as_str().unwrap()).unwrap();
    assert_eq!(onset, t);
    let resolved = alerts
        .iter()
        .find(|a| a["incident_id"] == fr["incident_id"] && a["status"] == "resolved")
        .expect("resolved when events come back");
    let end = guardrail::event::parse_time_str(resolved["resolved_at"].as_str().unwrap()).unwrap();
    assert!(end > t + HOUR && end <= t + HOUR + 10 * MIN, "{resolved:#}");
    assert!(rollbacks.is_empty());
}

#[test]
fn a_shift_in_the_device_mix_is_drift_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let t = t0();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("events.jsonl")).unwrap());
    let mut rng = SmallRng::seed_from_u64(9);
    // Six hours at mobile 60% / desktop 30% / tablet 10%, then two hours at 45 / 45 / 10.
    for m in 0..(8 * 60) {
        let ts0 = t - 6 * HOUR + m * MIN;
        let mix = if ts0 < t {
            [0.6, 0.3, 0.1]
        } else {
            [0.45, 0.45, 0.1]
        };
        for k in 0..300 {
            let u: f64 = rng.gen();
            let d = if u < mix[0] {
                "mobile"
            } else if u < mix[0] + mix[1] {
                "desktop"
            } else {
                "tablet"
            };
            let ts = ts0 + k * 200;
            writeln!(
                f,
                r#"{{"type":"session","ts":{ts},"dims":{{"country":"FR","device":"{d}"}}}}"#
            )
            .unwrap();
        }
    }
    f.flush().unwrap();
    drop(f);
    let cfg = shipped().replace("warmup_windows = 144", "warmup_windows = 36");
    let (alerts, _, _) = replay(dir.path(), &cfg, &[]);
    let drift: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["metric"] == "device_mix" && a["status"] == "firing")
        .collect();
    assert!(!drift.is_empty(), "{alerts:#?}");
    for a in &drift {
        assert_eq!(a["kind"], "drift");
        let detected =
            guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap();
        assert!(
            detected > t && detected <= t + HOUR,
            "found within the hour: {a:#}"
        );
        assert!(
            a["effect"].as_f64().unwrap() >= 0.1,
            "PSI as the effect: {a:#}"
        );
        let ev = a["evidence"].as_str().unwrap();
        assert!(
            ev.contains("mobile") && ev.contains("PSI") && ev.contains("Jensen-Shannon"),
            "{ev}"
        );
    }
    assert!(drift.iter().any(|a| a["series"]["country"] == "FR"));
    // Nothing before the shift.
    assert!(
        alerts.iter().all(|a| {
            guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap() > t
        }),
        "{alerts:#?}"
    );
}

#[test]
fn a_slow_brand_erosion_is_a_drift_not_missed_and_not_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let day = 24 * HOUR;
    let start = t0() - 14 * HOUR - 30 * day; // a midnight, 30 days back
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("events.jsonl")).unwrap());
    let mut rng = SmallRng::seed_from_u64(10);
    let noise = rand_distr::Normal::new(0.0, 0.4).unwrap();
    // 30 days of brand signals, 4 a minute around 0.30; from day 18 the mean erodes by 0.01 a
    // day (a quarter of a percent of the scale per day: invisible in any one window).
    for m in 0..(30 * 24 * 60) {
        let ts0 = start + m * MIN;
        let d = (ts0 - start) / day;
        let mean = if d < 18 {
            0.30
        } else {
            0.30 - 0.01 * (d - 17) as f64
        };
        for k in 0..4 {
            let v: f64 =
                (mean + rand_distr::Distribution::sample(&noise, &mut rng)).clamp(-1.0, 1.0);
            let ts = ts0 + k * 15_000;
            writeln!(f, r#"{{"type":"brand_signal","ts":{ts},"value":{v:.4}}}"#).unwrap();
        }
    }
    f.flush().unwrap();
    drop(f);
    let (alerts, _, _) = replay(dir.path(), &shipped(), &[]);
    let brand: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["metric"] == "brand_sentiment" && a["status"] == "firing")
        .collect();
    let drift = brand
        .iter()
        .find(|a| a["kind"] == "drift")
        .unwrap_or_else(|| panic!("the erosion is found: {alerts:#?}"));
    let detected =
        guardrail::event::parse_time_str(drift["detected_at"].as_str().unwrap()).unwrap();
    assert!(detected > start + 18 * day, "{drift:#}");
    assert!(detected <= start + 30 * day, "{drift:#}");
    assert!(
        drift["evidence"].as_str().unwrap().contains("drifted down"),
        "{drift:#}"
    );
    assert!(drift["observed"].as_f64().unwrap() < drift["expected"].as_f64().unwrap());
    // Nothing before the erosion began.
    for a in &brand {
        let t = guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap();
        assert!(t > start + 18 * day, "false alarm before the drift: {a:#}");
    }
    eprintln!(
        "erosion found on day {:.1} (began day 18)",
        (detected - start) as f64 / day as f64
    );
}
