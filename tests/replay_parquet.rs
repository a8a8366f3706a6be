//! `guardrail replay` over Parquet: the real binary, simulated traffic converted to Parquet here
//! (dims as a map column and as a struct column, ts as integers and as a timestamp column), and
//! the outputs compared with the replay of the same JSON lines.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, Int64Builder, ListBuilder, MapBuilder, StringBuilder, StructBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_guardrail"))
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `guardrail replay --quiet` with the default config.
fn replay(events: &Path, changes: Option<&Path>, out: &Path) -> Output {
    let mut c = bin();
    c.env("GUARDRAIL_SIGNING_SECRET", "replay-secret")
        .args(["replay", "--quiet", "--config", "config/guardrail.toml"])
        .arg("--events")
        .arg(events)
        .arg("--out")
        .arg(out);
    if let Some(ch) = changes {
        c.arg("--changes").arg(ch);
    }
    c.output().unwrap()
}

fn read_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of an output file without the wall-clock fields named.
fn outputs(dir: &Path, file: &str, wall_clock: &[&str]) -> Vec<Value> {
    let mut v = read_lines(&dir.join(file));
    for o in &mut v {
        let m = o.as_object_mut().unwrap();
        for k in wall_clock {
            m.remove(*k);
        }
    }
    v
}

fn summary_counts(dir: &Path) -> Value {
    let mut s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let m = s.as_object_mut().unwrap();
    m.remove("elapsed_secs");
    m.remove("events_per_sec");
    s
}

fn parquet_writer(path: &Path, schema: Arc<Schema>, compression: Compression) -> ArrowWriter<File> {
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_size(200_000)
        .build();
    let f = File::create(path).unwrap();
    ArrowWriter::try_new(f, schema, Some(props)).unwrap()
}

