//! HyperLogLog distinct counting with Ertl's improved estimator ("New cardinality
//! estimation algorithms for HyperLogLog sketches", 2017).
//!
//! 2^10 one-byte registers: 1 KiB per sketch whatever the number of users, a standard error
//! of 1.04 / √1024 ≈ 3.25 % (so 99.7 % of estimates fall within ±9.75 %), and a merge that is
//! a register-wise max, which is what lets per-minute sketches combine into any window.
//! Ertl's estimator needs no empirical bias tables and stays unbiased from 0 to billions.
//! Registers are allocated on the first insert, so an idle slot costs nothing.

/// Bits of the hash that choose a register.
pub const PRECISION: u32 = 10;
const REGISTERS: usize = 1 << PRECISION;
/// The most a register can hold: the leading zeros of the remaining bits, plus one.
const MAX_RANK: usize = (64 - PRECISION) as usize + 1;
/// The relative standard error of an estimate.
pub const STANDARD_ERROR: f64 = 0.0325;

/// A distinct counter over 64-bit hashes.
#[derive(Clone, Debug, Default)]
pub struct HyperLogLog {
    registers: Vec<u8>,
}

impl HyperLogLog {
    /// Hashes `item` (xxh3, which spreads short ids well) and records it.
    #[inline]
    pub fn insert(&mut self, item: &[u8]) {
        self.insert_hash(xxhash_rust::xxh3::xxh3_64(item));
    }

    /// Records an already-hashed item.
    #[inline]
    pub fn insert_hash(&mut self, hash: u64) {
        if self.registers.is_empty() {
            self.registers = vec![0; REGISTERS];
        }
        let index = (hash >> (64 - PRECISION)) as usize;
        // The guard bit caps the rank at MAX_RANK when the remaining bits are all zero.
        let rest = (hash << PRECISION) | (1 << (PRECISION - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        let register = &mut self.registers[index];
        if rank > *register {
            *register = rank;
        }
    }

    /// Folds `other` into this sketch: afterwards it counts the union.
    pub fn merge(&mut self, other: &Self) {
        if other.registers.is_empty() {
            return;
        }
        if self.registers.is_empty() {
            self.registers.clone_from(&other.registers);
            return;
        }
        for (mine, theirs) in self.registers.iter_mut().zip(&other.registers) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// The estimated number of distinct items.
    pub fn estimate(&self) -> u64 {
        if self.registers.is_empty() {
            return 0;
        }
        // Most registers hold one of a few values, so a single histogram makes every increment
        // wait for the previous one to the same counter; four interleaved ones break that chain
        // (bench get_aggregates/60_minutes_1000_types, where this function was 29 % of the time).
        let mut partial = [[0u32; MAX_RANK + 1]; 4];
        for registers in self.registers.chunks_exact(4) {
            for (lane, &register) in registers.iter().enumerate() {
                partial[lane][register as usize] += 1;
            }
        }
        let mut histogram = [0u32; MAX_RANK + 1];
        for (k, count) in histogram.iter_mut().enumerate() {
            *count = partial.iter().map(|lane| lane[k]).sum();
        }
        let m = REGISTERS as f64;
        let q = MAX_RANK - 1;
        let mut z = m * tau((m - f64::from(histogram[q + 1])) / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + f64::from(histogram[k]));
        }
        z += m * sigma(f64::from(histogram[0]) / m);
        let alpha_infinity = 0.5 / std::f64::consts::LN_2;
        (alpha_infinity * m * m / z).round() as u64
    }

    /// Forgets every item but keeps the registers, for reusing a ring slot.
    pub fn clear(&mut self) {
        self.registers.fill(0);
    }

    /// Forgets every item and frees the registers.
    pub fn release(&mut self) {
        self.registers = Vec::new();
    }

    /// Heap memory held.
    pub fn heap_bytes(&self) -> usize {
        self.registers.capacity()
    }
}

fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let previous = z;
        z += x * y;
        y += y;
        if z == previous {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let previous = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == previous {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(estimate: u64, truth: u64) -> f64 {
        (estimate as f64 - truth as f64).abs() / truth as f64
    }

    #[test]
    fn estimates_stay_within_three_standard_errors_from_ten_to_a_million() {
        for truth in [10u64, 100, 1_000, 2_500, 10_000, 100_000, 1_000_000] {
            let mut sketch = HyperLogLog::default();
            for user in 0..truth {
                sketch.insert(format!("user-{user}").as_bytes());
                sketch.insert(format!("user-{user}").as_bytes()); // repeats change nothing
            }
            let error = relative_error(sketch.estimate(), truth);
            assert!(
                error <= 3.0 * STANDARD_ERROR,
                "{truth} users: estimate {} ({error:.4})",
                sketch.estimate()
            );
        }
    }

    #[test]
    fn mean_error_over_many_sketches_matches_the_documented_standard_error() {
        let truth = 20_000u64;
        let mut squared = 0.0;
        let trials = 40;
        for trial in 0..trials {
            let mut sketch = HyperLogLog::default();
            for user in 0..truth {
                sketch.insert(format!("t{trial}-u{user}").as_bytes());
            }
            squared += relative_error(sketch.estimate(), truth).powi(2);
        }
        let rms = (squared / f64::from(trials)).sqrt();
        assert!(
            rms < 1.3 * STANDARD_ERROR,
            "rms error {rms:.4} vs documented {STANDARD_ERROR}"
        );
    }

    #[test]
    fn merge_counts_the_union_not_the_sum() {
        let mut monday = HyperLogLog::default();
        let mut tuesday = HyperLogLog::default();
        for user in 0..30_000 {
            monday.insert(format!("u{user}").as_bytes());
        }
        for user in 15_000..45_000 {
            tuesday.insert(format!("u{user}").as_bytes());
        }
        monday.merge(&tuesday);
        assert!(relative_error(monday.estimate(), 45_000) <= 3.0 * STANDARD_ERROR);
    }

    #[test]
    fn empty_and_cleared_sketches_count_zero_and_cost_nothing() {
        let mut sketch = HyperLogLog::default();
        assert_eq!(sketch.estimate(), 0);
        assert_eq!(sketch.heap_bytes(), 0);
        sketch.insert(b"someone");
        assert_eq!(sketch.estimate(), 1);
        assert_eq!(sketch.heap_bytes(), 1024);
        sketch.clear();
        assert_eq!(sketch.estimate(), 0);
    }
}
