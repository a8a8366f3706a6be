//! A cheap hasher for the engine's per-event maps.
//!
//! The series index, the share index and the dedup sets are keyed by SipHash outputs already, so
//! hashing them again with SipHash (std's default) costs a second full SipHash per lookup for
//! nothing. A pass-through would do for random keys, but the series key is a public constant, so
//! anyone could craft dims values whose keys collide in the low bits and make the index
//! quadratic. A folded 64 x 64 -> 128-bit multiply with a per-process random seed costs one
//! multiplication and keeps the keys the table sees unpredictable. The same hasher reads short
//! strings (event types) eight bytes at a time; those maps are built from the configuration, not
//! from input.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Builds [`FastHasher`]s with a seed drawn once per map from std's random keys.
#[derive(Clone, Copy, Debug)]
pub struct FastState {
    seed: u64,
}

impl Default for FastState {
    fn default() -> Self {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        FastState { seed: seed | 1 }
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;
    #[inline]
    fn build_hasher(&self) -> FastHasher {
        FastHasher { h: self.seed }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct FastHasher {
    h: u64,
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.h
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.h = fold(self.h ^ x, K);
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    #[inline]
    fn write_u8(&mut self, x: u8) {
        self.write_u64(x as u64);
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }
}

/// A map keyed by an already keyed 64-bit hash.
pub type KeyMap<V> = HashMap<u64, V, FastState>;
/// A set of already keyed 64-bit hashes.
pub type KeySet = HashSet<u64, FastState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_work_and_strings_differ() {
        let mut m: KeyMap<usize> = KeyMap::default();
        for i in 0..10_000u64 {
            m.insert(i.wrapping_mul(K), i as usize);
        }
        for i in 0..10_000u64 {
            assert_eq!(m.get(&i.wrapping_mul(K)), Some(&(i as usize)));
        }
        let s = FastState::default();
        let h = |x: &str| s.hash_one(x);
        assert_ne!(h("session"), h("sessio"));
        assert_ne!(h("session"), h("session\0"));
        assert_eq!(h("conversion"), h("conversion"));
        let mut r: HashMap<String, u8, FastState> = HashMap::default();
        r.insert("session".into(), 1);
        assert_eq!(r.get("session"), Some(&1));
        assert_eq!(r.get("sessions"), None);
    }
}