fn write_parquet(path: &Path, batches: &[RecordBatch], compression: Compression) {
    let mut w = parquet_writer(path, batches[0].schema(), compression);
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

/// Calls `f` with the events of a JSON-lines file, `n` at a time.
fn for_chunks(jsonl: &Path, n: usize, mut f: impl FnMut(&[Value])) {
    let r = BufReader::new(File::open(jsonl).unwrap());
    let mut chunk = Vec::with_capacity(n);
    for l in r.lines() {
        chunk.push(serde_json::from_str(&l.unwrap()).unwrap());
        if chunk.len() == n {
            f(&chunk);
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        f(&chunk);
    }
}

#[derive(Clone, Copy)]
enum DimsAs {
    Map,
    Struct,
}

#[derive(Clone, Copy)]
enum TsAs {
    EpochMs,
    TimestampUtc,
}

const STR_FIELDS: [&str; 8] = [
    "type",
    "id",
    "user",
    "surface",
    "variant",
    "change_id",
    "arm",
    "name",
];

fn event_ts_ms(v: &Value) -> i64 {
    match &v["ts"] {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis(),
        other => panic!("ts {other}"),
    }
}

/// Converts JSON-lines events to Parquet with an extra column the contract does not know.
fn events_to_parquet(jsonl: &Path, out: &Path, dims_as: DimsAs, ts_as: TsAs, c: Compression) {
    let mut dim_keys = BTreeSet::new();
    for_chunks(jsonl, 65_536, |chunk| {
        for d in chunk.iter().filter_map(|e| e["dims"].as_object()) {
            dim_keys.extend(d.keys().cloned());
        }
    });
    let dim_fields: Fields = dim_keys
        .iter()
        .map(|k| Field::new(k, DataType::Utf8, true))
        .collect();
    let mut writer: Option<ArrowWriter<File>> = None;
    for_chunks(jsonl, 65_536, |chunk| {
        let mut strs: Vec<StringBuilder> =
            STR_FIELDS.iter().map(|_| StringBuilder::new()).collect();
        let mut ts_i = Int64Builder::new();
        let mut ts_t = TimestampMillisecondBuilder::new().with_timezone("UTC");
        let mut value = Float64Builder::new();
        let mut extra = Int64Builder::new();
        let mut dmap = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        let mut dstruct = StructBuilder::from_fields(dim_fields.clone(), chunk.len());
        for (n, e) in chunk.iter().enumerate() {
            for (b, f) in strs.iter_mut().zip(STR_FIELDS) {
                b.append_option(e[f].as_str());
            }
            match ts_as {
                TsAs::EpochMs => ts_i.append_value(event_ts_ms(e)),
                TsAs::TimestampUtc => ts_t.append_value(event_ts_ms(e)),
            }
            value.append_option(e["value"].as_f64());
            extra.append_value(n as i64);
            let d = e["dims"].as_object();
            match dims_as {
                DimsAs::Map => {
                    if let Some(d) = d {
                        for (k, v) in d {
                            dmap.keys().append_value(k);
                            dmap.values().append_value(v.as_str().unwrap());
                        }
                    }
                    dmap.append(d.is_some()).unwrap();
                }
                DimsAs::Struct => {
                    for (i, k) in dim_keys.iter().enumerate() {
                        dstruct
                            .field_builder::<StringBuilder>(i)
                            .unwrap()
                            .append_option(d.and_then(|d| d.get(k)).and_then(|v| v.as_str()));
                    }
                    dstruct.append(d.is_some());
                }
            }
        }
        let mut fields = Vec::new();
        let mut cols: Vec<ArrayRef> = Vec::new();
        let mut push = |name: &str, a: ArrayRef| {
            fields.push(Field::new(name, a.data_type().clone(), true));
            cols.push(a);
        };
        // Columns in an order unlike the JSON's, the unknown one first.
        push("ingest_seq", Arc::new(extra.finish()));
        push(
            "dims",
            match dims_as {
                DimsAs::Map => Arc::new(dmap.finish()),
                DimsAs::Struct => Arc::new(dstruct.finish()),
            },
        );
        push(
            "ts",
            match ts_as {
                TsAs::EpochMs => Arc::new(ts_i.finish()),
                TsAs::TimestampUtc => Arc::new(ts_t.finish()),
            },
        );
        push("value", Arc::new(value.finish()));
        for (mut b, f) in strs.into_iter().zip(STR_FIELDS) {
            push(f, Arc::new(b.finish()));
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        writer
            .get_or_insert_with(|| parquet_writer(out, batch.schema(), c))
            .write(&batch)
            .unwrap();
    });
    writer.expect("events").close().unwrap();
}

fn str_col(changes: &[Value], f: &str) -> ArrayRef {
    let mut b = StringBuilder::new();
    for c in changes {
        b.append_option(c[f].as_str());
    }
    Arc::new(b.finish())
}

/// A struct column of string fields from objects of strings (absent object: null).
fn str_struct(objs: &[Option<&serde_json::Map<String, Value>>]) -> ArrayRef {
    let keys: BTreeSet<&String> = objs.iter().flatten().flat_map(|o| o.keys()).collect();
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for k in keys {
        let mut b = StringBuilder::new();
        for o in objs {
            b.append_option(
                o.and_then(|o| o.get(k))
                    .map(|v| v.as_str().expect("string")),
            );
        }
        fields.push(Field::new(k, DataType::Utf8, true));
        cols.push(Arc::new(b.finish()) as ArrayRef);
    }
    let nulls = NullBuffer::from(objs.iter().map(Option::is_some).collect::<Vec<_>>());
    Arc::new(StructArray::try_new(fields.into(), cols, Some(nulls)).unwrap())
}

/// Converts JSON-lines changes to Parquet: `actor` and `rollback` structs, `scope` a struct of
/// a list and a map of lists, `ts` a timestamp column.
fn changes_to_parquet(jsonl: &Path, out: &Path) {
    let ch = read_lines(jsonl);
    for c in &ch {
        for k in c.as_object().unwrap().keys() {
            assert!(
                [
                    "change_id",
                    "ts",
                    "action",
                    "actor",
                    "kind",
                    "scope",
                    "tier",
                    "holdout",
                    "owner",
                    "description",
                    "rollback",
                ]
                .contains(&k.as_str()),
                "the test does not convert change field {k}"
            );
        }
    }
    let mut ts = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut holdout = Float64Builder::new();
    let mut surfaces = ListBuilder::new(StringBuilder::new());
    let mut sdims = MapBuilder::new(
        None,
        StringBuilder::new(),
        ListBuilder::new(StringBuilder::new()),
    );
    for c in &ch {
        ts.append_value(event_ts_ms(c));
        holdout.append_option(c["holdout"].as_f64());
        let scope = c["scope"].as_object();
        match scope.and_then(|s| s["surfaces"].as_array()) {
            Some(a) => {
                for s in a {
                    surfaces.values().append_value(s.as_str().unwrap());
                }
                surfaces.append(true);
            }
            None => surfaces.append(false),
        }
        match scope.and_then(|s| s["dims"].as_object()) {
            Some(d) => {
                for (k, vs) in d {
                    sdims.keys().append_value(k);
                    for v in vs.as_array().unwrap() {
                        sdims.values().values().append_value(v.as_str().unwrap());
                    }
                    sdims.values().append(true);
                }
                sdims.append(true).unwrap();
            }
            None => sdims.append(false).unwrap(),
        }
    }
    let surfaces: ArrayRef = Arc::new(surfaces.finish());
    let sdims: ArrayRef = Arc::new(sdims.finish());
    let scope_nulls = NullBuffer::from(
        ch.iter()
            .map(|c| c["scope"].is_object())
            .collect::<Vec<_>>(),
    );
    let scope = StructArray::try_new(
        vec![
            Field::new("surfaces", surfaces.data_type().clone(), true),
            Field::new("dims", sdims.data_type().clone(), true),
        ]
        .into(),
        vec![surfaces, sdims],
        Some(scope_nulls),
    )
    .unwrap();
    let objs = |f: &str| ch.iter().map(|c| c[f].as_object()).collect::<Vec<_>>();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("change_id", str_col(&ch, "change_id")),
        ("ts", Arc::new(ts.finish())),
        ("action", str_col(&ch, "action")),
        ("actor", str_struct(&objs("actor"))),
        ("kind", str_col(&ch, "kind")),
        ("scope", Arc::new(scope)),
        ("tier", str_col(&ch, "tier")),
        ("holdout", Arc::new(holdout.finish())),
        ("owner", str_col(&ch, "owner")),
        ("description", str_col(&ch, "description")),
        ("rollback", str_struct(&objs("rollback"))),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch =
        RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    write_parquet(out, &[batch], Compression::SNAPPY);
}

fn assert_same_outputs(a: &Path, b: &Path, what: &str) {
    for (file, wall_clock) in [
        ("alerts.jsonl", &["emitted_at"][..]),
        ("rollbacks.jsonl", &["time"][..]),
        ("audit.jsonl", &["at"][..]),
        ("dead_letters.jsonl", &[][..]),
    ] {
        let (x, y) = (outputs(a, file, wall_clock), outputs(b, file, wall_clock));
        assert_eq!(x.len(), y.len(), "{what}: {file} line counts differ");
        for (i, (l, r)) in x.iter().zip(&y).enumerate() {
            assert_eq!(l, r, "{what}: {file} line {} differs", i + 1);
        }
    }
    assert_eq!(summary_counts(a), summary_counts(b), "{what}: summary.json");
}

#[test]
fn parquet_replay_matches_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let events = d.join("events.jsonl");
    let changes = d.join("changes.jsonl");
    let o = bin()
        .args([
            "simulate",
            "--hours",
            "17",
            "--story-at-hours",
            "13",
            "--peak-sessions-per-min",
            "1500",
            "--start",
            "2026-11-22T01:00:00Z",
        ])
        .arg("--out")
        .arg(&events)
        .arg("--changes-out")
        .arg(&changes)
        .output()
        .unwrap();
    ok(&o, "simulate");

    let map_pq = d.join("events-map.parquet");
    // No extension: found by the PAR1 magic.
    let struct_pq = d.join("events-struct.bin");
    let changes_pq = d.join("changes.parquet");
    events_to_parquet(
        &events,
        &map_pq,
        DimsAs::Map,
        TsAs::EpochMs,
        Compression::SNAPPY,
    );
    events_to_parquet(
        &events,
        &struct_pq,
        DimsAs::Struct,
        TsAs::TimestampUtc,
        Compression::ZSTD(ZstdLevel::try_new(3).unwrap()),
    );
    changes_to_parquet(&changes, &changes_pq);

    let out_json = d.join("out-json");
    ok(&replay(&events, Some(&changes), &out_json), "replay jsonl");
    let s = summary_counts(&out_json);
    assert!(s["events_read"].as_u64().unwrap() > 500_000, "{s}");
    assert!(s["alerts_firing"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["rollbacks_requested"], 1, "{s}");
    assert!(!read_lines(&out_json.join("rollbacks.jsonl")).is_empty());

    let out_map = d.join("out-map");
    ok(
        &replay(&map_pq, Some(&changes), &out_map),
        "replay map parquet",
    );
    assert_same_outputs(&out_json, &out_map, "dims map, ts epoch ms, snappy");

    let out_struct = d.join("out-struct");
    ok(
        &replay(&struct_pq, Some(&changes_pq), &out_struct),
        "replay struct parquet",
    );
    assert_same_outputs(
        &out_json,
        &out_struct,
        "dims struct, ts timestamp(ms, UTC), zstd, changes from Parquet",
    );
}

/// A small events file with `ts` as RFC 3339 strings and `dims` a map; rows as JSON objects.
fn small_parquet(path: &Path, rows: &[(Option<&str>, &str, Option<f64>)], c: Compression) {
    let mut ty = StringBuilder::new();
    let mut ts = StringBuilder::new();
    let mut value = Float64Builder::new();
    let mut dims = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for (t, at, v) in rows {
        ty.append_option(*t);
        ts.append_value(at);
        value.append_option(*v);
        dims.keys().append_value("country");
        dims.values().append_value("FR");
        dims.append(true).unwrap();
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("type", Arc::new(ty.finish())),
        ("ts", Arc::new(ts.finish())),
        ("value", Arc::new(value.finish())),
        ("dims", Arc::new(dims.finish())),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch =
        RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    write_parquet(path, &[batch], c);
}

#[test]
fn parquet_rows_without_a_json_form_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.parquet");
    small_parquet(
        &p,
        &[
            (Some("session"), "2026-11-22T10:00:00Z", None),
            (None, "2026-11-22T10:00:01Z", None),
            (Some("session"), "2026-11-22T10:00:02Z", None),
            (Some("conversion"), "2026-11-22T10:00:03Z", Some(f64::NAN)),
            (Some("page_view"), "yesterday", None),
        ],
        Compression::UNCOMPRESSED,
    );
    let out = dir.path().join("out");
    let o = replay(&p, None, &out);
    ok(&o, "replay");
    let s = summary_counts(&out);
    assert_eq!(s["events_read"], 5, "{s}");
    assert_eq!(s["events_accepted"], 2, "{s}");
    assert_eq!(
        s["events_rejected"],
        serde_json::json!({"missing_field": 1, "non_finite_value": 1, "bad_timestamp": 1}),
        "{s}"
    );
    let dl = read_lines(&out.join("dead_letters.jsonl"));
    let got: Vec<(&str, String)> = dl
        .iter()
        .map(|l| {
            (
                l["error_code"].as_str().unwrap(),
                l["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let src = |n: u32| format!("{}/row/{n}", p.display());
    assert_eq!(
        got,
        vec![
            ("missing_field", src(1)),
            ("non_finite_value", src(3)),
            ("bad_timestamp", src(4)),
        ]
    );
    // The dead letter shows the row as the JSON it stood for.
    let v: Value = serde_json::from_str(dl[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"ts": "2026-11-22T10:00:01Z", "dims": {"country": "FR"}})
    );
    assert!(
        dl[0]["error"].as_str().unwrap().contains("`type`"),
        "{:?}",
        dl[0]
    );
}

fn assert_clean_failure(o: &Output, path: &Path, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("Parquet"),
        "{what}: {err}"
    );
}

#[test]
fn corrupt_parquet_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    let rows: Vec<(Option<&str>, &str, Option<f64>)> = (0..2000)
        .map(|_| (Some("session"), "2026-11-22T10:00:00Z", Some(1.0)))
        .collect();
    small_parquet(&good, &rows, Compression::UNCOMPRESSED);
    let bytes = std::fs::read(&good).unwrap();
    let out = dir.path().join("out");

    let mut cases: Vec<(&str, PathBuf, Vec<u8>)> = Vec::new();
    let mut truncated = bytes[..bytes.len() / 2].to_vec();
    truncated.extend_from_slice(b"PAR1");
    cases.push(("truncated", dir.path().join("truncated.parquet"), truncated));
    let mut garbage = b"PAR1".to_vec();
    garbage.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    garbage.extend_from_slice(&100u32.to_le_bytes());
    garbage.extend_from_slice(b"PAR1");
    cases.push(("garbage", dir.path().join("garbage.dat"), garbage));
    cases.push((
        "JSON named .parquet",
        dir.path().join("lines.parquet"),
        b"{\"type\":\"session\",\"ts\":1}\n".to_vec(),
    ));
    for (what, p, b) in &cases {
        std::fs::write(p, b).unwrap();
        assert_clean_failure(&replay(p, None, &out), p, what);
    }

    // Bytes changed inside the data pages, footer intact (the reader panics on some of these
    // and replay turns that into an error): an error or, if the damage happens to decode, a
    // replay, but never a panic.
    let ts: Vec<String> = (0..4000)
        .map(|i| {
            format!(
                "2026-11-22T{:02}:{:02}:{:02}Z",
                i / 3600,
                i / 60 % 60,
                i % 60
            )
        })
        .collect();
    let types = [
        "session",
        "click",
        "conversion",
        "page_view",
        "support_ticket",
    ];
    let rows: Vec<(Option<&str>, &str, Option<f64>)> = ts
        .iter()
        .enumerate()
        .map(|(i, t)| (Some(types[i % 5]), t.as_str(), Some(i as f64 * 0.25)))
        .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: usize| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 33) as usize) % n
    };
    for (c, name) in [
        (Compression::UNCOMPRESSED, "plain"),
        (Compression::SNAPPY, "snappy"),
    ] {
        let p = dir.path().join(format!("{name}.parquet"));
        small_parquet(&p, &rows, c);
        let bytes = std::fs::read(&p).unwrap();
        let footer =
            u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap());
        let data_end = bytes.len() - 8 - footer as usize;
        for k in 0..16 {
            let mut b = bytes.clone();
            for _ in 0..[1, 4, 16][k % 3] {
                let at = 4 + rand(data_end - 4);
                b[at] = rand(256) as u8;
            }
            std::fs::write(&p, &b).unwrap();
            let o = replay(&p, None, &out);
            let err = String::from_utf8_lossy(&o.stderr);
            let what = format!("{name} damaged #{k}");
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert!(
                matches!(o.status.code(), Some(0) | Some(2)),
                "{what}: {err}"
            );
            if !o.status.success() {
                assert!(err.contains("Parquet"), "{what}: {err}");
            }
        }
    }

    // The `ts` column missing: a file error naming the columns, not a dead letter per row.
    let p = dir.path().join("no-ts.parquet");
    let ty: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["session"]));
    let time: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1_795_341_600_000i64]));
    let batch = RecordBatch::try_from_iter([("type", ty), ("time", time)]).unwrap();
    write_parquet(&p, &[batch], Compression::SNAPPY);
    let o = replay(&p, None, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no column `ts`") && err.contains("time"),
        "{err}"
    );

    // A contract column of the wrong type (integer user ids): a file error, not a dead letter
    // per row.
    let p = dir.path().join("int-user.parquet");
    let ty: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["session"]));
    let ts: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1_795_341_600_000i64]));
    let user: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![42i64]));
    let batch = RecordBatch::try_from_iter([("type", ty), ("ts", ts), ("user", user)]).unwrap();
    write_parquet(&p, &[batch], Compression::SNAPPY);
    let o = replay(&p, None, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("column `user` has Arrow type Int64; the contract wants a string"),
        "{err}"
    );
}

/// Not a test: writes the Parquet files used to measure replay throughput from a JSON-lines
/// file (`GUARDRAIL_PQ_IN`) next to it: `<stem>-map-zstd.parquet` (dims a map, ts epoch ms,
/// zstd) and `<stem>-struct-snappy.parquet` (dims a struct, ts a timestamp column, snappy).
/// `GUARDRAIL_PQ_IN=null.jsonl cargo test --release --test replay_parquet -- --ignored`
#[test]
#[ignore]
fn convert_for_measurement() {
    let Ok(input) = std::env::var("GUARDRAIL_PQ_IN") else {
        return;
    };
    let input = PathBuf::from(input);
    let stem = input.with_extension("");
    let name = |s: &str| PathBuf::from(format!("{}-{s}.parquet", stem.display()));
    events_to_parquet(
        &input,
        &name("map-zstd"),
        DimsAs::Map,
        TsAs::EpochMs,
        Compression::ZSTD(ZstdLevel::try_new(3).unwrap()),
    );
    events_to_parquet(
        &input,
        &name("struct-snappy"),
        DimsAs::Struct,
        TsAs::TimestampUtc,
        Compression::SNAPPY,
    );
}
