//! The contract's inputs: events (section 1) and changes (section 2).
//!
//! Events are decoded without copying: string fields borrow from the message bytes (a `Cow` only
//! owns when the JSON string had escapes), `dims` stays a raw JSON slice that is scanned only for
//! the dimensions some metric tracks. Every rejection carries a bounded [`ErrorCode`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::config::Tier;

/// Why an input was dead-lettered. The set is closed so that metric labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidUtf8,
    InvalidJson,
    MissingField,
    InvalidField,
    BadTimestamp,
    NonFiniteValue,
    TooLarge,
    FutureTimestamp,
    TooLate,
    Duplicate,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidUtf8,
        ErrorCode::InvalidJson,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::BadTimestamp,
        ErrorCode::NonFiniteValue,
        ErrorCode::TooLarge,
        ErrorCode::FutureTimestamp,
        ErrorCode::TooLate,
        ErrorCode::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::BadTimestamp => "bad_timestamp",
            ErrorCode::NonFiniteValue => "non_finite_value",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::FutureTimestamp => "future_timestamp",
            ErrorCode::TooLate => "too_late",
            ErrorCode::Duplicate => "duplicate",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected input: the code (bounded) and a human message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Reject {
    pub code: ErrorCode,
    pub message: String,
}

impl Reject {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Reject {
            code,
            message: message.into(),
        }
    }
}

/// The earliest event time guardrail accepts: 0000-01-01T00:00:00Z, the first instant RFC 3339
/// can write. Times outside [`MIN_TIME_MS`, `MAX_TIME_MS`] are `bad_timestamp`: within it every
/// time prints as RFC 3339, and event-time arithmetic (windows, lateness, deadlines) has
/// headroom of more than 35,000 years of milliseconds before it could overflow an `i64`.
pub const MIN_TIME_MS: i64 = -62_167_219_200_000;
/// The latest event time guardrail accepts: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Parses a contract time: RFC 3339 (any offset) or integer milliseconds since the epoch.
/// Instants outside [`MIN_TIME_MS`, `MAX_TIME_MS`] (a year-0000 time with a positive offset,
/// say) are not accepted.
pub fn parse_time_str(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
        .filter(|t| (MIN_TIME_MS..=MAX_TIME_MS).contains(t))
}

/// Parses a raw JSON time value (string or integer number).
pub fn parse_time_raw(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        if inner.contains('\\') {
            let s: String = serde_json::from_str(raw).ok()?;
            return parse_time_str(&s);
        }
        return parse_time_str(inner);
    }
    if let Ok(v) = raw.parse::<i64>() {
        return (MIN_TIME_MS..=MAX_TIME_MS).contains(&v).then_some(v);
    }
    // Integer-valued floats (`1.7e12`) are accepted; fractional milliseconds are not a time.
    let f: f64 = raw.parse().ok()?;
    if f.fract() == 0.0 && (MIN_TIME_MS as f64..=MAX_TIME_MS as f64).contains(&f) {
        Some(f as i64)
    } else {
        None
    }
}

/// Why `text` could not be read as `what` (an event or a change), as a reason code. serde stops
/// at the first field it cannot type, and reports some type errors as syntax errors (a number
/// where an enum belongs), so the text's syntax is checked on its own: what is not JSON at all
/// is `invalid_json` (or `non_finite_value` for the `NaN` / `Infinity` that some encoders
/// write), however far typed decoding got; JSON that is not an object is `invalid_json`; in an
/// object, a number that overflows to infinity is `non_finite_value`, nesting too deep to read
/// is `invalid_json`, and anything else is a field problem, as `data` names it.
fn json_reject(
    text: &str,
    e: serde_json::Error,
    what: &str,
    data: fn(&str) -> ErrorCode,
) -> Reject {
    if let Err(syntax) = serde_json::from_str::<de::IgnoredAny>(text) {
        return syntax_reject(text, &syntax);
    }
    if !is_object(text) {
        return not_an_object(text, what);
    }
    let msg = e.to_string();
    if msg.starts_with("number out of range") {
        return Reject::new(
            ErrorCode::NonFiniteValue,
            format!("a number overflows to infinity: {msg}"),
        );
    }
    if msg.starts_with("recursion limit exceeded") {
        return Reject::new(ErrorCode::InvalidJson, msg);
    }
    if e.is_syntax() {
        // A well-formed value of the wrong kind (serde_json's enums say "expected value").
        return Reject::new(data(&msg), format!("a field has the wrong type: {msg}"));
    }
    Reject::new(data(&msg), msg)
}

