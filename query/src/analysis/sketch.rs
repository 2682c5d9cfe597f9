//! A mergeable latency sketch with at most 1% relative error (DDSketch's log-bucket
//! mapping, as in the DataDog paper and OpenTelemetry's exponential histogram family).
//!
//! A positive value `v` falls in bucket `k = ceil(ln v / ln γ)` with `γ = (1+α)/(1-α)`,
//! `α = 0.01`; the bucket's representative `2γ^k/(γ+1)` is within α of every value in it.
//! Sketches merge by adding counts per bucket, so per-minute rollups combine into any
//! range. Quantiles use the same linear interpolation between ranks as the exact path
//! (`percentile_cont`): the two neighbouring ranks are each estimated within 1%, so their
//! interpolation is too.

use std::collections::BTreeMap;

/// Relative accuracy.
pub const ALPHA: f64 = 0.01;

pub fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// The bucket of a value (values below 1 share bucket 0: latencies are in nanoseconds).
pub fn key(v: f64) -> i32 {
    if v <= 1.0 {
        0
    } else {
        (v.ln() / gamma().ln()).ceil() as i32
    }
}

/// The SQL expression of [`key`] for DataFusion, so bucketing runs vectorised.
pub fn key_sql(expr: &str) -> String {
    format!(
        "CAST(CASE WHEN {expr} <= 1 THEN 0 ELSE ceil(ln(CAST({expr} AS DOUBLE)) / {}) END AS INT)",
        gamma().ln()
    )
}

fn value(k: i32) -> f64 {
    if k == 0 {
        1.0
    } else {
        2.0 * gamma().powi(k) / (gamma() + 1.0)
    }
}

/// Counts per bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    buckets: BTreeMap<i32, u64>,
    count: u64,
}

impl Sketch {
    pub fn add(&mut self, v: f64) {
        self.add_bucket(key(v), 1);
    }

    pub fn add_bucket(&mut self, k: i32, n: u64) {
        *self.buckets.entry(k).or_default() += n;
        self.count += n;
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (k, n) in &other.buckets {
            self.add_bucket(*k, *n);
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// (keys, counts) for storage.
    pub fn parts(&self) -> (Vec<i32>, Vec<i64>) {
        self.buckets
            .iter()
            .map(|(k, n)| (*k, i64::try_from(*n).unwrap_or(i64::MAX)))
            .unzip()
    }

    pub fn from_parts(keys: &[i64], counts: &[i64]) -> Sketch {
        let mut s = Sketch::default();
        for (k, n) in keys.iter().zip(counts) {
            s.add_bucket(*k as i32, u64::try_from(*n).unwrap_or(0));
        }
        s
    }

    /// The value at 0-based rank `r` (the `r`-th smallest).
    fn at_rank(&self, r: u64) -> f64 {
        let mut seen = 0;
        for (k, n) in &self.buckets {
            seen += n;
            if seen > r {
                return value(*k);
            }
        }
        self.buckets
            .keys()
            .next_back()
            .map(|k| value(*k))
            .unwrap_or(0.0)
    }

    /// The `q` quantile (0..=1) with linear interpolation between ranks.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * (self.count - 1) as f64;
        let (lo, hi) = (rank.floor() as u64, rank.ceil() as u64);
        let (a, b) = (self.at_rank(lo), self.at_rank(hi));
        a + (b - a) * (rank - lo as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &mut [f64], q: f64) -> f64 {
        values.sort_by(f64::total_cmp);
        let rank = q * (values.len() - 1) as f64;
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        values[lo] + (values[hi] - values[lo]) * (rank - lo as f64)
    }

    #[test]
    fn within_one_percent_of_exact_interpolated_percentiles() {
        let mut x: u64 = 42;
        let mut values = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // log-uniform between 100 µs and 10 s, in ns
            let v =
                (1e5f64.ln() + (x % 1_000_000) as f64 / 1e6 * (1e10f64.ln() - 1e5f64.ln())).exp();
            values.push(v.round());
        }
        let mut a = Sketch::default();
        let mut b = Sketch::default();
        for (i, v) in values.iter().enumerate() {
            if i % 3 == 0 { a.add(*v) } else { b.add(*v) }
        }
        a.merge(&b); // merged per-minute sketches behave as one
        assert_eq!(a.count(), values.len() as u64);
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let want = exact(&mut values, q);
            let got = a.quantile(q);
            assert!(
                (got - want).abs() <= want * ALPHA + 1e-9,
                "q{q}: got {got}, want {want}"
            );
        }
    }

    #[test]
    fn parts_round_trip_and_sql_matches() {
        let mut s = Sketch::default();
        for v in [5.0, 5.0, 1000.0, 1e9] {
            s.add(v);
        }
        let (k, n) = s.parts();
        let k64: Vec<i64> = k.iter().map(|k| i64::from(*k)).collect();
        assert_eq!(Sketch::from_parts(&k64, &n), s);
        assert_eq!(key(1.0), 0);
        assert!(key(1e9) > key(1e6));
        assert!(key_sql("x").contains("ln("));
    }
}
