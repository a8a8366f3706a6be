//! Consuming from a real broker: guardrail (librdkafka consumer group, decode, windows,
//! baselines, detectors, offsets stored after processing) against kcat reading the same topic
//! and throwing it away: the ceiling of the broker and the client library on this machine.
//!
//! ```text
//! cargo bench --bench kafka_e2e                          # 2,000,000 events, 2 partitions, memory storage
//! cargo bench --bench kafka_e2e -- --events 500000 --partitions 4 --storage sqlite --runs 3
//! ```
//!
//! Produces N simulated events (src/sim.rs) to a Tansu topic, then measures:
//!
//! - kcat: `kcat -C -b ... -t topic -e -o beginning -q > /dev/null`, wall time -> events/s;
//! - guardrail: `service::run` in process with the shipped config, a fresh consumer group, from
//!   start until `guardrail_events_received_total` reaches N -> events/s (and the same from the
//!   moment its partitions were assigned, without the group join).
//!
//! Prints both and the ratio (target: guardrail >= 80% of kcat). Needs `tansu` and `kcat`
//! (`cargo install tansu --locked --features dynostore,libsql`, `apt-get install kcat`); without
//! them it says so and exits 0.
//!
//! kcat runs on the librdkafka guardrail is built with (the `librdkafka.so.1` that rdkafka-sys
//! builds beside its static library, through `LD_LIBRARY_PATH`; `KCAT_LIBRDKAFKA_DIR` overrides):
//! the same client library on both sides, and Debian's librdkafka 2.0.2 cannot read Tansu 0.6's
//! ApiVersions v3 response ("Read underflow" in its tagged fields).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tansu::{self, Producer, Service, Storage, Tansu};
use guardrail::sim::{Scenario, Sim};

struct Opts {
    events: u64,
    partitions: i32,
    storage: Storage,
    runs: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        events: 2_000_000,
        partitions: 2,
        storage: Storage::Memory,
        runs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--events" => o.events = val().parse().expect("--events N"),
            "--partitions" => o.partitions = val().parse().expect("--partitions N"),
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--storage" => {
                o.storage = match val().as_str() {
                    "memory" => Storage::Memory,
                    "sqlite" => Storage::Sqlite,
                    s => panic!("--storage memory|sqlite, not {s}"),
                }
            }
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// The directory of the `librdkafka.so.1` built for this binary's profile (the newest
/// rdkafka-sys build output next to it), or `KCAT_LIBRDKAFKA_DIR`.
fn vendored_librdkafka_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KCAT_LIBRDKAFKA_DIR") {
        return Some(PathBuf::from(d));
    }
    // target/<profile>/deps/kafka_e2e-<hash> -> target/<profile>/build/rdkafka-sys-*/out/src
    let exe = std::env::current_exe().ok()?;
    let build = exe.parent()?.parent()?.join("build");
    std::fs::read_dir(build)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rdkafka-sys-"))
        .map(|e| e.path().join("out/src"))
        .filter_map(|d| {
            let m = std::fs::metadata(d.join("librdkafka.so.1")).ok()?;
            Some((m.modified().ok()?, d))
        })
        .max()
        .map(|(_, d)| d)
}