/// A syntax error: `non_finite_value` if it stopped on a `NaN` or `Infinity` literal, else
/// `invalid_json`.
fn syntax_reject(text: &str, e: &serde_json::Error) -> Reject {
    if e.is_syntax() {
        if let Some(lit) = non_finite_literal_at(text, e.line(), e.column()) {
            return Reject::new(
                ErrorCode::NonFiniteValue,
                format!(
                    "`{lit}` at line {} column {} is not a JSON number: non-finite values are not accepted",
                    e.line(),
                    e.column()
                ),
            );
        }
    }
    Reject::new(ErrorCode::InvalidJson, e.to_string())
}

/// For a text that does not open an object (serde would read an array as the fields in
/// declaration order): `invalid_json`, with what it is if it is JSON at all.
fn not_an_object(text: &str, what: &str) -> Reject {
    match serde_json::from_str::<de::IgnoredAny>(text) {
        Err(syntax) => syntax_reject(text, &syntax),
        Ok(_) => Reject::new(
            ErrorCode::InvalidJson,
            format!("{what} must be a JSON object, got {}", json_kind(text)),
        ),
    }
}

/// True if the first non-whitespace byte opens an object.
fn is_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

fn json_kind(text: &str) -> &'static str {
    match text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .as_bytes()
        .first()
    {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    }
}

/// `NaN`, `Infinity` or `-Infinity` where serde_json stopped (line and column 1-based; the
/// column is where it stopped, on or just after the literal's first byte).
fn non_finite_literal_at(text: &str, line: usize, column: usize) -> Option<&'static str> {
    let start = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum::<usize>();
    let at = (start + column).saturating_sub(1);
    let b = text.as_bytes();
    for from in [at.saturating_sub(2), at.saturating_sub(1), at] {
        let rest = b.get(from..).unwrap_or(&[]);
        for lit in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(lit.as_bytes()) {
                return Some(lit);
            }
        }
    }
    None
}

/// Formats epoch milliseconds as RFC 3339 UTC.
pub fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Wall-clock now in epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A string that borrows from the input when it has no escapes. (`#[serde(borrow)]` does not
/// reach through `Option<Cow<str>>`, so the borrowing is done by hand.)
struct BStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = BStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<BStr<'a>>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<BStr<'a>>,
    #[serde(borrow)]
    user: Option<BStr<'a>>,
    #[serde(borrow)]
    surface: Option<BStr<'a>>,
    #[serde(borrow)]
    variant: Option<BStr<'a>>,
    #[serde(borrow)]
    change_id: Option<BStr<'a>>,
    #[serde(borrow)]
    arm: Option<BStr<'a>>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<BStr<'a>>,
    #[serde(borrow)]
    dims: Option<&'a RawValue>,
}

/// A decoded event, borrowing from the input bytes.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub ty: Cow<'a, str>,
    pub ts_ms: i64,
    pub id: Option<Cow<'a, str>>,
    pub user: Option<Cow<'a, str>>,
    pub surface: Option<Cow<'a, str>>,
    pub variant: Option<Cow<'a, str>>,
    pub change_id: Option<Cow<'a, str>>,
    pub arm: Option<Cow<'a, str>>,
    pub value: Option<f64>,
    pub name: Option<Cow<'a, str>>,
    /// The raw `dims` object; see [`Event::scan_dims`].
    pub dims: Option<&'a RawValue>,
    /// The first [`DIMS_KEPT`] entries of `dims`, read once by the decoder (which has to parse
    /// the object anyway to validate it), so lookups do not parse it again.
    dims_kv: [(&'a str, Cow<'a, str>); DIMS_KEPT],
    dims_len: u8,
    /// `dims_kv` holds every entry (not so when there are more, or a key has escapes: then
    /// lookups scan the raw object).
    dims_all: bool,
}

