//! Memory per tracked series: live heap bytes of an engine holding 100,000 series of one
//! metric, measured with a counting global allocator.
//!
//! `cargo bench --bench memory` prints two markdown tables of bytes per series, with
//! `hour_of_week`, `hour_of_day` and no seasonality. Each series is a segment of two dims
//! (`region` x `store`, 100 x 1000 values).
//!
//! * young: a ratio, a count (with exposure) and a mean metric; every series gets events in 16
//!   consecutive 5-minute windows, of which 14 or 15 close, so rings, detectors and history are
//!   in use and the baselines have learnt their first windows (the baseline learns a window
//!   `LEARN_LAG` = 12 windows after it closed), all in one season bucket (and one day-of-week
//!   bucket with `hour_of_week`).
//! * steady: the ratio metric after a week and two hours: events in the first window of every
//!   hour, so every season bucket of every series has learnt (what an established series holds).
//!
//! Bytes per series = (live bytes after the events - live bytes of the freshly built engine) /
//! series, so the index and `Vec<Series>` growth slack are included (the engine's fixed overhead
//! and the event buffers are not). A filter argument picks rows by metric, seasonality or table
//! name (`cargo bench --bench memory -- steady`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

use guardrail::config::Config;
use guardrail::engine::Engine;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size() as isize, Relaxed) + l.size() as isize;
            PEAK.fetch_max(now.max(0) as usize, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size() as isize, Relaxed) + l.size() as isize;
            PEAK.fetch_max(now.max(0) as usize, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            let now = LIVE.fetch_add(new as isize - l.size() as isize, Relaxed)
                + (new as isize - l.size() as isize);
            PEAK.fetch_max(now.max(0) as usize, Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Relaxed)
}

const REGIONS: usize = 100;
const STORES: usize = 1000;
const SERIES: usize = REGIONS * STORES;
const START: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z, a window boundary
const WINDOW_MS: i64 = 300_000;
/// Young: windows with events; the last events' watermark closes all but the last one or two.
const WINDOWS: i64 = 16;
/// Steady: hours with events (one window each), a week and two hours.
const HOURS: i64 = 170;
const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Copy)]
enum Kind {
    Ratio,
    Count,
    Mean,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ratio => "ratio",
            Kind::Count => "count (exposure)",
            Kind::Mean => "mean",
        }
    }

    fn metric_toml(self) -> &'static str {
        match self {
            Kind::Ratio => {
                "kind = \"ratio\"\nnumerator = { type = \"conversion\" }\n\
                 denominator = { type = \"session\" }\ndirection = \"drop\""
            }
            Kind::Count => {
                "kind = \"count\"\nnumerator = { type = \"conversion\" }\n\
                 exposure = { type = \"session\" }\ndirection = \"spike\""
            }
            Kind::Mean => {
                "kind = \"mean\"\nnumerator = { type = \"conversion\" }\ndirection = \"drop\""
            }
        }
    }
}

fn config(kind: Kind, seasonality: &str) -> Config {
    let text = format!(
        "[engine]\nmax_series_per_metric = {max}\ndedup_by_id = false\n\
         [detection]\nseasonality = \"{seasonality}\"\n\
         [guards.sprawl]\nenabled = false\n[guards.pressure]\nenabled = false\n\
         [[metrics]]\nname = \"m\"\n{metric}\ndims = [\"region\", \"store\"]\n",
        max = SERIES + 10,
        metric = kind.metric_toml(),
    );
    Config::from_str_named(&text, "memory.toml").expect("valid config")
}

/// Events for every series in every fed window: one session and one conversion (with a value).
/// Young: `WINDOWS` consecutive windows; steady: the first window of each of `HOURS` hours.
fn feed(eng: &mut Engine, buf: &mut String, steady: bool) {
    use std::fmt::Write;
    let (n, step) = if steady {
        (HOURS, HOUR_MS)
    } else {
        (WINDOWS, WINDOW_MS)
    };
    let now = START + n * step + 86_400_000;
    for w in 0..n {
        let base = START + w * step;
        for i in 0..SERIES {
            let ts = base + (i as i64 * 2) % (WINDOW_MS - 1000);
            let (r, s) = (i / STORES, i % STORES);
            for (ty, v) in [("session", 0.0), ("conversion", 10.0 + (i % 7) as f64)] {
                buf.clear();
                let _ = write!(
                    buf,
                    "{{\"type\":\"{ty}\",\"ts\":{ts},\"value\":{v},\
                     \"dims\":{{\"region\":\"r{r:03}\",\"store\":\"s{s:04}\"}}}}"
                );
                eng.process_event(buf.as_bytes(), now)
                    .expect("event accepted");
            }
        }
    }
}

struct Row {
    kind: Kind,
    seasonality: &'static str,
    series: usize,
    closed: i64,
    buckets: f64,
    engine_bytes: isize,
    per_series: f64,
    peak_per_series: f64,
}

fn measure(kind: Kind, seasonality: &'static str, steady: bool) -> Row {
    let cfg = config(kind, seasonality);
    let mut buf = String::with_capacity(256);
    let before = live();
    let mut eng = Engine::new(&cfg).expect("engine");
    let built = live();
    PEAK.store(built.max(0) as usize, Relaxed);
    feed(&mut eng, &mut buf, steady);
    let after = live();
    let peak = PEAK.load(Relaxed) as isize;
    let series = eng.series_count();
    let closed = eng
        .last_closed_window()
        .map(|c| c - START / WINDOW_MS + 1)
        .unwrap_or(0);
    let segs = series.saturating_sub(1).max(1); // the total series is built with the engine
    let buckets =
        eng.series.iter().map(|s| s.season_buckets()).sum::<usize>() as f64 / series.max(1) as f64;
    let row = Row {
        kind,
        seasonality,
        series,
        closed,
        buckets,
        engine_bytes: built - before,
        per_series: (after - built) as f64 / segs as f64,
        peak_per_series: (peak - built) as f64 / segs as f64,
    };
    drop(eng);
    row
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks rows by kind, seasonality or table.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!(
        "size_of: Series {} B, engine::HISTORY {} windows",
        std::mem::size_of::<guardrail::engine::Series>(),
        guardrail::engine::HISTORY
    );
    for (table, steady, kinds) in [
        ("young", false, &[Kind::Ratio, Kind::Count, Kind::Mean][..]),
        ("steady", true, &[Kind::Ratio][..]),
    ] {
        println!();
        println!("{table}:");
        println!();
        println!(
            "| metric | seasonality | series | windows closed | season buckets learnt / series | engine before events (B) | bytes / series (live) | bytes / series (peak during feed) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for &kind in kinds {
            for seasonality in ["hour_of_week", "hour_of_day", "none"] {
                if let Some(f) = &filter {
                    if !kind.name().contains(f.as_str())
                        && !seasonality.contains(f.as_str())
                        && table != f.as_str()
                    {
                        continue;
                    }
                }
                let r = measure(kind, seasonality, steady);
                println!(
                    "| {} | {} | {} | {} | {:.1} | {} | {:.0} | {:.0} |",
                    r.kind.name(),
                    r.seasonality,
                    r.series,
                    r.closed,
                    r.buckets,
                    r.engine_bytes,
                    r.per_series,
                    r.peak_per_series
                );
            }
        }
    }
}
