//! `decode_change` (the changes topic, contract section 2) on arbitrary bytes.
//!
//! It must never panic. An accepted change must be a JSON object with a non-empty `change_id`,
//! a `ts` inside the RFC 3339 range and a `holdout` in [0, 1); written back out as JSON (as the
//! API and the audit trail do) it must decode to the same change.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

use guardrail::event::{decode_change, ErrorCode, MAX_TIME_MS, MIN_TIME_MS};
use serde_json::Value;

/// JSON equality where floats may differ in the last place (two parsers, one printer).
fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => {
                p == q || (p - q).abs() <= p.abs().max(q.abs()) * 4.0 * f64::EPSILON
            }
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let max = 64 * 1024;
    let c = match decode_change(data, max) {
        Ok(c) => c,
        Err(rej) => {
            common::check_rejection(data, max, &rej, |c| {
                matches!(
                    c,
                    ErrorCode::InvalidJson
                        | ErrorCode::NonFiniteValue
                        | ErrorCode::MissingField
                        | ErrorCode::InvalidField
                        | ErrorCode::BadTimestamp
                )
            });
            return;
        }
    };
    common::check_accepted(data, max);
    assert!(!c.change_id.is_empty());
    assert!((MIN_TIME_MS..=MAX_TIME_MS).contains(&c.ts), "ts {}", c.ts);
    if let Some(h) = c.holdout {
        assert!((0.0..1.0).contains(&h), "holdout {h}");
    }
    // Round trip through the JSON it is shown and audited as.
    let out = serde_json::to_vec(&c).expect("a change serialises");
    let back = decode_change(&out, usize::MAX)
        .unwrap_or_else(|e| panic!("re-decoding {}: {e}", String::from_utf8_lossy(&out)));
    assert_eq!(back.change_id, c.change_id);
    assert_eq!(back.ts, c.ts);
    assert_eq!(back.action, c.action);
    assert_eq!(back.actor, c.actor);
    assert_eq!(back.kind, c.kind);
    assert_eq!(back.scope, c.scope);
    assert_eq!(back.tier, c.tier);
    assert_eq!(back.owner, c.owner);
    assert_eq!(back.description, c.description);
    assert_eq!(back.target_metric, c.target_metric);
    match (back.holdout, c.holdout) {
        (Some(p), Some(q)) => assert!((p - q).abs() <= q.abs() * 4.0 * f64::EPSILON),
        (p, q) => assert_eq!(p, q),
    }
    match (&back.rollback, &c.rollback) {
        (Some(p), Some(q)) => assert!(close(p, q), "{p} vs {q}"),
        (p, q) => assert_eq!(p, q),
    }
});
