//! Tumbling event-time windows.
//!
//! A series keeps a small ring of open windows (as many as the allowed lateness spans, plus
//! one), indexed by window number; a window closes when the watermark passes its end. Distinct
//! counts use a HyperLogLog sketch per open window, fed with a keyed hash of the user id, so the
//! raw id is never stored.

use crate::baseline::Obs;

/// Aggregate of one open window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Agg {
    /// Window index (start / width); `i64::MIN` when the slot is free.
    pub w: i64,
    pub num: f64,
    pub den: f64,
    pub sumsq: f64,
}

impl Agg {
    pub const EMPTY: Agg = Agg {
        w: i64::MIN,
        num: 0.0,
        den: 0.0,
        sumsq: 0.0,
    };

    pub fn obs(&self) -> Obs {
        Obs {
            num: self.num,
            den: self.den,
            sumsq: self.sumsq,
        }
    }
}

/// Ring of open windows of one series.
#[derive(Debug, Clone)]
pub struct Ring {
    slots: Box<[Agg]>,
    sketches: Option<Box<[Hll]>>,
}

impl Ring {
    /// `slots` must exceed the number of windows the lateness can keep open.
    pub fn new(slots: usize, distinct: bool) -> Ring {
        Ring {
            slots: vec![Agg::EMPTY; slots].into_boxed_slice(),
            sketches: distinct.then(|| vec![Hll::default(); slots].into_boxed_slice()),
        }
    }

    fn slot_index(&self, w: i64) -> usize {
        w.rem_euclid(self.slots.len() as i64) as usize
    }

    /// The slot for window `w`, recycling it if it held an older (already closed) window.
    #[inline]
    pub fn slot(&mut self, w: i64) -> &mut Agg {
        let i = self.slot_index(w);
        if self.slots[i].w != w {
            self.slots[i] = Agg { w, ..Agg::EMPTY };
            if let Some(s) = self.sketches.as_mut() {
                s[i].clear();
            }
        }
        &mut self.slots[i]
    }

    #[inline]
    pub fn add_user(&mut self, w: i64, hash: u64) {
        self.slot(w);
        let i = self.slot_index(w);
        if let Some(s) = self.sketches.as_mut() {
            s[i].add(hash);
        }
    }

    /// Takes window `w` out of the ring (zeros if nothing arrived in it).
    pub fn take(&mut self, w: i64) -> (Agg, Option<f64>) {
        let i = self.slot_index(w);
        if self.slots[i].w == w {
            let a = self.slots[i];
            self.slots[i] = Agg::EMPTY;
            let d = self.sketches.as_mut().map(|s| {
                let e = s[i].estimate();
                s[i].clear();
                e
            });
            (a, d)
        } else {
            (Agg { w, ..Agg::EMPTY }, self.sketches.as_ref().map(|_| 0.0))
        }
    }
}

const HLL_P: u32 = 10;
const HLL_M: usize = 1 << HLL_P;

/// HyperLogLog with 1024 registers (standard error ~3.3%), with linear counting for small
/// cardinalities.
#[derive(Clone)]
pub struct Hll {
    regs: Box<[u8; HLL_M]>,
    empty: bool,
}

impl Default for Hll {
    fn default() -> Self {
        Hll {
            regs: Box::new([0u8; HLL_M]),
            empty: true,
        }
    }
}

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hll(~{:.0})", self.estimate())
    }
}

impl Hll {
    pub fn clear(&mut self) {
        if !self.empty {
            self.regs.fill(0);
            self.empty = true;
        }
    }

    #[inline]
    pub fn add(&mut self, hash: u64) {
        let idx = (hash >> (64 - HLL_P)) as usize;
        let rest = (hash << HLL_P) | (1 << (HLL_P - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if rank > self.regs[idx] {
            self.regs[idx] = rank;
        }
        self.empty = false;
    }

    pub fn estimate(&self) -> f64 {
        if self.empty {
            return 0.0;
        }
        let m = HLL_M as f64;
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for &r in self.regs.iter() {
            sum += 1.0 / (1u64 << r) as f64;
            if r == 0 {
                zeros += 1;
            }
        }
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siphasher::sip::SipHasher13;
    use std::hash::Hasher;

    #[test]
    fn ring_recycles_and_takes() {
        let mut r = Ring::new(3, false);
        r.slot(10).num += 1.0;
        r.slot(11).num += 2.0;
        r.slot(10).den += 5.0;
        let (a, _) = r.take(10);
        assert_eq!((a.num, a.den), (1.0, 5.0));
        let (a, _) = r.take(10);
        assert_eq!(a.num, 0.0);
        // Window 13 shares slot with 10; 11 stays.
        r.slot(13).num = 7.0;
        assert_eq!(r.take(11).0.num, 2.0);
        assert_eq!(r.take(13).0.num, 7.0);
    }

    #[test]
    fn hll_estimates_within_10_percent() {
        for &n in &[10u64, 100, 1000, 20_000] {
            let mut h = Hll::default();
            for i in 0..n {
                let mut s = SipHasher13::new_with_keys(1, 2);
                s.write_u64(i);
                let v = s.finish();
                h.add(v);
                h.add(v);
            }
            let e = h.estimate();
            assert!((e - n as f64).abs() <= 0.1 * n as f64 + 1.0, "{n}: {e}");
        }
    }
}