/// Entries of an event's `dims` object kept by the decoder.
pub const DIMS_KEPT: usize = 8;
const NO_DIM: (&str, Cow<'static, str>) = ("", Cow::Borrowed(""));

/// Decodes one event. `max_bytes` bounds the input size.
pub fn decode_event<'a>(bytes: &'a [u8], max_bytes: usize) -> Result<Event<'a>, Reject> {
    if bytes.len() > max_bytes {
        return Err(Reject::new(
            ErrorCode::TooLarge,
            format!("event is {} bytes, limit {}", bytes.len(), max_bytes),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Reject::new(
            ErrorCode::InvalidUtf8,
            format!("not UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    if !is_object(text) {
        return Err(not_an_object(text, "an event"));
    }
    let raw: RawEvent<'_> = serde_json::from_str(text)
        .map_err(|e| json_reject(text, e, "an event", |_| ErrorCode::InvalidField))?;
    let ty = raw
        .ty
        .map(|b| b.0)
        .ok_or_else(|| Reject::new(ErrorCode::MissingField, "missing field `type`"))?;
    if ty.is_empty() {
        return Err(Reject::new(ErrorCode::InvalidField, "`type` is empty"));
    }
    let ts = raw
        .ts
        .ok_or_else(|| Reject::new(ErrorCode::MissingField, "missing field `ts`"))?;
    let ts_ms = parse_time_raw(ts.get()).ok_or_else(|| {
        Reject::new(
            ErrorCode::BadTimestamp,
            format!(
                "`ts` {} is neither RFC 3339 nor integer epoch milliseconds (years 0000 to 9999)",
                truncate(ts.get(), 64)
            ),
        )
    })?;
    let value = match raw.value {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => {
            let f: f64 = v.get().parse().map_err(|_| {
                Reject::new(
                    ErrorCode::InvalidField,
                    format!("`value` {} is not a number", truncate(v.get(), 64)),
                )
            })?;
            if !f.is_finite() {
                return Err(Reject::new(
                    ErrorCode::NonFiniteValue,
                    format!("`value` {} is not finite", truncate(v.get(), 64)),
                ));
            }
            Some(f)
        }
    };
    let un = |o: Option<BStr<'a>>| o.map(|b| b.0);
    let arm = un(raw.arm);
    if let Some(arm) = &arm {
        if arm != "treatment" && arm != "holdout" {
            return Err(Reject::new(
                ErrorCode::InvalidField,
                format!(
                    "`arm` must be \"treatment\" or \"holdout\", got {:?}",
                    truncate(arm, 32)
                ),
            ));
        }
    }
    if let Some(d) = raw.dims {
        let t = d.get().trim_start();
        if !(t.starts_with('{') || t == "null") {
            return Err(Reject::new(
                ErrorCode::InvalidField,
                "`dims` must be an object of string to string",
            ));
        }
    }
    let dims = raw.dims.filter(|d| d.get() != "null");
    let mut ev = Event {
        ty,
        ts_ms,
        id: un(raw.id),
        user: un(raw.user),
        surface: un(raw.surface),
        variant: un(raw.variant),
        change_id: un(raw.change_id),
        arm,
        value,
        name: un(raw.name),
        dims,
        dims_kv: [NO_DIM; DIMS_KEPT],
        dims_len: 0,
        dims_all: true,
    };
    if let Some(d) = dims {
        // Validate the dims object once, so metrics can read it later without error paths, and
        // keep its entries while at it.
        let Event {
            dims_kv,
            dims_len,
            dims_all,
            ..
        } = &mut ev;
        scan_dims_into(d, |k, v| {
            let n = *dims_len as usize;
            match k {
                Cow::Borrowed(k) if n < DIMS_KEPT => {
                    dims_kv[n] = (k, v);
                    *dims_len += 1;
                }
                _ => *dims_all = false,
            }
        })?;
    }
    Ok(ev)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl<'a> Event<'a> {
    /// Looks up a dimension: top-level fields (`surface`, `variant`, `change_id`, `arm`) first,
    /// then the `dims` object.
    pub fn top_level_dim(&self, name: &str) -> Option<&str> {
        match name {
            "surface" => self.surface.as_deref(),
            "variant" => self.variant.as_deref(),
            "change_id" => self.change_id.as_deref(),
            "arm" => self.arm.as_deref(),
            _ => None,
        }
    }

    /// Fills `out[i]` with the value of `names[i]` from the `dims` object, borrowing where the
    /// JSON had no escapes. No allocation unless a value contains escapes.
    /// Entries kept by the decoder are looked up without parsing again; the raw object is
    /// scanned only when it had more than [`DIMS_KEPT`] entries (or a key with escapes).
    pub fn scan_dims<S: AsRef<str>>(&self, names: &[S], out: &mut [Option<Cow<'a, str>>]) {
        let mut put = |k: &str, v: Cow<'a, str>| {
            if let Some(i) = names.iter().position(|n| n.as_ref() == k) {
                if i < out.len() {
                    out[i] = Some(v);
                }
            }
        };
        if self.dims_all {
            // In order, so the last of duplicate keys wins, as in the scan.
            for (k, v) in &self.dims_kv[..self.dims_len as usize] {
                put(k, v.clone());
            }
        } else if let Some(d) = self.dims {
            // The object was validated in decode_event; a failure here cannot happen.
            let _ = scan_dims_into(d, |k, v| put(&k, v));
        }
    }
}

/// Reads the `dims` object, calling `each(key, value)` for its entries in order; an error if it
/// is not an object of string to string.
fn scan_dims_into<'a, F: FnMut(Cow<'a, str>, Cow<'a, str>)>(
    raw: &'a RawValue,
    each: F,
) -> Result<(), Reject> {
    struct Seed<F> {
        each: F,
    }
    impl<'de, F: FnMut(Cow<'de, str>, Cow<'de, str>)> DeserializeSeed<'de> for Seed<F> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, F: FnMut(Cow<'de, str>, Cow<'de, str>)> Visitor<'de> for Seed<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of string to string")
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            while let Some(k) = map.next_key::<StrOnly<'de>>()? {
                let v: StrOnly<'de> = map.next_value()?;
                (self.each)(k.0, v.0);
            }
            Ok(())
        }
    }
    /// A string borrowed from the input when it has no escapes. (serde's own `Cow<str>`
    /// always copies, which cost several allocations per event.)
    struct StrOnly<'a>(Cow<'a, str>);
    impl<'de> Deserialize<'de> for StrOnly<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = StrOnly<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(StrOnly(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(StrOnly(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(StrOnly(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
                .map_err(|_: D::Error| de::Error::custom("dims values must be strings"))
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Seed { each }
        .deserialize(&mut de)
        .map_err(|e| Reject::new(ErrorCode::InvalidField, format!("`dims`: {e}")))?;
    Ok(())
}

/// Who made a change or a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: String,
    pub name: String,
}

impl Actor {
    pub fn system(name: &str) -> Actor {
        Actor {
            kind: "system".into(),
            name: name.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    Applied,
    RolledBack,
    Superseded,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default)]
    pub surfaces: Vec<String>,
    #[serde(default)]
    pub dims: BTreeMap<String, Vec<String>>,
}

impl Scope {
    pub fn is_everything(&self) -> bool {
        self.surfaces.is_empty() && self.dims.values().all(|v| v.is_empty())
    }
}

/// A change record from the changes topic (contract section 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub change_id: String,
    #[serde(deserialize_with = "de_time", serialize_with = "ser_time")]
    pub ts: i64,
    pub action: ChangeAction,
    pub actor: Actor,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub scope: Option<Scope>,
    #[serde(default)]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub holdout: Option<f64>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub rollback: Option<serde_json::Value>,
    /// Extension: the metric this change is meant to improve (its "local gain"); otherwise
    /// `policy.target_metrics` for its kind.
    #[serde(default)]
    pub target_metric: Option<String>,
    /// Extension: the share of the scope's audience reached from `ts` on, in (0, 1] (a gradual
    /// rollout). An `applied` record carrying it for a change already in force is a rollout
    /// step: the change keeps its first application time.
    #[serde(default)]
    pub rollout: Option<f64>,
}

fn de_time<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let raw: &RawValue = Deserialize::deserialize(d)?;
    parse_time_raw(raw.get()).ok_or_else(|| {
        de::Error::custom(
            "`ts` is neither RFC 3339 nor integer epoch milliseconds (years 0000 to 9999)",
        )
    })
}

fn ser_time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_time(*ms))
}

