//! Invariants shared by the decoder targets: what a rejection must say, and what an accepted
//! input must be.

use guardrail::event::{ErrorCode, Reject};
use serde::de::IgnoredAny;

fn starts_as_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

/// A rejection of `data` (with the size limit `max`): a message, and a code that agrees with
/// what is wrong. Checked in the decoders' order: size, then UTF-8, then the rest, where
/// `decoder_code` says which codes the decoder may give. Whatever is not JSON at all is
/// invalid_json (non_finite_value for a NaN or Infinity literal), however far typed decoding
/// got; JSON that is not an object is invalid_json; only a readable object can have a field
/// problem.
pub fn check_rejection(data: &[u8], max: usize, rej: &Reject, decoder_code: fn(ErrorCode) -> bool) {
    assert!(!rej.message.is_empty(), "{:?} without a message", rej.code);
    if data.len() > max {
        assert_eq!(rej.code, ErrorCode::TooLarge);
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        assert_eq!(rej.code, ErrorCode::InvalidUtf8);
        return;
    };
    assert!(
        decoder_code(rej.code),
        "decoder gave {:?}: {}",
        rej.code,
        rej.message
    );
    match serde_json::from_str::<IgnoredAny>(text) {
        Err(_) if rej.code == ErrorCode::NonFiniteValue => assert!(
            text.contains("NaN") || text.contains("Infinity"),
            "{}",
            rej.message
        ),
        Err(_) => assert_eq!(rej.code, ErrorCode::InvalidJson, "{}", rej.message),
        Ok(_) if !starts_as_object(text) => {
            assert_eq!(rej.code, ErrorCode::InvalidJson, "{}", rej.message)
        }
        // JSON whose numbers overflow (1e999) is non_finite_value. invalid_json for an object
        // that passes the lenient syntax check only where serde_json cannot read it as a tree
        // either (a lone surrogate escape in a string it decodes, nesting beyond 128 levels).
        Ok(_) if rej.code == ErrorCode::InvalidJson => assert!(
            serde_json::from_str::<serde_json::Value>(text).is_err(),
            "{}",
            rej.message
        ),
        Ok(_) => {}
    }
}

/// An accepted input is UTF-8 JSON (whose ignored fields may hold numbers or strings that
/// serde_json's tree cannot hold: 1e999, a lone surrogate) and an object. Returns its text.
pub fn check_accepted(data: &[u8], max: usize) -> &str {
    assert!(data.len() <= max);
    let text = std::str::from_utf8(data).expect("accepted input is UTF-8");
    serde_json::from_str::<IgnoredAny>(text).expect("accepted input is JSON");
    assert!(starts_as_object(text), "accepted from {text}");
    text
}
