//! Throughput under bad input: decode + window + baseline + detect over simulated traffic, clean
//! and with 10% and 50% of the messages replaced by bad ones (every kind the service
//! dead-letters: oversized, invalid UTF-8, NaN / Infinity / 1e999 values, values as strings,
//! malformed JSON, missing fields, far-future, very late and unparsable timestamps, duplicates).
//! The number of messages is the same in every case, so events/s compare directly.
//!
//! `cargo bench --bench bad_input` (criterion reports time per pass and messages/s).

use std::borrow::Cow;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use guardrail::config::Config;
use guardrail::engine::Engine;
use guardrail::event::{fmt_time, ErrorCode};
use guardrail::sim::{events_between, Scenario};

const START: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z
const HOUR: i64 = 3_600_000;
/// The wall clock the engine is told: a day after the traffic, so none of it is "future".
const NOW: i64 = START + 24 * HOUR;

fn traffic(hours: i64) -> Vec<Vec<u8>> {
    let sc = Scenario {
        peak_sessions_per_min: 2500.0,
        ..Scenario::default()
    };
    events_between(sc, START, START + hours * HOUR)
}

/// The `k`-th bad message, stamped near `t` (the good traffic's event time at that point);
/// `prev` is a good message already sent (its duplicate), `big` one over `max_event_bytes`
/// (shared: tens of thousands of 70 kB copies would only measure the allocator).
fn bad<'a>(k: usize, t: i64, prev: &'a [u8], big: &'a [u8]) -> Cow<'a, [u8]> {
    let ev = |rest: &str| format!(r#"{{"type":"conversion","ts":{t},"id":"bad-{k}"{rest}}}"#);
    Cow::Owned(match k % 14 {
        0 => return Cow::Borrowed(big),
        1 => {
            let mut v = ev(r#","user":"u"#).into_bytes();
            v.truncate(v.len() - 1);
            v.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
            v
        }
        2 => ev(r#","value":NaN"#).into_bytes(),
        3 => ev(r#","value":-Infinity"#).into_bytes(),
        4 => ev(r#","value":1e999"#).into_bytes(),
        5 => ev(r#","value":"12.5""#).into_bytes(),
        6 => format!(r#"{{"type":"conversion","ts":{t},"id":"bad-{k}""#).into_bytes(),
        7 => format!(r#"{{"ts":{t},"id":"bad-{k}"}}"#).into_bytes(),
        8 => format!(
            r#"{{"type":"conversion","ts":"{}"}}"#,
            fmt_time(NOW + 24 * HOUR)
        )
        .into_bytes(),
        9 => format!(
            r#"{{"type":"conversion","ts":{},"surface":"checkout"}}"#,
            t - 3 * HOUR
        )
        .into_bytes(),
        10 => format!(r#"{{"type":"conversion","ts":"last tuesday","id":"bad-{k}"}}"#).into_bytes(),
        11 => ev(r#","dims":{"country":3}"#).into_bytes(),
        12 => format!(r#"["conversion",{t}]"#).into_bytes(),
        _ => return Cow::Borrowed(prev),
    })
}

/// `good` with `pct` percent of its messages replaced by bad ones, spread evenly.
fn mixed<'a>(good: &'a [Vec<u8>], pct: usize, big: &'a [u8]) -> Vec<Cow<'a, [u8]>> {
    let mut k = 0;
    let mut out = Vec::with_capacity(good.len());
    for (i, g) in good.iter().enumerate() {
        // Replace when the running share crosses the next whole message.
        if i > 0 && (i + 1) * pct / 100 > i * pct / 100 {
            let t = ts_of(&good[i - 1]);
            out.push(bad(k, t, &good[i - 1], big));
            k += 1;
        } else {
            out.push(Cow::Borrowed(g.as_slice()));
        }
    }
    out
}

fn ts_of(ev: &[u8]) -> i64 {
    guardrail::event::decode_event(ev, usize::MAX)
        .expect("simulated traffic decodes")
        .ts_ms
}

fn run(cfg: &Config, msgs: &[Cow<'_, [u8]>]) -> Engine {
    let mut eng = Engine::new(cfg).unwrap();
    for m in msgs {
        let _ = eng.process_event(m, NOW);
    }
    eng
}

fn bench(c: &mut Criterion) {
    let good = traffic(2);
    let big = format!(
        r#"{{"type":"conversion","ts":{START},"pad":"{}"}}"#,
        "x".repeat(70_000)
    )
    .into_bytes();
    let cfg =
        Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
    let mut g = c.benchmark_group("bad_input");
    g.throughput(Throughput::Elements(good.len() as u64));
    g.sample_size(10);
    for pct in [0usize, 10, 50] {
        let msgs = mixed(&good, pct, &big);
        // What the mix is, checked once: every bad message rejected, by the code it was made for.
        let eng = run(&cfg, &msgs);
        let rejected: u64 = eng.stats.rejected.iter().sum();
        let want = msgs.len() * pct / 100;
        assert!(
            rejected as usize >= want.saturating_sub(1) && rejected as usize <= want + 1,
            "{pct}%: {rejected} rejected of {}",
            msgs.len()
        );
        if pct > 0 {
            for code in [
                ErrorCode::TooLarge,
                ErrorCode::InvalidUtf8,
                ErrorCode::NonFiniteValue,
                ErrorCode::InvalidField,
                ErrorCode::InvalidJson,
                ErrorCode::MissingField,
                ErrorCode::FutureTimestamp,
                ErrorCode::TooLate,
                ErrorCode::BadTimestamp,
                ErrorCode::Duplicate,
            ] {
                assert!(eng.stats.rejected[code.index()] > 0, "{pct}%: no {code}");
            }
        }
        eprintln!(
            "bad_input/{pct}pct: {} messages, {} rejected, {} accepted",
            msgs.len(),
            rejected,
            eng.stats.accepted
        );
        g.bench_function(format!("decode_window_detect/{pct}pct_bad"), |b| {
            b.iter_batched(
                || Engine::new(&cfg).unwrap(),
                |mut eng| {
                    for m in &msgs {
                        let _ = eng.process_event(m, NOW);
                    }
                    eng.stats.accepted
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
