//! `guardrail replay`: the same engine over files, in event time, as fast as the machine goes.
//!
//! Inputs are JSON lines (one event or change per line) or Parquet with the contract's field
//! names (detected by the `PAR1` magic or a `.parquet` extension). Events are read into one
//! reused buffer: a JSON line as it is, a Parquet row written as the contract's JSON object, so
//! both go through [`Engine::process_event`] and are decoded, counted and dead-lettered by the
//! same rules. Changes are loaded, sorted by time and merged in before the first event at or
//! after their timestamp, so decisions see the registry as it was at that moment in event time.
//! Outputs go to JSON-lines files in the output dir.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    UInt64Array,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use serde::Serialize;

use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::event::{decode_change, fmt_time, now_ms, Change, ErrorCode, Reject};
use crate::sink::{dead_letter, FileSink, Signer, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parquet { path: String, message: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub events: PathBuf,
    pub changes: Option<PathBuf>,
    pub out: PathBuf,
    /// Print a progress line to stderr every this many events (0 = quiet). See
    /// [`replay_with_progress`] for a single updating line on a terminal.
    pub progress_every: u64,
}

/// How `replay` reports progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing.
    Quiet,
    /// One line every this many events (for logs and pipes).
    Lines { every: u64 },
    /// A single line rewritten in place a few times a second (for a terminal).
    Live,
}

