//! Checkpoints through the real service on the embedded broker: a damaged checkpoint is
//! reported, moved aside and never trusted; a pending checkpoint whose transaction did not
//! commit is discarded; a clean stop leaves a checkpoint that restores.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{metric_value, start, story_afternoon, HOUR};
use guardrail::checkpoint;
use guardrail::engine::Engine;

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_reported_and_moved_aside_then_a_clean_stop_writes_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("state");
    let d = dir.clone();
    let h = start(move |c| {
        c.detection.warmup_windows = 48;
        c.state.dir = Some(d.display().to_string());
        c.state.checkpoint_interval_secs = 1;
        std::fs::create_dir_all(&d).unwrap();
        // Not a checkpoint at all.
        std::fs::write(
            d.join(checkpoint::FILE_NAME),
            b"PAR1 this is a parquet file",
        )
        .unwrap();
        // A pending checkpoint for offsets the group never committed: its transaction did
        // not commit, so it must be dropped (not promoted, not reported as damage).
        let mut e = Engine::new(c).unwrap();
        let pending = e.checkpoint(vec![(c.kafka.topics.events.clone(), 0, 999_999)], 0);
        std::fs::write(d.join(checkpoint::PENDING_NAME), pending).unwrap();
    })
    .await;
    let change_ms = story_afternoon();
    let mut sim = common::story_sim(change_ms - 2 * HOUR);
    h.drive(&mut sim, change_ms - HOUR, 5 * 60_000, |_| {})
        .await;

    let (_, m) = h.get("/metrics").await;
    assert_eq!(
        metric_value(
            &m,
            "guardrail_checkpoint_errors_total{reason=\"bad_magic\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric_value(&m, "guardrail_checkpoint_restored"), Some(0.0));
    assert_eq!(
        metric_value(&m, "guardrail_delivery_mode{mode=\"exactly_once\"}"),
        Some(1.0)
    );
    assert!(metric_value(&m, "guardrail_transactions_total{result=\"committed\"}").unwrap() > 0.0);
    let names = files(&dir);
    assert!(
        names.iter().any(|n| n.starts_with("engine.ckpt.rejected-")),
        "the damaged file is kept aside: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n == checkpoint::PENDING_NAME),
        "the uncommitted pending checkpoint is gone: {names:?}"
    );
    // Periodic checkpoints while running (interval 1 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric_value(
        &h.get("/metrics").await.1,
        "guardrail_checkpoint_writes_total",
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = h.cfg.clone();
    let report = h.stop().await;

    // The checkpoint left by the clean stop restores into a fresh engine, with the input
    // offsets it corresponds to.
    let mut e = Engine::new(&cfg).unwrap();
    let loaded = checkpoint::read(&dir, checkpoint::FILE_NAME, e.state_fingerprint())
        .unwrap()
        .expect("a checkpoint after a clean stop");
    let r = e
        .restore(&dir.join(checkpoint::FILE_NAME), &loaded)
        .unwrap();
    assert!(r.series > 10, "{r:?}");
    let events_read: i64 = r
        .offsets
        .iter()
        .filter(|(t, _, _)| *t == cfg.kafka.topics.events)
        .map(|(_, _, o)| *o)
        .sum();
    assert_eq!(
        events_read as u64, report.events,
        "the checkpoint's offsets cover exactly what the engine read"
    );
}
