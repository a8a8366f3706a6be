//! The engine's whole path (decode -> skew/lateness/dedup -> window -> baseline -> detect ->
//! attribute -> policy -> outputs) on arbitrary input, against the default configuration with
//! the warm-up shortened so that detection is reached on small inputs.
//!
//! The input is a script, one line a step:
//! - `C<json>`: a change record (changes topic);
//! - `@<ms>`: sets the wall clock (epoch ms, clamped to the RFC 3339 range);
//! - `P<digit>`: later events come from that input partition;
//! - `I`: the input goes quiet for a minute (deadlines come due);
//! - anything else: an event message, as is.
//!
//! Nothing may panic (overflow checks are on). The engine must reject exactly what the decoder
//! rejects, with the same code; what the decoder accepts it may only reject as future, late or
//! duplicate. Counters must add up, and every output must encode to JSON in which the alert
//! fields the contract requires are present and finite.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use guardrail::config::Config;
use guardrail::engine::Engine;
use guardrail::event::{decode_event, ErrorCode, MAX_TIME_MS, MIN_TIME_MS};
use guardrail::sink::{Output, Signer};

const T0: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "guardrail.toml")
            .expect("default config");
        c.detection.warmup_windows = 2;
        c.detection.min_volume_per_window = 1.0;
        c.detection.min_expected_events = 1.0;
        c.privacy.user_hash_key = Some("fuzz".into());
        c.privacy.user_hash_key_env = None;
        c
    })
}

fuzz_target!(|data: &[u8]| {
    let signer = Signer::new("k1", b"fuzz-secret");
    let mut eng = Engine::new(config()).expect("engine");
    let mut now = T0;
    let mut source = 0i32;
    let mut events = 0u64;
    let mut outputs = Vec::new();
    for line in data.split(|b| *b == b'\n').take(512) {
        match line.first() {
            Some(b'C') => {
                let _ = eng.process_change(&line[1..]);
            }
            Some(b'@') => {
                if let Some(t) = std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                {
                    now = t.clamp(MIN_TIME_MS, MAX_TIME_MS);
                }
            }
            Some(b'P') if line.len() == 2 && line[1].is_ascii_digit() => {
                source = (line[1] - b'0') as i32;
                eng.assign_sources(&[source], now);
            }
            Some(b'I') if line.len() == 1 => {
                now = (now + 60_000).min(MAX_TIME_MS);
                eng.advance_idle(now);
            }
            _ => {
                events += 1;
                let decoded = decode_event(line, config().engine.max_event_bytes).map(|_| ());
                let r = eng.process_event_from(source, line, now);
                match (&decoded, &r) {
                    (Err(d), Err(e)) => assert_eq!(d.code, e.code, "{}", e.message),
                    (Err(d), Ok(())) => panic!("engine accepted what the decoder rejects: {d}"),
                    (Ok(()), Err(e)) => assert!(
                        matches!(
                            e.code,
                            ErrorCode::FutureTimestamp | ErrorCode::TooLate | ErrorCode::Duplicate
                        ),
                        "engine rejected a decoded event as {e}"
                    ),
                    (Ok(()), Ok(())) => {}
                }
                if let Err(e) = &r {
                    assert!(!e.message.is_empty());
                }
            }
        }
        outputs.extend(eng.take_outputs());
    }
    eng.advance_idle(now.saturating_add(3_600_000).min(MAX_TIME_MS));
    eng.finish();
    outputs.extend(eng.take_outputs());

    let s = &eng.stats;
    assert_eq!(s.events, events);
    assert_eq!(
        s.events,
        s.accepted + s.rejected.iter().sum::<u64>(),
        "every event is either accepted or rejected with a code"
    );
    for o in &outputs {
        let enc = o.encode(&signer);
        let v: serde_json::Value = serde_json::from_slice(&enc.value).expect("output is JSON");
        if let Output::Alert(_) = o {
            for f in ["observed", "expected", "expected_low", "expected_high"] {
                assert!(
                    v[f].as_f64().is_some_and(f64::is_finite),
                    "alert field {f} is {} in {v}",
                    v[f]
                );
            }
            for f in [
                "incident_id",
                "status",
                "severity",
                "metric",
                "kind",
                "onset",
            ] {
                assert!(v[f].is_string(), "alert field {f} is {}", v[f]);
            }
        }
    }
});