impl Progress {
    /// `Live` on a terminal, otherwise a line every million events; `Quiet` if asked.
    pub fn for_stderr(quiet: bool) -> Progress {
        if quiet {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            Progress::Live
        } else {
            Progress::Lines { every: 1_000_000 }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    pub events_read: u64,
    pub events_accepted: u64,
    pub events_rejected: serde_json::Map<String, serde_json::Value>,
    pub events_unselected: u64,
    /// Events stamped further ahead of event time than the allowed lateness, alone: counted,
    /// but not allowed to move event time.
    pub event_time_jumps_held: u64,
    pub changes_read: u64,
    pub changes_rejected: u64,
    pub series: usize,
    pub windows_closed: u64,
    pub incidents: usize,
    pub alerts_firing: u64,
    pub alerts_resolved: u64,
    pub rollbacks_requested: u64,
    pub rollbacks_confirmed: u64,
    pub event_time_start: Option<String>,
    pub event_time_end: Option<String>,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn pq_err(path: &Path, message: impl Into<String>) -> ReplayError {
    ReplayError::Parquet {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The contract's event fields (section 1): the only columns read from a Parquet events file.
const EVENT_FIELDS: [&str; 11] = [
    "type",
    "ts",
    "id",
    "user",
    "surface",
    "variant",
    "change_id",
    "arm",
    "value",
    "name",
    "dims",
];
const EVENT_REQUIRED: [&str; 2] = ["type", "ts"];

/// The Arrow types an events column may have (section 1's JSON types): a column of another
/// type is a file error, rather than a dead letter for every row.
fn check_event_column(name: &str, t: &DataType) -> Result<(), String> {
    use DataType as T;
    fn stringy(t: &DataType) -> bool {
        match t {
            T::Dictionary(_, v) => stringy(v),
            t => matches!(
                t,
                T::Null
                    | T::Utf8
                    | T::LargeUtf8
                    | T::Utf8View
                    | T::Binary
                    | T::LargeBinary
                    | T::BinaryView
            ),
        }
    }
    let t = match t {
        T::Dictionary(_, v) => v.as_ref(),
        t => t,
    };
    let ok = matches!(t, T::Null)
        || match name {
            "ts" => {
                stringy(t)
                    || t.is_integer()
                    || t.is_floating()
                    || matches!(t, T::Timestamp(..) | T::Date32 | T::Date64)
            }
            "value" => t.is_numeric(),
            "dims" => match t {
                T::Map(entries, _) => match entries.data_type() {
                    T::Struct(kv) => kv.iter().all(|f| stringy(f.data_type())),
                    _ => false,
                },
                T::Struct(fields) => fields.iter().all(|f| stringy(f.data_type())),
                _ => false,
            },
            _ => stringy(t),
        };
    if ok {
        return Ok(());
    }
    let want = match name {
        "ts" => "an RFC 3339 string, integer epoch milliseconds or a timestamp",
        "value" => "a number",
        "dims" => "a map of string to string or a struct of string fields",
        _ => "a string",
    };
    Err(format!(
        "column `{name}` has Arrow type {t}; the contract wants {want}"
    ))
}

/// The contract's change fields (section 2, plus the `target_metric` extension).
const CHANGE_FIELDS: [&str; 12] = [
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
    "target_metric",
];
const CHANGE_REQUIRED: [&str; 4] = ["change_id", "ts", "action", "actor"];

/// Parquet codecs this build decompresses (the `parquet` crate features in Cargo.toml).
const CODECS: &str = "uncompressed, snappy, gzip, lz4, lz4_raw and zstd";

fn codec_supported(c: Compression) -> bool {
    matches!(
        c,
        Compression::UNCOMPRESSED
            | Compression::SNAPPY
            | Compression::GZIP(_)
            | Compression::LZ4
            | Compression::LZ4_RAW
            | Compression::ZSTD(_)
    )
}

fn codec_name(c: Compression) -> String {
    let s = format!("{c:?}");
    s.split('(').next().unwrap_or_default().to_ascii_lowercase()
}

/// Parquet if the file starts with the `PAR1` magic or is named `*.parquet`.
fn is_parquet(path: &Path) -> Result<bool, ReplayError> {
    if path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("parquet"))
        .unwrap_or(false)
    {
        return Ok(true);
    }
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(got == 4 && &magic == b"PAR1")
}

fn trim(b: &[u8]) -> &[u8] {
    let mut e = b.len();
    while e > 0 && (b[e - 1] == b'\n' || b[e - 1] == b'\r') {
        e -= 1;
    }
    &b[..e]
}

/// An input file, read one record at a time into a caller's buffer.
enum Input {
    Lines {
        path: PathBuf,
        r: BufReader<File>,
        line: u64,
        bytes_read: u64,
        size: u64,
    },
    Parquet(Box<ParquetRows>),
}

impl Input {
    /// `check` vets each contract column's Arrow type when the file is Parquet.
    fn open(
        path: &Path,
        fields: &[&str],
        required: &[&str],
        check: Option<ColumnCheck>,
    ) -> Result<Input, ReplayError> {
        if is_parquet(path)? {
            return Ok(Input::Parquet(Box::new(ParquetRows::open(
                path, fields, required, check,
            )?)));
        }
        let f = File::open(path).map_err(io_err(path))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Input::Lines {
            path: path.to_path_buf(),
            r: BufReader::with_capacity(1 << 20, f),
            line: 0,
            bytes_read: 0,
            size,
        })
    }

    /// Fills `buf` with the next record (a JSON object, or what the line holds). `Ok(None)` at
    /// the end; `Ok(Some(Some(reject)))` for a Parquet row that has no JSON form (a NaN
    /// value, a time out of range, bytes that are not UTF-8): `buf` then shows the row.
    fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<Option<Reject>>, ReplayError> {
        match self {
            Input::Lines {
                path,
                r,
                line,
                bytes_read,
                ..
            } => loop {
                buf.clear();
                let n = r.read_until(b'\n', buf).map_err(io_err(path))?;
                if n == 0 {
                    return Ok(None);
                }
                *line += 1;
                *bytes_read += n as u64;
                let len = trim(buf).len();
                buf.truncate(len);
                if !buf.is_empty() {
                    return Ok(Some(None));
                }
            },
            Input::Parquet(p) => p.next(buf),
        }
    }

    /// Names the record last returned by `next`, for dead letters: `file:line` for JSON lines,
    /// `file/row/n` (counted from 0) for Parquet.
    fn position(&self) -> String {
        match self {
            Input::Lines { path, line, .. } => format!("{}:{line}", path.display()),
            Input::Parquet(p) => format!("{}/row/{}", p.path.display(), p.row.saturating_sub(1)),
        }
    }

    /// How far through the file: bytes for JSON lines, rows for Parquet.
    fn fraction(&self) -> Option<f64> {
        match self {
            Input::Lines {
                bytes_read, size, ..
            } => (*size > 0).then(|| *bytes_read as f64 / *size as f64),
            Input::Parquet(p) => (p.total_rows > 0).then(|| p.row as f64 / p.total_rows as f64),
        }
    }
}

type ColumnCheck = fn(&str, &DataType) -> Result<(), String>;

/// Rows of a Parquet file as contract JSON objects, one record batch at a time.
struct ParquetRows {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    batch: Option<RowWriter>,
    /// Rows returned so far (the next row's index).
    row: u64,
    total_rows: u64,
}

impl ParquetRows {
    fn open(
        path: &Path,
        fields: &[&str],
        required: &[&str],
        check: Option<ColumnCheck>,
    ) -> Result<ParquetRows, ReplayError> {
        let f = File::open(path).map_err(io_err(path))?;
        let builder = guard(path, || ParquetRecordBatchReaderBuilder::try_new(f))?
            .map_err(|e| pq_err(path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let mut roots = Vec::new();
        for want in fields {
            if let Some(i) = schema.fields().iter().position(|f| f.name() == want) {
                roots.push(i);
            }
        }
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|r| schema.fields().iter().all(|f| f.name() != r))
            .collect();
        if !missing.is_empty() {
            return Err(pq_err(
                path,
                format!(
                    "no column {} (columns: {}); the contract's field names are expected",
                    missing
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // Check the types of the projected columns up front (a bad type is a file error, not
        // a million dead letters), using an empty batch of the projected schema.
        for &i in &roots {
            let fld = schema.field(i);
            if let Some(check) = check {
                check(fld.name(), fld.data_type()).map_err(|m| pq_err(path, m))?;
            }
            let empty = arrow_array::new_empty_array(fld.data_type());
            Col::new(&empty, fld.name()).map_err(|m| pq_err(path, m))?;
        }
        let meta = builder.metadata().clone();
        let descr = builder.parquet_schema();
        for rg in meta.row_groups() {
            for (leaf, cc) in rg.columns().iter().enumerate() {
                if roots.contains(&descr.get_column_root_idx(leaf))
                    && !codec_supported(cc.compression())
                {
                    return Err(pq_err(
                        path,
                        format!(
                            "column `{}` is compressed with {}, which this build does not read (it reads {CODECS}); rewrite the file with one of those",
                            cc.column_path().string(),
                            codec_name(cc.compression())
                        ),
                    ));
                }
            }
        }
        let mask = ProjectionMask::roots(descr, roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(|e| pq_err(path, format!("cannot read as Parquet: {e}")))?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            reader,
            batch: None,
            row: 0,
            total_rows: meta.file_metadata().num_rows().max(0) as u64,
        })
    }

    fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<Option<Reject>>, ReplayError> {
        loop {
            if let Some(b) = &mut self.batch {
                if b.next < b.len {
                    let i = b.next;
                    b.next += 1;
                    self.row += 1;
                    buf.clear();
                    let mut reject = None;
                    b.write_row(i, buf, &mut reject);
                    return Ok(Some(reject));
                }
            }
            self.batch = None;
            let path = &self.path;
            let row = self.row;
            let batch: RecordBatch = match guard(path, || self.reader.next())? {
                None => return Ok(None),
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    return Err(pq_err(
                        path,
                        format!("cannot read as Parquet after row {row}: {e}"),
                    ))
                }
            };
            self.batch = Some(RowWriter::new(&batch).map_err(|m| pq_err(path, m))?);
        }
    }
}

thread_local! {
    /// Set while this thread is inside the Parquet reader (see [`guard`]).
    static IN_READER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a call into the Parquet reader, turning a panic on a corrupt file (the reader indexes
/// out of bounds on some damaged pages) into an error. The panic's own message is kept off
/// stderr: the error says what happened.
fn guard<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T, ReplayError> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_READER.with(|r| r.get()) {
                prev(info)
            }
        }));
    });
    IN_READER.with(|r| r.set(true));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_READER.with(|r| r.set(false));
    res.map_err(|p| {
        let what = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        pq_err(
            path,
            format!("corrupt Parquet file: the reader failed: {what}"),
        )
    })
}

/// One record batch, ready to write row `i` as a JSON object.
struct RowWriter {
    /// `"name":` (escaped) and the column.
    cols: Vec<(Vec<u8>, Arc<str>, Col)>,
    len: usize,
    next: usize,
}

impl RowWriter {
    fn new(batch: &RecordBatch) -> Result<RowWriter, String> {
        let schema = batch.schema();
        let mut cols = Vec::with_capacity(batch.num_columns());
        for (f, a) in schema.fields().iter().zip(batch.columns()) {
            let mut key = Vec::with_capacity(f.name().len() + 3);
            put_str(&mut key, f.name());
            key.push(b':');
            cols.push((key, Arc::from(f.name().as_str()), Col::new(a, f.name())?));
        }
        Ok(RowWriter {
            cols,
            len: batch.num_rows(),
            next: 0,
        })
    }

    /// Writes row `i` as a JSON object; null columns are left out.
    fn write_row(&self, i: usize, buf: &mut Vec<u8>, reject: &mut Option<Reject>) {
        write_object(
            self.cols.iter().map(|(k, n, c)| (k.as_slice(), &**n, c)),
            i,
            buf,
            reject,
        );
    }
}

/// Milliseconds from a time column's unit.
#[derive(Debug, Clone, Copy)]
enum Unit {
    Day,
    Second,
    Milli,
    Micro,
    Nano,
}

impl Unit {
    fn to_ms(self, v: i64) -> Option<i64> {
        match self {
            Unit::Day => v.checked_mul(86_400_000),
            Unit::Second => v.checked_mul(1000),
            Unit::Milli => Some(v),
            Unit::Micro => Some(v.div_euclid(1000)),
            Unit::Nano => Some(v.div_euclid(1_000_000)),
        }
    }
}

/// A column (or nested child) in the few shapes JSON has; other Arrow types are cast to one of
/// them once per batch.
enum Kind {
    Null,
    Bool(BooleanArray),
    I64(Int64Array),
    U64(UInt64Array),
    F64(Float64Array),
    /// Strings; `true` when no byte in the batch needs escaping (then they are copied as is).
    Str(StringArray, bool),
    /// Bytes without a UTF-8 annotation: written as a string when they are UTF-8.
    Bin(BinaryArray),
    /// Timestamps and dates: written as integer epoch milliseconds.
    Time(Int64Array, Unit),
    /// An object of the non-null fields.
    Struct(Vec<(Vec<u8>, Col)>),
    /// An object of the entries with non-null values; keys are strings, integers or booleans.
    Map {
        offsets: OffsetBuffer<i32>,
        keys: Box<Col>,
        values: Box<Col>,
    },
    List {
        offsets: OffsetBuffer<i32>,
        values: Box<Col>,
    },
}

impl Kind {
    fn str(a: StringArray) -> Kind {
        // One pass over the batch's bytes saves a byte-by-byte escape check per value.
        let clean = !a
            .value_data()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        Kind::Str(a, clean)
    }
}

/// Row `i` of named columns as a JSON object (`key` is the quoted name and colon); null columns
/// are left out. `name` is what errors call the column.
fn write_object<'a>(
    cols: impl Iterator<Item = (&'a [u8], &'a str, &'a Col)>,
    i: usize,
    buf: &mut Vec<u8>,
    reject: &mut Option<Reject>,
) {
    buf.push(b'{');
    let mut first = true;
    for (key, name, c) in cols {
        if c.is_null(i) {
            continue;
        }
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.extend_from_slice(key);
        c.write(i, buf, name, reject);
    }
    buf.push(b'}');
}

struct Col {
    nulls: Option<NullBuffer>,
    kind: Kind,
}

fn cast(a: &dyn Array, to: &DataType, name: &str) -> Result<ArrayRef, String> {
    arrow_cast::cast(a, to).map_err(|e| {
        format!(
            "column `{name}`: cannot convert Arrow type {} to {to}: {e}",
            a.data_type()
        )
    })
}

impl Col {
    fn new(a: &ArrayRef, name: &str) -> Result<Col, String> {
        use DataType as T;
        let nulls = a.logical_nulls();
        let kind = match a.data_type() {
            T::Null => Kind::Null,
            T::Boolean => Kind::Bool(a.as_boolean().clone()),
            T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32 => {
                Kind::I64(
                    cast(a, &T::Int64, name)?
                        .as_primitive::<Int64Type>()
                        .clone(),
                )
            }
            T::UInt64 => Kind::U64(a.as_primitive::<UInt64Type>().clone()),
            T::Float16 | T::Float32 | T::Float64 | T::Decimal128(..) | T::Decimal256(..) => {
                Kind::F64(
                    cast(a, &T::Float64, name)?
                        .as_primitive::<Float64Type>()
                        .clone(),
                )
            }
            T::Utf8 => Kind::str(a.as_string::<i32>().clone()),
            T::LargeUtf8 | T::Utf8View => {
                Kind::str(cast(a, &T::Utf8, name)?.as_string::<i32>().clone())
            }
            T::Binary => Kind::Bin(a.as_binary::<i32>().clone()),
            T::LargeBinary | T::BinaryView | T::FixedSizeBinary(_) => {
                Kind::Bin(cast(a, &T::Binary, name)?.as_binary::<i32>().clone())
            }
            T::Timestamp(unit, _) => {
                let u = match unit {
                    TimeUnit::Second => Unit::Second,
                    TimeUnit::Millisecond => Unit::Milli,
                    TimeUnit::Microsecond => Unit::Micro,
                    TimeUnit::Nanosecond => Unit::Nano,
                };
                Kind::Time(
                    cast(a, &T::Int64, name)?
                        .as_primitive::<Int64Type>()
                        .clone(),
                    u,
                )
            }
            T::Date32 => {
                let days = cast(a, &T::Int32, name)?;
                Kind::Time(
                    cast(&days, &T::Int64, name)?
                        .as_primitive::<Int64Type>()
                        .clone(),
                    Unit::Day,
                )
            }
            T::Date64 => Kind::Time(
                cast(a, &T::Int64, name)?
                    .as_primitive::<Int64Type>()
                    .clone(),
                Unit::Milli,
            ),
            T::Dictionary(_, v) => return Col::new(&cast(a, v, name)?, name),
            T::Struct(_) => {
                let s = a.as_struct();
                let mut fields = Vec::with_capacity(s.num_columns());
                for (f, c) in s.fields().iter().zip(s.columns()) {
                    let mut key = Vec::with_capacity(f.name().len() + 3);
                    put_str(&mut key, f.name());
                    key.push(b':');
                    fields.push((key, Col::new(c, name)?));
                }
                Kind::Struct(fields)
            }
            T::Map(..) => {
                let m = a.as_map();
                let keys = Col::new(m.keys(), name)?;
                if !matches!(
                    keys.kind,
                    Kind::Str(..) | Kind::Bin(_) | Kind::I64(_) | Kind::U64(_) | Kind::Bool(_)
                ) {
                    return Err(format!(
                        "column `{name}`: map keys of type {} cannot be JSON object keys",
                        m.key_type()
                    ));
                }
                Kind::Map {
                    offsets: m.offsets().clone(),
                    keys: Box::new(keys),
                    values: Box::new(Col::new(m.values(), name)?),
                }
            }
            T::List(_) => {
                let l = a.as_list::<i32>();
                Kind::List {
                    offsets: l.offsets().clone(),
                    values: Box::new(Col::new(l.values(), name)?),
                }
            }
            T::LargeList(f) | T::FixedSizeList(f, _) => {
                return Col::new(&cast(a, &T::List(f.clone()), name)?, name)
            }
            other => {
                return Err(format!(
                    "column `{name}` has Arrow type {other}, which has no JSON form in the contract"
                ))
            }
        };
        Ok(Col { nulls, kind })
    }

    #[inline]
    fn is_null(&self, i: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(i))
    }

    /// Writes the (non-null) value at `i`. A value with no JSON form is written as a string
    /// and noted in `reject` (the first one wins); `field` names it.
    fn write(&self, i: usize, buf: &mut Vec<u8>, field: &str, reject: &mut Option<Reject>) {
        match &self.kind {
            Kind::Null => buf.extend_from_slice(b"null"),
            Kind::Bool(a) => buf.extend_from_slice(if a.value(i) { b"true" } else { b"false" }),
            Kind::I64(a) => put_num(buf, a.value(i)),
            Kind::U64(a) => put_num(buf, a.value(i)),
            Kind::F64(a) => {
                let v = a.value(i);
                if v.is_finite() {
                    put_num(buf, v);
                } else {
                    let s = if v.is_nan() {
                        "NaN"
                    } else if v > 0.0 {
                        "inf"
                    } else {
                        "-inf"
                    };
                    note(
                        reject,
                        ErrorCode::NonFiniteValue,
                        format!("`{field}` {s} is not finite"),
                    );
                    put_str(buf, s);
                }
            }
            Kind::Str(a, true) => {
                buf.push(b'"');
                buf.extend_from_slice(a.value(i).as_bytes());
                buf.push(b'"');
            }
            Kind::Str(a, false) => put_str(buf, a.value(i)),
            Kind::Bin(a) => match std::str::from_utf8(a.value(i)) {
                Ok(s) => put_str(buf, s),
                Err(e) => {
                    note(
                        reject,
                        ErrorCode::InvalidUtf8,
                        format!("`{field}` is not UTF-8 at byte {}", e.valid_up_to()),
                    );
                    put_str(buf, &String::from_utf8_lossy(a.value(i)));
                }
            },
            Kind::Time(a, unit) => {
                let v = a.value(i);
                match unit.to_ms(v) {
                    Some(ms) => put_num(buf, ms),
                    None => {
                        note(
                            reject,
                            ErrorCode::BadTimestamp,
                            format!("`{field}` {v} ({unit:?}) is out of range"),
                        );
                        put_str(buf, &format!("{v} {unit:?}"));
                    }
                }
            }
            Kind::Struct(fields) => write_object(
                fields.iter().map(|(k, c)| (k.as_slice(), field, c)),
                i,
                buf,
                reject,
            ),
            Kind::Map {
                offsets,
                keys,
                values,
            } => {
                buf.push(b'{');
                let mut first = true;
                for j in offsets[i] as usize..offsets[i + 1] as usize {
                    if values.is_null(j) || keys.is_null(j) {
                        continue;
                    }
                    if !first {
                        buf.push(b',');
                    }
                    first = false;
                    if matches!(keys.kind, Kind::Str(..) | Kind::Bin(_)) {
                        keys.write(j, buf, field, reject);
                    } else {
                        // Numbers and booleans need no escaping.
                        buf.push(b'"');
                        keys.write(j, buf, field, reject);
                        buf.push(b'"');
                    }
                    buf.push(b':');
                    values.write(j, buf, field, reject);
                }
                buf.push(b'}');
            }
            Kind::List { offsets, values } => {
                buf.push(b'[');
                for j in offsets[i] as usize..offsets[i + 1] as usize {
                    if j > offsets[i] as usize {
                        buf.push(b',');
                    }
                    if values.is_null(j) {
                        buf.extend_from_slice(b"null");
                    } else {
                        values.write(j, buf, field, reject);
                    }
                }
                buf.push(b']');
            }
        }
    }
}

fn note(reject: &mut Option<Reject>, code: ErrorCode, message: String) {
    if reject.is_none() {
        *reject = Some(Reject::new(code, message));
    }
}

fn put_num<T: Serialize>(buf: &mut Vec<u8>, v: T) {
    // Writing a number into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &v);
}

/// Writes `s` as a JSON string.
fn put_str(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => &[],
            _ => continue,
        };
        buf.extend_from_slice(&b[start..i]);
        if esc.is_empty() {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 0xf) as usize],
            ]);
        } else {
            buf.extend_from_slice(esc);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&b[start..]);
    buf.push(b'"');
}

