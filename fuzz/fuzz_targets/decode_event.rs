//! `decode_event` on arbitrary bytes, with the production size limit.
//!
//! It must never panic. When it accepts, the event must hold what the engine relies on without
//! checking again: finite `value`, `ts` inside the RFC 3339 range (so event-time arithmetic
//! cannot overflow), a non-empty `type`, a contract `arm`, `dims` an object of string to string.
//! Every accepted field is also checked against an independent parse of the same bytes
//! (`serde_json::Value`), so the zero-copy decoder cannot quietly read something else.
//! When it rejects, the code must be one the decoder owns, and agree with what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

use guardrail::config::EngineConfig;
use guardrail::event::{
    decode_event, fmt_time, parse_time_str, ErrorCode, MAX_TIME_MS, MIN_TIME_MS,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let max = EngineConfig::default().max_event_bytes;
    let ev = match decode_event(data, max) {
        Ok(ev) => ev,
        Err(rej) => {
            common::check_rejection(data, max, &rej, |c| {
                !matches!(
                    c,
                    ErrorCode::TooLarge
                        | ErrorCode::InvalidUtf8
                        // The engine's, not the decoder's:
                        | ErrorCode::FutureTimestamp
                        | ErrorCode::TooLate
                        | ErrorCode::Duplicate
                )
            });
            return;
        }
    };

    // Accepted: the invariants the engine relies on.
    let text = common::check_accepted(data, max);
    assert!(!ev.ty.is_empty(), "empty type accepted");
    assert!(
        (MIN_TIME_MS..=MAX_TIME_MS).contains(&ev.ts_ms),
        "ts {} outside the RFC 3339 range",
        ev.ts_ms
    );
    // Every accepted time can be written as RFC 3339 and read back to the same instant.
    let shown = fmt_time(ev.ts_ms);
    assert_eq!(parse_time_str(&shown), Some(ev.ts_ms), "{shown}");
    if let Some(v) = ev.value {
        assert!(v.is_finite(), "non-finite value {v} accepted");
    }
    if let Some(arm) = &ev.arm {
        assert!(arm == "treatment" || arm == "holdout", "arm {arm:?}");
    }

    // The same bytes read by serde_json's own tree parser, which, unlike the decoder, also
    // converts the numbers of fields nobody reads (1e999 there is no reason to reject an event).
    let tree: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // It also decodes the strings of fields nobody reads (a lone surrogate escape there is
        // no reason to reject an event either).
        Err(_) => return,
    };
    let obj = tree.as_object().expect("accepted input is an object");
    assert_eq!(
        obj.get("type").and_then(Value::as_str),
        Some(ev.ty.as_ref())
    );
    let same = |field: &str, got: Option<&str>| {
        let want = obj.get(field).and_then(Value::as_str);
        assert_eq!(want, got, "field {field}");
    };
    same("id", ev.id.as_deref());
    same("user", ev.user.as_deref());
    same("surface", ev.surface.as_deref());
    same("variant", ev.variant.as_deref());
    same("change_id", ev.change_id.as_deref());
    same("arm", ev.arm.as_deref());
    same("name", ev.name.as_deref());
    match &obj["ts"] {
        Value::String(s) => assert_eq!(parse_time_str(s), Some(ev.ts_ms)),
        Value::Number(n) => {
            // Integer ms, or an integer-valued float (`1.7e12`); serde_json's own float
            // parser may land one unit in the last place away.
            let f = n.as_f64().expect("a JSON number reads as f64");
            assert!(
                (f - ev.ts_ms as f64).abs() <= f.abs() * 4.0 * f64::EPSILON,
                "{f} read as {}",
                ev.ts_ms
            );
        }
        other => panic!("ts accepted from {other}"),
    }
    match (obj.get("value"), ev.value) {
        (None | Some(Value::Null), None) => {}
        (Some(Value::Number(n)), Some(v)) => {
            let f = n.as_f64().expect("number");
            // Two correctly-rounding parsers may still differ by one unit in the last place.
            assert!((f - v).abs() <= f.abs() * 4.0 * f64::EPSILON, "{f} vs {v}");
        }
        (want, got) => panic!("value {want:?} decoded as {got:?}"),
    }
    match (obj.get("dims"), ev.dims) {
        (None | Some(Value::Null), None) => {}
        (Some(Value::Object(m)), Some(_)) => {
            // Look every key up through the zero-copy scanner (last duplicate wins in both),
            // plus one name that is absent.
            let names: Vec<&str> = m
                .keys()
                .map(String::as_str)
                .chain(std::iter::once("\u{0}absent"))
                .take(32)
                .collect();
            let mut out = vec![None; names.len()];
            ev.scan_dims(&names, &mut out);
            for (n, got) in names.iter().zip(&out) {
                let want = m
                    .get(*n)
                    .map(|v| v.as_str().expect("dims values are strings"));
                assert_eq!(want, got.as_deref(), "dims[{n:?}]");
            }
            // A short output slice is not an error.
            let mut one = [None];
            ev.scan_dims(&names, &mut one);
            assert_eq!(one[0].as_deref(), out.first().and_then(|x| x.as_deref()));
        }
        (want, got) => panic!("dims {want:?} decoded as {:?}", got.map(|r| r.get())),
    }
    // Decoding is a function of the bytes.
    let again = decode_event(data, max).expect("accepted twice");
    assert_eq!(again.ts_ms, ev.ts_ms);
    assert_eq!(again.value.map(f64::to_bits), ev.value.map(f64::to_bits));
});
