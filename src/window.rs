//! Tumbling event-time windows.
//!
//! A series keeps a small ring of open windows (as many as the allowed lateness spans, plus
//! one), indexed by window number; a window closes when the watermark passes its end. Distinct
//! counts use a HyperLogLog sketch per open window, fed with a keyed hash of the user id, so the
//! raw id is never stored.

use crate::baseline::Obs;

/// Aggregate of one open window.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agg {
    /// Window index (start / width); `i64::MIN` when the slot is free.
    pub w: i64,
    pub num: f64,
    pub den: f64,
    pub sumsq: f64,
    /// Largest and smallest value added (`gauge` metrics' row extremes, `extreme.rs`);
    /// -inf / +inf when none was (stage 2 merges them from the partial sums).
    pub max: f32,
    pub min: f32,
}

impl Agg {
    pub const EMPTY: Agg = Agg {
        w: i64::MIN,
        num: 0.0,
        den: 0.0,
        sumsq: 0.0,
        max: f32::NEG_INFINITY,
        min: f32::INFINITY,
    };

    /// Adds one value to the row extremes.
    #[inline]
    pub fn extremes(&mut self, v: f64) {
        let v = v as f32;
        self.max = self.max.max(v);
        self.min = self.min.min(v);
    }

    pub fn obs(&self) -> Obs {
        Obs {
            num: self.num,
            den: self.den,
            sumsq: self.sumsq,
        }
    }
}

/// Ring of open windows of one series.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

    /// The slot for window `w`. Closed windows are taken out, so an occupied slot holds a
    /// window that is still open: when input partitions run apart in event time more windows
    /// are open than the lateness alone implies, and the ring grows (rarely, and only then
    /// allocates) instead of overwriting one.
    #[inline]
    pub fn slot(&mut self, w: i64) -> &mut Agg {
        let mut i = self.slot_index(w);
        if self.slots[i].w != w {
            if self.slots[i].w != i64::MIN {
                self.grow(w);
                i = self.slot_index(w);
            }
            if self.slots[i].w != w {
                self.slots[i] = Agg { w, ..Agg::EMPTY };
                if let Some(s) = self.sketches.as_mut() {
                    s[i].clear();
                }
            }
        }
        &mut self.slots[i]
    }

    /// Number of slots (open windows it can hold without growing).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn grow(&mut self, w: i64) {
        let mut n = self.slots.len() * 2;
        loop {
            // Every open window, and `w`, must land in distinct slots.
            let mut used = vec![false; n];
            let ok = self
                .slots
                .iter()
                .filter(|a| a.w != i64::MIN)
                .map(|a| a.w)
                .chain(std::iter::once(w))
                .all(|x| !std::mem::replace(&mut used[x.rem_euclid(n as i64) as usize], true));
            if ok {
                break;
            }
            n *= 2;
        }
        let mut slots = vec![Agg::EMPTY; n].into_boxed_slice();
        let mut sketches = self
            .sketches
            .as_ref()
            .map(|_| vec![Hll::default(); n].into_boxed_slice());
        for (j, a) in self.slots.iter().enumerate() {
            if a.w == i64::MIN {
                continue;
            }
            let k = a.w.rem_euclid(n as i64) as usize;
            slots[k] = *a;
            if let (Some(new), Some(old)) = (sketches.as_mut(), self.sketches.as_ref()) {
                new[k] = old[j].clone();
            }
        }
        self.slots = slots;
        self.sketches = sketches;
    }

    #[inline]
    pub fn add_user(&mut self, w: i64, hash: u64) {
        self.slot(w);
        let i = self.slot_index(w);
        if let Some(s) = self.sketches.as_mut() {
            s[i].add(hash);
        }
    }

    /// Takes every open window out of the ring, with its distinct-count sketch (stage 1 of the
    /// two-stage aggregation hands its partial sums on and keeps nothing).
    pub fn take_open(&mut self, mut f: impl FnMut(Agg, Option<&Hll>)) {
        for i in 0..self.slots.len() {
            if self.slots[i].w == i64::MIN {
                continue;
            }
            f(self.slots[i], self.sketches.as_ref().map(|s| &s[i]));
            self.slots[i] = Agg::EMPTY;
            if let Some(s) = self.sketches.as_mut() {
                s[i].clear();
            }
        }
    }

    /// Adds partial sums (and a sketch's registers) to window `w`.
    pub fn merge(
        &mut self,
        w: i64,
        num: f64,
        den: f64,
        sumsq: f64,
        extremes: Option<(f32, f32)>,
        regs: Option<&[u8]>,
    ) {
        let a = self.slot(w);
        a.num += num;
        a.den += den;
        a.sumsq += sumsq;
        if let Some((max, min)) = extremes {
            a.max = a.max.max(max);
            a.min = a.min.min(min);
        }
        let i = self.slot_index(w);
        if let (Some(s), Some(r)) = (self.sketches.as_mut(), regs) {
            s[i].merge(r);
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
/// Registers of a distinct-count sketch.
pub const HLL_REGISTERS: usize = HLL_M;

/// HyperLogLog with 1024 registers (standard error ~3.3%), with linear counting for small
/// cardinalities.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Hll {
    #[serde(with = "crate::checkpoint::boxed_array")]
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

    /// The registers, or none while empty.
    pub fn registers(&self) -> Option<&[u8]> {
        (!self.empty).then_some(&self.regs[..])
    }

    /// Union with another sketch's registers (register-wise maximum); ignores a wrong size.
    pub fn merge(&mut self, regs: &[u8]) {
        if regs.len() != HLL_M {
            return;
        }
        for (a, b) in self.regs.iter_mut().zip(regs) {
            *a = (*a).max(*b);
        }
        if regs.iter().any(|&r| r > 0) {
            self.empty = false;
        }
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
        // Window 13 shares slot with 10 (taken, so free); 11 stays.
        r.slot(13).num = 7.0;
        assert_eq!(r.take(11).0.num, 2.0);
        assert_eq!(r.take(13).0.num, 7.0);
    }

    #[test]
    fn a_window_keeps_its_row_extremes_until_taken() {
        let mut r = Ring::new(2, false);
        for v in [3.0, -1.5, 7.25, 2.0] {
            r.slot(4).extremes(v);
        }
        let (a, _) = r.take(4);
        assert_eq!((a.max, a.min), (7.25, -1.5));
        // A recycled slot starts empty again.
        let (a, _) = r.take(6);
        assert_eq!((a.max, a.min), (f32::NEG_INFINITY, f32::INFINITY));
    }

    #[test]
    fn ring_grows_instead_of_overwriting_open_windows() {
        let mut r = Ring::new(2, true);
        for w in 0..9 {
            r.slot(w).num += w as f64;
            r.add_user(w, (w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        assert!(r.capacity() >= 9);
        for w in 0..9 {
            let (a, d) = r.take(w);
            assert_eq!(a.num, w as f64);
            assert!(d.unwrap() >= 0.5);
        }
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