/// Reads a changes file (JSON lines or Parquet); bad records go to the sink as dead letters.
fn load_changes(
    path: &Path,
    max_bytes: usize,
    sink: &mut FileSink,
) -> Result<(Vec<Change>, u64), ReplayError> {
    let mut input = Input::open(path, &CHANGE_FIELDS, &CHANGE_REQUIRED, None)?;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut rejected = 0;
    while let Some(bad) = input.next(&mut buf)? {
        let r = match bad {
            Some(e) => Err(e),
            None => decode_change(&buf, max_bytes),
        };
        match r {
            Ok(c) => out.push(c),
            Err(e) => {
                rejected += 1;
                sink.write(&dead_letter(
                    &buf,
                    max_bytes,
                    e.code,
                    &e.message,
                    &input.position(),
                ))?;
            }
        }
    }
    Ok((out, rejected))
}

/// Progress on stderr; see [`Progress`].
struct Meter {
    mode: Progress,
    t0: Instant,
    last: Instant,
    drawn: bool,
}

impl Meter {
    const LIVE_EVERY: Duration = Duration::from_millis(250);

    fn new(mode: Progress) -> Meter {
        let now = Instant::now();
        Meter {
            mode,
            t0: now,
            last: now,
            drawn: false,
        }
    }

    /// The progress line: the long form for logs, a short one (under 80 columns, so that the
    /// carriage return rewrites it on a narrow terminal) for the live line.
    fn line(&self, n: u64, engine: &Engine, input: &Input) -> String {
        let rate = n as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
        let at = engine.max_event_time_ms();
        let frac = input.fraction();
        if self.mode == Progress::Live {
            let at = at
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into());
            let mut s = format!(
                "replay: {} events, {}/s, event time {at}",
                human(n as f64),
                human(rate)
            );
            if let Some(f) = frac {
                s.push_str(&format!(", {:.1}%", f * 100.0));
            }
            return s;
        }
        let mut s = format!(
            "replay: {n} events, {rate:.0} events/s, event time {}",
            at.map(fmt_time).unwrap_or_default()
        );
        if let Some(f) = frac {
            s.push_str(&format!(", {:.1}% of file", f * 100.0));
        }
        s
    }

    /// Called after each event; `n` events so far.
    #[inline]
    fn tick(&mut self, n: u64, engine: &Engine, input: &Input) {
        match self.mode {
            Progress::Quiet => {}
            Progress::Lines { every } => {
                if every > 0 && n % every == 0 {
                    eprintln!("{}", self.line(n, engine, input));
                }
            }
            Progress::Live => {
                if n % 16_384 == 0 && self.last.elapsed() >= Self::LIVE_EVERY {
                    self.last = Instant::now();
                    self.drawn = true;
                    let mut e = std::io::stderr().lock();
                    let _ = write!(e, "\r{}\x1b[K", self.line(n, engine, input));
                    let _ = e.flush();
                }
            }
        }
    }

    /// Leaves the live line at its final value, on a line of its own.
    fn done(&mut self, n: u64, engine: &Engine, input: &Input) {
        if self.mode == Progress::Live && (self.drawn || n > 0) {
            eprintln!("\r{}\x1b[K", self.line(n, engine, input));
        }
    }
}

