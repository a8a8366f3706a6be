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

/// Parses a contract time: RFC 3339 (any offset) or integer milliseconds since the epoch.
pub fn parse_time_str(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
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
        return Some(v);
    }
    // Integer-valued floats (`1.7e12`) are accepted; fractional milliseconds are not a time.
    let f: f64 = raw.parse().ok()?;
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 {
        Some(f as i64)
    } else {
        None
    }
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
}

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
    let raw: RawEvent<'_> = serde_json::from_str(text).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidField,
            _ => ErrorCode::InvalidJson,
        };
        Reject::new(code, e.to_string())
    })?;
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
                "`ts` {} is neither RFC 3339 nor integer epoch milliseconds",
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
    let ev = Event {
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
    };
    if let Some(d) = ev.dims {
        // Validate the dims object once, so metrics can scan it later without error paths.
        let mut sink = [None, None, None, None];
        scan_dims_into(d, &[], &mut sink)?;
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
    pub fn scan_dims(&self, names: &[&str], out: &mut [Option<Cow<'a, str>>]) {
        if let Some(d) = self.dims {
            // The object was validated in decode_event; a failure here cannot happen.
            let _ = scan_dims_into(d, names, out);
        }
    }
}

fn scan_dims_into<'a>(
    raw: &'a RawValue,
    names: &[&str],
    out: &mut [Option<Cow<'a, str>>],
) -> Result<(), Reject> {
    struct Seed<'n, 'o, 'a> {
        names: &'n [&'n str],
        out: &'o mut [Option<Cow<'a, str>>],
    }
    impl<'de: 'a, 'a> DeserializeSeed<'de> for Seed<'_, '_, 'a> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de: 'a, 'a> Visitor<'de> for Seed<'_, '_, 'a> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of string to string")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                let v: StrOnly<'de> = map.next_value()?;
                if let Some(i) = self.names.iter().position(|n| *n == k) {
                    if i < self.out.len() {
                        self.out[i] = Some(v.0);
                    }
                }
            }
            Ok(())
        }
    }
    struct StrOnly<'a>(Cow<'a, str>);
    impl<'de> Deserialize<'de> for StrOnly<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            match Cow::<'de, str>::deserialize(d) {
                Ok(c) => Ok(StrOnly(c)),
                Err(_) => Err(de::Error::custom("dims values must be strings")),
            }
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Seed { names, out }
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
}

fn de_time<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let raw: &RawValue = Deserialize::deserialize(d)?;
    parse_time_raw(raw.get())
        .ok_or_else(|| de::Error::custom("`ts` is neither RFC 3339 nor integer epoch milliseconds"))
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
    let c: Change = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let code = match e.classify() {
            serde_json::error::Category::Data if msg.starts_with("missing field") => {
                ErrorCode::MissingField
            }
            serde_json::error::Category::Data if msg.contains("`ts`") => ErrorCode::BadTimestamp,
            serde_json::error::Category::Data => ErrorCode::InvalidField,
            _ => ErrorCode::InvalidJson,
        };
        Reject::new(code, msg)
    })?;
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
}
