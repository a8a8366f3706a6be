//! Hot-path throughput: decode only (the practical ceiling: parsing the same bytes) against
//! decode + window + baseline + detect, over simulated traffic held in memory.
//!
//! `cargo bench --bench engine` (criterion reports time per batch and events/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use guardrail::config::Config;
use guardrail::engine::Engine;
use guardrail::event::decode_event;
use guardrail::sim::{events_between, Scenario};

const START: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z

fn events(hours: i64) -> Vec<Vec<u8>> {
    let sc = Scenario {
        peak_sessions_per_min: 2500.0,
        ..Scenario::default()
    };
    events_between(sc, START, START + hours * 3_600_000)
}

fn bench(c: &mut Criterion) {
    let evs = events(2);
    let cfg =
        Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
    let now = START + 86_400_000;
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.sample_size(10);
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in &evs {
                n += decode_event(e, 65536).map(|e| e.ty.len()).unwrap_or(0);
            }
            n
        })
    });
    g.bench_function("decode_window_detect", |b| {
        b.iter_batched(
            || Engine::new(&cfg).unwrap(),
            |mut eng| {
                for e in &evs {
                    let _ = eng.process_event(e, now);
                }
                eng.stats.accepted
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
