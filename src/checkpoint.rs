//! State checkpoints: the engine's learnt state (baselines, open windows, detectors, incidents,
//! pending decisions, guards) saved with the input offsets it corresponds to, so that a restart
//! neither relearns from scratch nor raises cold-start false alarms.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! magic "GRDCKPT\0" (8) | format version u16 | window fingerprint u64 | written at (ms) i64
//! | payload length u64 | CRC-32 of the payload u32 | payload (postcard)
//! ```
//!
//! A file is written to a temporary name, fsynced, renamed over the old one and the directory
//! fsynced: a crash leaves either the old checkpoint or the new one, never a torn file. The
//! checkpoint it replaces is kept as a previous generation (`engine.ckpt.1`, `.2`, ...), so a
//! current file damaged on disk costs the input since the previous one, not the state. On load,
//! every way a file can be wrong (another format, a version this build does not read, another
//! window or lateness, truncation, a checksum mismatch, a payload that does not
//! decode) is an error with a bounded reason code; a bad file is moved aside, reported and
//! never trusted.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const MAGIC: [u8; 8] = *b"GRDCKPT\0";
/// Bumped whenever the payload's shape changes: an older file is reported, not misread.
pub const FORMAT_VERSION: u16 = 8;
const HEADER_LEN: usize = 8 + 2 + 8 + 8 + 8 + 4;
/// The file name inside the state directory.
pub const FILE_NAME: &str = "engine.ckpt";
/// A checkpoint written just before the output transaction that it belongs to commits. It
/// becomes [`FILE_NAME`] once the commit succeeded; found at startup, it is promoted only if
/// the consumer group's committed offsets show that its transaction did commit.
pub const PENDING_NAME: &str = "engine.ckpt.pending";
/// Most checkpoint generations kept (`[state] generations`), the current one included.
pub const MAX_GENERATIONS: usize = 16;

/// Generation `k` of the current checkpoint: 0 is [`FILE_NAME`], 1 the one before it, ...
pub fn generation_name(k: usize) -> String {
    if k == 0 {
        FILE_NAME.to_string()
    } else {
        format!("{FILE_NAME}.{k}")
    }
}

/// Stage 2: the checkpoint kept for the next owner of repartition partition `x`.
pub fn handover_name(x: i32) -> String {
    format!("handover-{x}.ckpt")
}

/// Stage 2: an instance's subdirectory of the shared state directory.
pub fn instance_dir_name(instance: &str) -> String {
    instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a guardrail checkpoint (bad magic bytes)")]
    BadMagic { path: PathBuf },
    #[error("checkpoint {path} has format version {found}; this build reads version {expected}")]
    Version {
        path: PathBuf,
        found: u16,
        expected: u16,
    },
    #[error("checkpoint {path} was written for another window_secs or allowed_lateness_secs (fingerprint {found:016x}, now {expected:016x}); its state does not fit the windows now configured")]
    ConfigChanged {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("checkpoint {path} is truncated ({len} bytes, header says {expected})")]
    Truncated {
        path: PathBuf,
        len: usize,
        expected: usize,
    },
    #[error("checkpoint {path} is corrupt: CRC-32 {found:08x}, expected {expected:08x}")]
    Checksum {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("checkpoint {path} does not decode: {message}")]
    Decode { path: PathBuf, message: String },
}

impl CheckpointError {
    /// Bounded label for `guardrail_checkpoint_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            CheckpointError::Io { .. } => "io",
            CheckpointError::BadMagic { .. } => "bad_magic",
            CheckpointError::Version { .. } => "version",
            CheckpointError::ConfigChanged { .. } => "config_changed",
            CheckpointError::Truncated { .. } => "truncated",
            CheckpointError::Checksum { .. } => "checksum",
            CheckpointError::Decode { .. } => "decode",
        }
    }

    pub const REASONS: [&'static str; 7] = [
        "io",
        "bad_magic",
        "version",
        "config_changed",
        "truncated",
        "checksum",
        "decode",
    ];
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Loaded {
    pub written_ms: i64,
    pub payload: Vec<u8>,
}