/// Decodes one change record.
pub fn decode_change(bytes: &[u8], max_bytes: usize) -> Result<Change, Reject> {
    if bytes.len() > max_bytes {
        return Err(Reject::new(
            ErrorCode::TooLarge,
            format!("change is {} bytes, limit {}", bytes.len(), max_bytes),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Reject::new(ErrorCode::InvalidUtf8, format!("not UTF-8: {e}")))?;
    let data = |msg: &str| {
        if msg.starts_with("missing field") {
            ErrorCode::MissingField
        } else if msg.contains("`ts`") {
            ErrorCode::BadTimestamp
        } else {
            ErrorCode::InvalidField
        }
    };
    if !is_object(text) {
        return Err(not_an_object(text, "a change"));
    }
    let c: Change =
        serde_json::from_str(text).map_err(|e| json_reject(text, e, "a change", data))?;
    if c.change_id.is_empty() {
        return Err(Reject::new(ErrorCode::InvalidField, "`change_id` is empty"));
    }
    if let Some(h) = c.holdout {
        if !(0.0..1.0).contains(&h) {
            return Err(Reject::new(
                ErrorCode::InvalidField,
                format!("`holdout` must be in [0, 1), got {h}"),
            ));
        }
    }
    if let Some(r) = c.rollout {
        if !(r > 0.0 && r <= 1.0) {
            return Err(Reject::new(
                ErrorCode::InvalidField,
                format!("`rollout` must be in (0, 1], got {r}"),
            ));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_full_event_borrowing() {
        let b = br#"{"type":"conversion","ts":"2026-11-22T10:00:00Z","id":"e1","user":"u1","surface":"checkout","value":12.5,"dims":{"country":"FR","device":"mobile"},"extra":[1,2]}"#;
        let e = decode_event(b, 4096).unwrap();
        assert_eq!(e.ty, "conversion");
        assert!(matches!(e.ty, Cow::Borrowed(_)));
        assert_eq!(e.ts_ms, 1_795_341_600_000);
        assert_eq!(e.value, Some(12.5));
        let mut out = [None, None, None];
        e.scan_dims(&["device", "missing", "country"], &mut out);
        assert_eq!(out[0].as_deref(), Some("mobile"));
        assert_eq!(out[1], None);
        assert_eq!(out[2].as_deref(), Some("FR"));
    }

    /// Entries kept at decode and the raw scan give the same answers: few or many entries,
    /// duplicates (the last wins), escapes in keys and values.
    #[test]
    fn dims_lookup_matches_the_raw_scan() {
        let cases = [
            r#"{"a":"1","b":"2","a":"3"}"#.to_string(),
            r#"{"a":"x\"y","b\u0031":"2","b1":"z"}"#.to_string(),
            format!(
                "{{{}}}",
                (0..12)
                    .map(|i| format!("\"k{i}\":\"v{i}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        let names = ["a", "b", "b1", "k0", "k7", "k8", "k11", "zz"];
        for dims in &cases {
            let b = format!(r#"{{"type":"t","ts":0,"dims":{dims}}}"#);
            let e = decode_event(b.as_bytes(), 4096).unwrap();
            let mut kept = vec![None; names.len()];
            e.scan_dims(&names, &mut kept);
            let mut raw = vec![None; names.len()];
            scan_dims_into(e.dims.unwrap(), |k, v| {
                if let Some(i) = names.iter().position(|n| *n == k) {
                    raw[i] = Some(v);
                }
            })
            .unwrap();
            assert_eq!(kept, raw, "{dims}");
        }
        let e = decode_event(br#"{"type":"t","ts":0,"dims":{"a":"1","a":"3"}}"#, 4096).unwrap();
        let mut one = [None];
        e.scan_dims(&["a"], &mut one);
        assert_eq!(one[0].as_deref(), Some("3"));
        let e = decode_event(br#"{"type":"t","ts":0,"dims":{"k\u0031":"v"}}"#, 4096).unwrap();
        e.scan_dims(&["k1"], &mut one);
        assert_eq!(one[0].as_deref(), Some("v"));
    }

    #[test]
    fn time_formats() {
        assert_eq!(
            parse_time_raw("\"2026-11-22T11:00:00+01:00\""),
            Some(1_795_341_600_000)
        );
        assert_eq!(parse_time_raw("1795341600000"), Some(1_795_341_600_000));
        assert_eq!(parse_time_raw("\"yesterday\""), None);
        assert_eq!(parse_time_raw("1.5"), None);
        assert_eq!(fmt_time(1_795_341_600_000), "2026-11-22T10:00:00.000Z");
    }

    #[test]
    fn rejects_with_codes() {
        let cases: &[(&[u8], ErrorCode)] = &[
            (b"not json", ErrorCode::InvalidJson),
            (b"{\"ts\":1}", ErrorCode::MissingField),
            (b"{\"type\":\"x\"}", ErrorCode::MissingField),
            (b"{\"type\":\"x\",\"ts\":\"nope\"}", ErrorCode::BadTimestamp),
            (
                b"{\"type\":\"x\",\"ts\":1,\"value\":1e999}",
                ErrorCode::NonFiniteValue,
            ),
            (
                b"{\"type\":\"x\",\"ts\":1,\"value\":\"a\"}",
                ErrorCode::InvalidField,
            ),
            (b"{\"type\":7,\"ts\":1}", ErrorCode::InvalidField),
            (
                b"{\"type\":\"x\",\"ts\":1,\"dims\":{\"a\":1}}",
                ErrorCode::InvalidField,
            ),
            (
                b"{\"type\":\"x\",\"ts\":1,\"dims\":[]}",
                ErrorCode::InvalidField,
            ),
            (
                b"{\"type\":\"x\",\"ts\":1,\"arm\":\"both\"}",
                ErrorCode::InvalidField,
            ),
            (b"{\"type\":\"x\",\"ts\":1,\xff}", ErrorCode::InvalidUtf8),
            (
                b"{\"type\":\"x\",\"ts\":1} trailing",
                ErrorCode::InvalidJson,
            ),
        ];
        for (b, code) in cases {
            let r = decode_event(b, 4096);
            assert_eq!(
                r.as_ref().map_err(|e| e.code).err(),
                Some(*code),
                "{:?} -> {:?}",
                String::from_utf8_lossy(b),
                r.map(|_| ())
            );
        }
        let big = vec![b' '; 5000];
        assert_eq!(
            decode_event(&big, 4096).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn decodes_contract_change() {
        let b = br#"{"change_id": "chg-0042", "ts": "2026-11-22T10:00:00Z", "action": "applied",
 "actor": {"kind": "agent", "name": "copy-optimizer-v3"},
 "kind": "wording", "scope": {"surfaces": ["checkout"], "dims": {"country": ["FR", "BE"]}},
 "tier": "supervised", "holdout": 0.1, "owner": "team-growth",
 "description": "new CTA wording on checkout", "rollback": {"any": "opaque JSON"}}"#;
        let c = decode_change(b, 65536).unwrap();
        assert_eq!(c.change_id, "chg-0042");
        assert_eq!(c.tier, Some(Tier::Supervised));
        assert_eq!(c.scope.unwrap().dims["country"], vec!["FR", "BE"]);
        assert_eq!(
            decode_change(br#"{"change_id":"a","ts":1,"action":"applied"}"#, 100)
                .unwrap_err()
                .code,
            ErrorCode::MissingField
        );
        assert_eq!(
            decode_change(
                br#"{"change_id":"a","ts":"x","action":"applied","actor":{"kind":"human","name":"n"}}"#,
                1000
            )
            .unwrap_err()
            .code,
            ErrorCode::BadTimestamp
        );
    }

    fn code_of(b: &[u8]) -> Option<ErrorCode> {
        decode_event(b, 65536).err().map(|e| e.code)
    }

    // Fuzzing (fuzz/fuzz_targets/decode_event.rs, decode_change.rs) found that a JSON array was
    // read as an event or a change, its elements taken as the fields in declaration order.
    #[test]
    fn regression_non_objects_are_not_events_or_changes() {
        let arr = br#"["session",1795341600000,"e1",null,"checkout",null,null,null,3.5,null,{"country":"FR"}]"#;
        let e = decode_event(arr, 65536).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert!(
            e.message.contains("JSON object, got an array"),
            "{}",
            e.message
        );
        for b in [&b"1"[..], b"\"s\"", b"null", b"true", b" \n[]", b""] {
            assert_eq!(code_of(b), Some(ErrorCode::InvalidJson), "{:?}", b);
        }
        let c = decode_change(br#"["c1",1795341600000,"applied",["agent","x"]]"#, 4096);
        assert_eq!(c.unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(
            decode_change(b"42", 4096).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        // Leading JSON whitespace before the object is still an object.
        assert!(decode_event(b" \t\r\n{\"type\":\"x\",\"ts\":1}", 4096).is_ok());
    }

    // Fuzzing found times no RFC 3339 string can carry (year 3,170,843 from `ts: 1e17`, or
    // i64::MIN, the engine's "partition not heard from yet" marker) accepted as event times.
    #[test]
    fn regression_times_outside_rfc3339_are_bad_timestamps() {
        for ts in [
            "100000000000000000",
            "9223372036854775807",
            "-9223372036854775808",
            "-62167219200001",
            "253402300800000",
            "1e17",
            "\"0000-01-01T00:00:00+01:00\"",
        ] {
            let b = format!(r#"{{"type":"x","ts":{ts}}}"#);
            assert_eq!(code_of(b.as_bytes()), Some(ErrorCode::BadTimestamp), "{ts}");
        }
        for (ts, want) in [
            ("-62167219200000", MIN_TIME_MS),
            ("253402300799999", MAX_TIME_MS),
            ("\"0000-01-01T00:00:00Z\"", MIN_TIME_MS),
            ("\"9999-12-31T23:59:59.999Z\"", MAX_TIME_MS),
            ("\"0000-01-01T00:00:00-01:00\"", MIN_TIME_MS + 3_600_000),
        ] {
            let b = format!(r#"{{"type":"x","ts":{ts}}}"#);
            assert_eq!(
                decode_event(b.as_bytes(), 4096).unwrap().ts_ms,
                want,
                "{ts}"
            );
        }
        for t in [MIN_TIME_MS, MAX_TIME_MS] {
            assert_eq!(parse_time_str(&fmt_time(t)), Some(t));
        }
        let c = decode_change(
            br#"{"change_id":"a","ts":100000000000000000,"action":"applied","actor":{"kind":"human","name":"n"}}"#,
            4096,
        );
        assert_eq!(c.unwrap_err().code, ErrorCode::BadTimestamp);
    }

    // Fuzzing found malformed JSON reported as a field problem (`invalid_field`,
    // `missing_field`, `bad_timestamp`) when typed decoding failed before the syntax error.
    #[test]
    fn regression_malformed_json_is_invalid_json_whatever_came_first() {
        let events: &[&[u8]] = &[
            b"0(",
            b"[[",
            b"{\"type\":\"sdssion\",\"ts\":12000.799,\"ts\":12000.79999\x0e\x08}",
            b"{\"type\":\"a\",\"type\":\"b\",",
            b"{\"type\":7,",
            b"{\"type\":\"x\",\"ts\":1,\"dims\":{\"a\":1},",
            // A number converted (and overflowing) before the end of a truncated text.
            b"{\"type\":   5e341604",
        ];
        for b in events {
            assert_eq!(
                code_of(b),
                Some(ErrorCode::InvalidJson),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        let changes: &[&[u8]] = &[
            br#"{"change_id": "chg-0042", "ts": "2026-11-22T10:00:0{"c0"#,
            b"{\t\t\n\t\t\n\t\t}\t\t\x00\x04ct!og\ts;",
            br#"{"change_id":"a","ts":1,"action":"appled","actor":{"kind":"h","name":"n"}"#,
            br#"{"actor":{"name":"x"},"#,
        ];
        for b in changes {
            assert_eq!(
                decode_change(b, 4096).unwrap_err().code,
                ErrorCode::InvalidJson,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // A lone surrogate escape is JSON, but no string: where a string is read (a key, a
        // field) that is a field problem; in a field nobody reads it is ignored with the rest.
        assert_eq!(
            code_of(br#"{"\uddddvts":7.7}"#),
            Some(ErrorCode::InvalidField)
        );
        assert_eq!(
            code_of(br#"{"type":"\udddd","ts":1}"#),
            Some(ErrorCode::InvalidField)
        );
        assert!(decode_event(br#"{"type":"x","ts":1,"extra":"\udddd"}"#, 4096).is_ok());
        // Well-formed JSON keeps its precise code; an overflowing number where a string belongs
        // is still an overflow.
        assert_eq!(
            code_of(br#"{"type":5e341604,"ts":1}"#),
            Some(ErrorCode::NonFiniteValue)
        );
        assert_eq!(
            code_of(br#"{"type":"a","type":"b","ts":1}"#),
            Some(ErrorCode::InvalidField)
        );
        // Fuzzing found this one reported as invalid_json: serde_json calls a number where an
        // enum belongs a syntax error ("expected value").
        let e = decode_change(
            b"\n{\"change_s\":1,\"action\":1,\"action\":\"applied\"}",
            4096,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField, "{}", e.message);
        let deep = format!(
            r#"{{"change_id":"a","ts":1,"action":"applied","actor":{{"kind":"h","name":"n"}},"rollback":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            decode_change(deep.as_bytes(), 4096).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        assert_eq!(
            decode_change(
                br#"{"change_id":"a","ts":"x","action":"applied","actor":{"kind":"h","name":"n"}}"#,
                4096
            )
            .unwrap_err()
            .code,
            ErrorCode::BadTimestamp
        );
    }

    #[test]
    fn non_finite_values_in_every_spelling() {
        for v in [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e999",
            "-1e999",
            " NaN ",
            "\n NaN",
        ] {
            for b in [
                format!(r#"{{"type":"x","ts":1,"value":{v}}}"#),
                format!("{{\n  \"type\": \"x\",\n  \"value\": {v},\n  \"ts\": 1\n}}"),
            ] {
                let e = decode_event(b.as_bytes(), 4096).unwrap_err();
                assert_eq!(e.code, ErrorCode::NonFiniteValue, "{b}: {}", e.message);
            }
        }
        // Strings are not numbers, whatever they say; other bare words are not JSON.
        for (v, code) in [
            ("\"NaN\"", ErrorCode::InvalidField),
            ("\"12.5\"", ErrorCode::InvalidField),
            ("nan", ErrorCode::InvalidJson),
            ("Nope", ErrorCode::InvalidJson),
            ("inf", ErrorCode::InvalidJson),
        ] {
            let b = format!(r#"{{"type":"x","ts":1,"value":{v}}}"#);
            assert_eq!(code_of(b.as_bytes()), Some(code), "{v}");
        }
        // The string "NaN" elsewhere is just a string.
        assert!(decode_event(br#"{"type":"NaN","ts":1,"surface":"Infinity"}"#, 4096).is_ok());
        let actor = r#""actor":{"kind":"agent","name":"a"}"#;
        for v in ["NaN", "-Infinity", "1e999"] {
            let b =
                format!(r#"{{"change_id":"c","ts":1,"action":"applied",{actor},"holdout":{v}}}"#);
            assert_eq!(
                decode_change(b.as_bytes(), 4096).unwrap_err().code,
                ErrorCode::NonFiniteValue,
                "{v}"
            );
        }
    }
}