/// `6.94M`, `743k`, `512`.
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Replays with progress lines every `opts.progress_every` events (0 = none).
pub fn replay(
    cfg: &Config,
    signer: &Signer,
    opts: &ReplayOptions,
) -> Result<ReplaySummary, ReplayError> {
    let progress = match opts.progress_every {
        0 => Progress::Quiet,
        every => Progress::Lines { every },
    };
    replay_with_progress(cfg, signer, opts, progress)
}

/// Replays `opts.events` (and `opts.changes`) through the engine in event time, writing the
/// outputs and `summary.json` into `opts.out`. `opts.progress_every` is ignored for `progress`.
pub fn replay_with_progress(
    cfg: &Config,
    signer: &Signer,
    opts: &ReplayOptions,
    progress: Progress,
) -> Result<ReplaySummary, ReplayError> {
    // Open (and for Parquet, check) the events before writing anything.
    let mut input = Input::open(
        &opts.events,
        &EVENT_FIELDS,
        &EVENT_REQUIRED,
        Some(check_event_column),
    )?;
    let mut engine = Engine::new(cfg)?;
    let mut sink = FileSink::create(&opts.out)?;
    let (changes, changes_rejected) = match &opts.changes {
        Some(p) => load_changes(p, cfg.engine.max_event_bytes, &mut sink)?,
        None => (Vec::new(), 0),
    };
    let changes_read = changes.len() as u64 + changes_rejected;
    engine.schedule_changes(changes);
    let mut buf = Vec::with_capacity(4096);
    let mut meter = Meter::new(progress);
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut now = now_ms();
    let mut first_ts: Option<i64> = None;
    while let Some(bad) = input.next(&mut buf)? {
        n += 1;
        if n % 4096 == 0 {
            now = now_ms();
        }
        let r = match bad {
            None => engine.process_event(&buf, now),
            Some(e) => {
                // A Parquet value with no JSON form: counted as the engine counts a rejection.
                engine.stats.events += 1;
                engine.stats.rejected[e.code.index()] += 1;
                Err(e)
            }
        };
        if let Err(e) = r {
            sink.write(&dead_letter(
                &buf,
                cfg.engine.max_event_bytes,
                e.code,
                &e.message,
                &input.position(),
            ))?;
        }
        if first_ts.is_none() {
            first_ts = engine.max_event_time_ms();
        }
        if engine.has_outputs() {
            for o in engine.take_outputs() {
                sink.write(&o.encode(signer))?;
            }
        }
        meter.tick(n, &engine, &input);
    }
    meter.done(n, &engine, &input);
    engine.finish();
    for o in engine.take_outputs() {
        sink.write(&o.encode(signer))?;
    }
    sink.flush()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let s = &engine.stats;
    let mut rejected = serde_json::Map::new();
    for c in ErrorCode::ALL {
        let n = s.rejected[c.index()];
        if n > 0 {
            rejected.insert(c.as_str().into(), n.into());
        }
    }
    let summary = ReplaySummary {
        events_read: s.events,
        events_accepted: s.accepted,
        events_rejected: rejected,
        events_unselected: s.unselected,
        event_time_jumps_held: s.clock_jumps_held,
        changes_read,
        changes_rejected,
        series: engine.series_count(),
        windows_closed: s.windows_closed,
        incidents: engine.incidents.len(),
        alerts_firing: s.alerts_firing,
        alerts_resolved: s.alerts_resolved,
        rollbacks_requested: s.rollbacks_requested,
        rollbacks_confirmed: s.rollbacks_confirmed,
        event_time_start: first_ts.map(fmt_time),
        event_time_end: engine.max_event_time_ms().map(fmt_time),
        elapsed_secs: elapsed,
        events_per_sec: s.events as f64 / elapsed.max(1e-9),
    };
    let p = opts.out.join("summary.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&summary).expect("summary serialises"),
    )
    .map_err(io_err(&p))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{MapBuilder, StringBuilder};
    use arrow_array::{Float64Array, TimestampNanosecondArray};
    use arrow_schema::{Field, Schema};

    fn row_json(batch: &RecordBatch, i: usize) -> (String, Option<Reject>) {
        let w = RowWriter::new(batch).unwrap();
        let mut buf = Vec::new();
        let mut rej = None;
        w.write_row(i, &mut buf, &mut rej);
        (String::from_utf8(buf).unwrap(), rej)
    }

    #[test]
    fn a_reader_panic_becomes_an_error() {
        let p = Path::new("x.parquet");
        let e = guard(p, || -> u32 { panic!("index out of bounds") }).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.parquet: corrupt Parquet file: the reader failed: index out of"),
            "{e}"
        );
        assert_eq!(guard(p, || 7).unwrap(), 7);
        assert!(!IN_READER.with(|r| r.get()));
    }

    #[test]
    fn event_columns_must_have_the_contract_types() {
        let utf8 = || Field::new("x", DataType::Utf8, true);
        let map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new())
            .finish()
            .data_type()
            .clone();
        let ok: &[(&str, DataType)] = &[
            ("type", DataType::Utf8),
            (
                "user",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            ),
            ("ts", DataType::Timestamp(TimeUnit::Microsecond, None)),
            ("ts", DataType::Int64),
            ("ts", DataType::LargeUtf8),
            ("value", DataType::Decimal128(10, 2)),
            ("dims", map),
            ("dims", DataType::Struct(vec![utf8()].into())),
            ("arm", DataType::Null),
        ];
        for (n, t) in ok {
            assert!(check_event_column(n, t).is_ok(), "{n} {t}");
        }
        let bad: &[(&str, DataType)] = &[
            ("user", DataType::Int64),
            ("value", DataType::Utf8),
            ("dims", DataType::Utf8),
            (
                "dims",
                DataType::Struct(vec![Field::new("n", DataType::Int32, true)].into()),
            ),
            ("ts", DataType::Boolean),
        ];
        for (n, t) in bad {
            let e = check_event_column(n, t).unwrap_err();
            assert!(
                e.starts_with(&format!("column `{n}` has Arrow type")),
                "{e}"
            );
        }
    }

    #[test]
    fn escapes_strings_as_json() {
        let mut b = Vec::new();
        put_str(&mut b, "a\"b\\c\nd\u{1}é");
        let s = String::from_utf8(b).unwrap();
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn escapes_only_when_the_batch_needs_it() {
        for (vals, want) in [
            (["plain", "x"], [r#"{"name":"plain"}"#, r#"{"name":"x"}"#]),
            (["a\"b", "x"], [r#"{"name":"a\"b"}"#, r#"{"name":"x"}"#]),
        ] {
            let batch = RecordBatch::try_from_iter([(
                "name",
                Arc::new(StringArray::from(vals.to_vec())) as ArrayRef,
            )])
            .unwrap();
            for (i, w) in want.iter().enumerate() {
                assert_eq!(row_json(&batch, i).0, *w);
            }
        }
    }

    #[test]
    fn writes_rows_as_contract_json() {
        let mut mb = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        mb.keys().append_value("country");
        mb.values().append_value("FR");
        mb.keys().append_value("device");
        mb.values().append_null();
        mb.append(true).unwrap();
        mb.append(false).unwrap();
        let dims = mb.finish();
        let schema = Schema::new(vec![
            Field::new("type", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                true,
            ),
            Field::new("value", DataType::Float64, true),
            Field::new("dims", dims.data_type().clone(), true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec![Some("conversion"), None])),
                Arc::new(
                    TimestampNanosecondArray::from(vec![1_795_341_600_000_999_999, -1])
                        .with_timezone("UTC"),
                ),
                Arc::new(Float64Array::from(vec![Some(12.5), Some(f64::NAN)])),
                Arc::new(dims),
            ],
        )
        .unwrap();
        let (j, rej) = row_json(&batch, 0);
        assert_eq!(
            j,
            r#"{"type":"conversion","ts":1795341600000,"value":12.5,"dims":{"country":"FR"}}"#
        );
        assert!(rej.is_none());
        let (j, rej) = row_json(&batch, 1);
        assert_eq!(j, r#"{"ts":-1,"value":"NaN"}"#);
        assert_eq!(rej.unwrap().code, ErrorCode::NonFiniteValue);
    }
}