/// Frames a payload: header with version, fingerprint and checksum.
pub fn frame(payload: &[u8], fingerprint: u64, written_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&written_ms.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a framed checkpoint and returns its payload.
pub fn unframe(path: &Path, bytes: &[u8], fingerprint: u64) -> Result<Loaded, CheckpointError> {
    let p = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(CheckpointError::BadMagic { path: p() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(CheckpointError::Truncated {
            path: p(),
            len: bytes.len(),
            expected: HEADER_LEN,
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let version = u16_at(8);
    if version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: p(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let found_fp = u64_at(10);
    if found_fp != fingerprint {
        return Err(CheckpointError::ConfigChanged {
            path: p(),
            found: found_fp,
            expected: fingerprint,
        });
    }
    let written_ms = u64_at(18) as i64;
    let len = u64_at(26) as usize;
    let crc = u32::from_le_bytes(bytes[34..38].try_into().unwrap());
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(CheckpointError::Truncated {
            path: p(),
            len: bytes.len(),
            expected: HEADER_LEN.saturating_add(len),
        });
    }
    let found_crc = crc32fast::hash(payload);
    if found_crc != crc {
        return Err(CheckpointError::Checksum {
            path: p(),
            found: found_crc,
            expected: crc,
        });
    }
    Ok(Loaded {
        written_ms,
        payload: payload.to_vec(),
    })
}

/// Writes `bytes` to `dir/name` atomically: temporary file, fsync, rename, fsync of the
/// directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = write_tmp(dir, name, bytes)?;
    rename(&tmp, &dir.join(name))?;
    sync_dir(dir);
    Ok(())
}

/// Writes the current checkpoint atomically, keeping the one it replaces as generation 1 of
/// `generations` (older ones shift up, the oldest is dropped).
pub fn write_current(dir: &Path, bytes: &[u8], generations: usize) -> Result<(), CheckpointError> {
    let tmp = write_tmp(dir, FILE_NAME, bytes)?;
    keep_generations(dir, generations)?;
    rename(&tmp, &dir.join(FILE_NAME))?;
    sync_dir(dir);
    Ok(())
}

/// Writes and fsyncs `bytes` under a temporary name next to `dir/name`, and returns it.
fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, CheckpointError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |source| CheckpointError::Io {
        path: dir.join(name),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(tmp)
}

fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::rename(from, to).map_err(|source| CheckpointError::Io {
        path: to.to_path_buf(),
        source,
    })
}

/// A rename is durable only once the directory entry is. Best effort: some filesystems refuse
/// to fsync a directory, and the rename itself is atomic either way.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Before the current checkpoint is replaced: shifts generations 1.. up by one (dropping the
/// oldest, and any beyond `generations` left by a larger setting) and makes the current file
/// generation 1. The current file is linked, not moved, so that `engine.ckpt` exists at every
/// instant; a crash part-way leaves at worst one generation missing or doubled.
fn keep_generations(dir: &Path, generations: usize) -> Result<(), CheckpointError> {
    let current = dir.join(FILE_NAME);
    if !current.exists() {
        return Ok(());
    }
    // Generations beyond the setting are never read, and would be far behind if it grew again.
    for k in generations.max(1)..=MAX_GENERATIONS {
        let _ = fs::remove_file(dir.join(generation_name(k)));
    }
    if generations <= 1 {
        return Ok(());
    }
    for k in (1..generations - 1).rev() {
        match fs::rename(
            dir.join(generation_name(k)),
            dir.join(generation_name(k + 1)),
        ) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Io {
                    path: dir.join(generation_name(k)),
                    source: e,
                })
            }
            _ => {}
        }
    }
    let tmp = dir.join(format!(".{}.tmp", generation_name(1)));
    let _ = fs::remove_file(&tmp);
    let io = |source| CheckpointError::Io {
        path: dir.join(generation_name(1)),
        source,
    };
    // A filesystem without hard links gets a copy.
    if fs::hard_link(&current, &tmp).is_err() {
        fs::copy(&current, &tmp).map_err(io)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    }
    rename(&tmp, &dir.join(generation_name(1)))?;
    sync_dir(dir);
    Ok(())
}

/// Reads and verifies `dir/name`. `Ok(None)` when there is no checkpoint yet.
pub fn read(dir: &Path, name: &str, fingerprint: u64) -> Result<Option<Loaded>, CheckpointError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => unframe(&path, &bytes, fingerprint).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Io { path, source }),
    }
}