/// kcat on the vendored librdkafka when there is one.
fn kcat_cmd(kcat: &Path, lib: Option<&Path>) -> Command {
    let mut c = Command::new(kcat);
    if let Some(d) = lib {
        c.env("LD_LIBRARY_PATH", d);
    }
    c
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let o = opts();
    let Some(kcat) = tansu::program("kcat", "apt-get install -y kcat") else {
        return;
    };
    let Some(broker) = Tansu::start(o.storage) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let topics = broker.guardrail_topics(o.partitions);
    println!(
        "kafka_e2e: {} events, {} partitions, Tansu {:?} storage, {} cores",
        o.events,
        o.partitions,
        o.storage,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // N simulated events, ending an hour ago (so none is in the future).
    let produced = rt.block_on(async {
        let mut c = broker.client_config();
        c.set("linger.ms", "50").set("batch.size", "1000000");
        let mut p = Producer::new(c);
        let t = Instant::now();
        let hours = 2.0;
        let start = guardrail::event::now_ms() - ((hours + 1.0) * 3.6e6) as i64;
        // Sessions per minute so that N events take about `hours` of simulated time.
        let peak = o.events as f64 / (hours * 60.0 * 1.4);
        let mut sim = Sim::new(
            Scenario {
                seed: 3,
                peak_sessions_per_min: peak,
                ..Scenario::default()
            },
            start,
        );
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        while p.produced < o.events {
            batch.clear();
            let to = sim.now_ms() + 60_000;
            sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
            for (k, v) in &batch {
                if p.produced == o.events {
                    break;
                }
                p.send(&topics.events, k, v).await;
            }
            if p.pending() > 200_000 {
                p.delivered().await;
            }
        }
        p.delivered().await;
        let s = t.elapsed().as_secs_f64();
        println!(
            "produced {} events in {s:.1} s ({:.0} events/s)",
            p.produced,
            p.produced as f64 / s
        );
        p.produced
    });

    // kcat, `runs` times.
    let lib = vendored_librdkafka_dir();
    let version = kcat_cmd(&kcat, lib.as_deref())
        .arg("-V")
        .output()
        .expect("kcat -V");
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version
        .lines()
        .find(|l| l.contains("librdkafka"))
        .unwrap_or("?");
    println!(
        "kcat: {version} (guardrail: librdkafka {})",
        rdkafka::util::get_rdkafka_version().1
    );
    let mut kcat_rates = Vec::new();
    for run in 1..=o.runs {
        let t = Instant::now();
        let out = kcat_cmd(&kcat, lib.as_deref())
            .args(["-C", "-b", &broker.bootstrap(), "-t", &topics.events])
            .args(["-e", "-o", "beginning", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run kcat");
        let s = t.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "kcat failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "kcat run {run}: {s:.2} s, {:.0} events/s",
            produced as f64 / s
        );
        kcat_rates.push(produced as f64 / s);
    }
    // The count kcat reads (a separate run, not timed): the same N.
    let out = kcat_cmd(&kcat, lib.as_deref())
        .args(["-C", "-b", &broker.bootstrap(), "-t", &topics.events])
        .args(["-e", "-o", "beginning", "-q", "-f", "x"])
        .output()
        .expect("run kcat");
    assert_eq!(out.stdout.len() as u64, produced, "kcat reads every event");

    // guardrail, `runs` times, each with a fresh group (so from the beginning).
    let mut gr_rates = Vec::new();
    let mut gr_assigned_rates = Vec::new();
    for run in 1..=o.runs {
        let cfg = {
            let mut c = tansu::config(&broker.bootstrap(), &topics);
            // The shipped defaults: no test tuning of the fetch wait.
            c.kafka.options.remove("fetch.wait.max.ms");
            c
        };
        let (total, from_assign, events) = rt.block_on(async {
            let t = Instant::now();
            let svc = Service::start(cfg).await;
            let mut assigned = None;
            let deadline = Instant::now() + Duration::from_secs(1800);
            loop {
                if assigned.is_none() && svc.state.ready.load(std::sync::atomic::Ordering::Relaxed)
                {
                    assigned = Some(Instant::now());
                }
                let n = svc.metric("guardrail_events_received_total").await as u64;
                if n >= produced {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "guardrail read {n} of {produced}"
                );
                svc.assert_running();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let total = t.elapsed().as_secs_f64();
            let from_assign = assigned.map_or(total, |a| a.elapsed().as_secs_f64());
            let report = svc.stop().await;
            (total, from_assign, report.events)
        });
        assert_eq!(events, produced, "guardrail processed every event once");
        println!(
            "guardrail run {run}: {total:.2} s from start ({:.0} events/s), {from_assign:.2} s from assignment ({:.0} events/s)",
            produced as f64 / total,
            produced as f64 / from_assign
        );
        gr_rates.push(produced as f64 / total);
        gr_assigned_rates.push(produced as f64 / from_assign);
    }

    let k = median(&mut kcat_rates);
    let g = median(&mut gr_rates);
    let ga = median(&mut gr_assigned_rates);
    println!();
    println!("| consumer | events/s (median of {}) | vs kcat |", o.runs);
    println!("|---|---:|---:|");
    println!("| kcat -C -e -o beginning -q > /dev/null | {k:.0} | 100% |");
    println!(
        "| guardrail, from start (group join included) | {g:.0} | {:.0}% |",
        100.0 * g / k
    );
    println!(
        "| guardrail, from partition assignment | {ga:.0} | {:.0}% |",
        100.0 * ga / k
    );
    println!(
        "target: guardrail >= 80% of kcat: {}",
        if ga >= 0.8 * k { "met" } else { "NOT met" }
    );
}