/// What [`load_newest`] found.
#[derive(Debug)]
pub struct Newest<T> {
    /// The generation taken (0: the current checkpoint) and what `accept` made of it.
    pub taken: Option<(usize, T)>,
    /// Newer generations passed over: file name and why (a rejection reason, or `missing`).
    pub passed: Vec<(String, &'static str)>,
}

/// Reads the newest checkpoint generation that verifies and that `accept` takes: the current
/// one, else the previous ones in order. Each file that fails is handed to `reject` (to be
/// reported and moved aside) and the next older one is tried; a missing one is skipped, so
/// that a crash between moving a damaged file aside and writing its successor still finds
/// the generation restored from.
pub fn load_newest<T>(
    dir: &Path,
    fingerprint: u64,
    generations: usize,
    mut accept: impl FnMut(&Path, Loaded) -> Result<T, CheckpointError>,
    mut reject: impl FnMut(&str, &CheckpointError),
) -> Newest<T> {
    let mut passed = Vec::new();
    for k in 0..generations.max(1) {
        let name = generation_name(k);
        let result = match read(dir, &name, fingerprint) {
            Ok(None) => {
                passed.push((name, "missing"));
                continue;
            }
            Ok(Some(l)) => accept(&dir.join(&name), l),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => {
                return Newest {
                    taken: Some((k, v)),
                    passed,
                }
            }
            Err(e) => {
                reject(&name, &e);
                passed.push((name, e.reason()));
            }
        }
    }
    Newest {
        taken: None,
        passed,
    }
}

/// The file naming the incarnation that owns a state directory.
pub const OWNER_NAME: &str = "owner";

/// Claims `dir` for a new incarnation of an instance. Kafka fences an older incarnation's
/// transactions, but not its writes to disk: one that was paused or cut off (a zombie) and
/// wakes up would overwrite the newer state with its own, and the next restart would restore
/// that. Each write checks the claim first ([`owns`]), so a zombie stops at its first one.
pub fn claim(dir: &Path, token: &str) -> Result<(), CheckpointError> {
    write_atomic(dir, OWNER_NAME, token.as_bytes())
}

/// Whether `dir` is still claimed by `token`; otherwise the incarnation that claimed it
/// (or why it cannot be told).
pub fn owns(dir: &Path, token: &str) -> Result<(), String> {
    match fs::read(dir.join(OWNER_NAME)) {
        Ok(b) if b == token.as_bytes() => Ok(()),
        Ok(b) => Err(format!(
            "claimed by incarnation {:?}",
            String::from_utf8_lossy(&b)
        )),
        Err(e) => Err(format!("its owner file cannot be read: {e}")),
    }
}

/// Checks at startup that checkpoints can be written into `dir` (creating it if needed).
pub fn probe_writable(dir: &Path) -> Result<(), CheckpointError> {
    write_atomic(dir, ".probe", b"guardrail")?;
    let _ = fs::remove_file(dir.join(".probe"));
    Ok(())
}

/// Makes the pending checkpoint the current one (its transaction committed), keeping the
/// current one as a generation.
pub fn promote(dir: &Path, generations: usize) -> Result<(), CheckpointError> {
    let pending = dir.join(PENDING_NAME);
    if let Err(source) = fs::metadata(&pending) {
        return Err(CheckpointError::Io {
            path: pending,
            source,
        });
    }
    keep_generations(dir, generations)?;
    rename(&pending, &dir.join(FILE_NAME))?;
    sync_dir(dir);
    Ok(())
}

/// Drops a pending checkpoint whose transaction never committed.
pub fn discard_pending(dir: &Path) {
    let _ = fs::remove_file(dir.join(PENDING_NAME));
}

/// Moves a checkpoint that failed verification aside (`<name>.rejected-<ms>`), so it is kept
/// for inspection and never read again.
pub fn quarantine(dir: &Path, name: &str, now_ms: i64) -> Option<PathBuf> {
    let from = dir.join(name);
    let to = dir.join(format!("{name}.rejected-{now_ms}"));
    fs::rename(&from, &to).ok().map(|_| to)
}

/// Encodes a payload (postcard: varints, no field names).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail; the state holds no maps with non-string
    // keys that a self-describing format would refuse.
    postcard::to_allocvec(v).expect("checkpoint state serialises")
}

pub fn decode<'a, T: Deserialize<'a>>(path: &Path, bytes: &'a [u8]) -> Result<T, CheckpointError> {
    postcard::from_bytes(bytes).map_err(|e| CheckpointError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A value carried as JSON inside the binary payload: for records whose serde shape is the
/// API's (optional fields skipped when empty), which a positional format cannot read back.
/// They are few (incidents, changes, audit records), so the cost is small.
#[derive(Debug, Clone, Default)]
pub struct Json<T>(pub T);

impl<T: Serialize> Serialize for Json<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(&self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Json<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text)
            .map(Json)
            .map_err(serde::de::Error::custom)
    }
}

/// Fixed-size arrays longer than serde's built-in 32.
pub mod array {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(
        a: &[T; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        a.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<[T; N], D::Error> {
        let v = Vec::<T>::deserialize(d)?;
        let n = v.len();
        v.try_into()
            .map_err(|_| serde::de::Error::invalid_length(n, &"the array's fixed length"))
    }
}

/// Boxed fixed-size arrays (HyperLogLog registers), through [`array`].
pub mod boxed_array {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[allow(clippy::borrowed_box)] // `#[serde(with)]` hands over the field as it is
    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(
        a: &Box<[T; N]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        super::array::serialize(a, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<Box<[T; N]>, D::Error> {
        super::array::deserialize(d).map(Box::new)
    }
}

/// Optional boxed fixed-size arrays, through [`array`].
pub mod opt_boxed_array {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[allow(clippy::borrowed_box)] // `#[serde(with)]` hands over the field as it is
    pub fn serialize<S: Serializer, T: Serialize, const N: usize>(
        a: &Option<Box<[T; N]>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        a.as_deref().map(|a| a.as_slice()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<Box<[T; N]>>, D::Error> {
        let Some(v) = Option::<Vec<T>>::deserialize(d)? else {
            return Ok(None);
        };
        let n = v.len();
        v.into_boxed_slice()
            .try_into()
            .map(Some)
            .map_err(|_| serde::de::Error::invalid_length(n, &"the array's fixed length"))
    }
}

/// A fixed label (kind, severity, action) in a persisted record. An alias, so that serde's
/// derive does not try to borrow it from the input; fields of this type are read back with
/// [`de_static`] / [`de_static_opt`].
pub type Label = &'static str;

/// The engine labels things with `&'static str` (kinds, severities, actions): read back, each
/// distinct label is leaked once and then shared, so restores do not grow memory.
pub fn intern(s: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static POOL: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut pool = POOL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&x) = pool.get(s) {
        return x;
    }
    let x: &'static str = Box::leak(s.to_string().into_boxed_str());
    pool.insert(x);
    x
}

pub fn de_static<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    Ok(intern(&s))
}

pub fn de_static_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    let s = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
    Ok(s.map(|s| intern(&s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "guardrail-ckpt-{tag}-{}-{}",
            std::process::id(),
            crate::event::now_ms()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_reported() {
        let dir = tmpdir("frame");
        let payload = encode(&(1u32, "hello".to_string(), vec![1.5f64, 2.5]));
        write_atomic(&dir, FILE_NAME, &frame(&payload, 42, 7)).unwrap();
        let got = read(&dir, FILE_NAME, 42).unwrap().unwrap();
        assert_eq!(got.written_ms, 7);
        let v: (u32, String, Vec<f64>) = decode(&dir, &got.payload).unwrap();
        assert_eq!(v, (1, "hello".to_string(), vec![1.5, 2.5]));
        // Nothing there yet: not an error.
        assert!(read(&dir, "absent.ckpt", 42).unwrap().is_none());

        let good = frame(&payload, 42, 7);
        let p = dir.join("x");
        let reason = |b: &[u8], fp: u64| unframe(&p, b, fp).unwrap_err().reason();
        assert_eq!(reason(b"PAR1garbage", 42), "bad_magic");
        assert_eq!(reason(&good, 43), "config_changed");
        assert_eq!(reason(&good[..good.len() - 1], 42), "truncated");
        assert_eq!(reason(&good[..20], 42), "truncated");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert_eq!(reason(&flipped, 42), "checksum");
        let mut old = good.clone();
        old[8] = 0;
        old[9] = 0;
        assert_eq!(reason(&old, 42), "version");
        // The previous format (168 hour-of-week buckets, a 192-bit bitmap) is not misread.
        old[8..10].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(reason(&old, 42), "version");
        // A payload of the wrong shape with a valid frame.
        let wrong = frame(&[0xff, 0xff, 0xff], 42, 7);
        let l = unframe(&p, &wrong, 42).unwrap();
        let e = decode::<(u32, String, Vec<f64>)>(&p, &l.payload).unwrap_err();
        assert_eq!(e.reason(), "decode");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_unwritable_directory_is_reported() {
        let dir = tmpdir("probe");
        probe_writable(&dir.join("nested")).unwrap();
        let file = dir.join("a-file");
        fs::write(&file, b"x").unwrap();
        let e = probe_writable(&file.join("sub")).unwrap_err();
        assert_eq!(e.reason(), "io");
        assert!(e.to_string().contains("a-file"), "{e}");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn quarantine_moves_the_file_aside() {
        let dir = tmpdir("quarantine");
        write_atomic(&dir, FILE_NAME, b"junk").unwrap();
        let to = quarantine(&dir, FILE_NAME, 5).unwrap();
        assert!(to.exists());
        assert!(read(&dir, FILE_NAME, 1).unwrap().is_none());
        fs::remove_dir_all(&dir).ok();
    }

    /// The `written_ms` of every generation in `dir`, current first (None: absent).
    fn generations_in(dir: &Path) -> Vec<Option<i64>> {
        (0..=MAX_GENERATIONS)
            .map(|k| {
                read(dir, &generation_name(k), 1)
                    .unwrap()
                    .map(|l| l.written_ms)
            })
            .collect()
    }

    fn only(present: &[i64]) -> Vec<Option<i64>> {
        let mut v: Vec<Option<i64>> = present.iter().map(|&t| Some(t)).collect();
        v.resize(MAX_GENERATIONS + 1, None);
        v
    }

    #[test]
    fn generations_rotate_and_stay_bounded() {
        let dir = tmpdir("generations");
        for t in 1..=5 {
            write_current(&dir, &frame(b"x", 1, t), 3).unwrap();
        }
        assert_eq!(generations_in(&dir), only(&[5, 4, 3]));
        // A promoted pending checkpoint keeps the current one as a generation too.
        write_atomic(&dir, PENDING_NAME, &frame(b"x", 1, 6)).unwrap();
        promote(&dir, 3).unwrap();
        assert_eq!(generations_in(&dir), only(&[6, 5, 4]));
        assert!(!dir.join(PENDING_NAME).exists());
        // A smaller setting drops the generations beyond it; one keeps the current file alone.
        write_current(&dir, &frame(b"x", 1, 7), 2).unwrap();
        assert_eq!(generations_in(&dir), only(&[7, 6]));
        write_current(&dir, &frame(b"x", 1, 8), 1).unwrap();
        assert_eq!(generations_in(&dir), only(&[8]));
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        // A missing generation (a crash mid-rotation, a file moved aside) is no obstacle.
        for t in 9..=10 {
            write_current(&dir, &frame(b"x", 1, t), 4).unwrap();
        }
        fs::remove_file(dir.join(generation_name(1))).unwrap();
        write_current(&dir, &frame(b"x", 1, 11), 4).unwrap();
        let mut want = only(&[11, 10]);
        want[3] = Some(8);
        assert_eq!(generations_in(&dir), want);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_newest_good_generation_is_taken_and_the_damaged_ones_passed_over() {
        let dir = tmpdir("newest");
        for t in 1..=3 {
            write_current(&dir, &frame(b"x", 1, t), 3).unwrap();
        }
        let current = dir.join(FILE_NAME);
        let bytes = fs::read(&current).unwrap();
        fs::write(&current, &bytes[..bytes.len() - 1]).unwrap();
        let mut rejected = Vec::new();
        let mut reject = |name: &str, e: &CheckpointError| {
            rejected.push((name.to_string(), e.reason()));
            quarantine(&dir, name, 9);
        };
        let n = load_newest(&dir, 1, 3, |_, l| Ok(l.written_ms), &mut reject);
        assert_eq!(n.taken, Some((1, 2)));
        assert_eq!(n.passed, [(FILE_NAME.to_string(), "truncated")]);
        // A file that verifies but is refused (its payload does not decode) is passed over too;
        // the current one, moved aside, is missing now.
        let n = load_newest(
            &dir,
            1,
            3,
            |p, l| match l.written_ms {
                2 => Err(CheckpointError::Decode {
                    path: p.to_path_buf(),
                    message: "test".into(),
                }),
                t => Ok(t),
            },
            &mut reject,
        );
        assert_eq!(n.taken, Some((2, 1)));
        assert_eq!(
            n.passed,
            [
                (FILE_NAME.to_string(), "missing"),
                (generation_name(1), "decode")
            ]
        );
        // Generations beyond the setting are not looked at.
        let n = load_newest(&dir, 1, 2, |_, l| Ok(l.written_ms), &mut reject);
        assert_eq!(n.taken, None);
        assert_eq!(
            rejected,
            [
                (FILE_NAME.to_string(), "truncated"),
                (generation_name(1), "decode")
            ]
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn interned_labels_are_shared() {
        let a = intern("step_down");
        let b = intern(&String::from("step_down"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn json_and_arrays_round_trip_inside_postcard() {
        #[derive(Serialize, Deserialize, Debug)]
        struct T {
            #[serde(with = "array")]
            a: [u16; 40],
            #[serde(with = "boxed_array")]
            b: Box<[u8; 64]>,
            j: Json<serde_json::Value>,
        }
        let t = T {
            a: std::array::from_fn(|i| i as u16 * 3),
            b: Box::new([9u8; 64]),
            j: Json(serde_json::json!({"x": 1, "y": [true, null]})),
        };
        let back: T = decode(Path::new("t"), &encode(&t)).unwrap();
        assert_eq!(back.a, t.a);
        assert_eq!(back.b, t.b);
        assert_eq!(back.j.0, t.j.0);
    }
}
