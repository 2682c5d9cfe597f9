//! A token bucket without a lock, for the request path: the rate limit's bucket and the
//! retry budget use it, so no request waits on another worker's mutex.
//!
//! Tokens are counted in thousandths in one atomic. A refill is claimed by moving the
//! refilled-up-to time forward with a compare-and-swap: two workers never add the same
//! interval twice, and the time worth less than a thousandth of a token is left for the
//! next refill instead of being lost. (A refill and a concurrent take may see the bucket
//! a refill over its cap for an instant; the cap is restored right after the add.)

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::time::Instant;

/// Thousandths of a token per token.
const MILLI: f64 = 1000.0;

#[derive(Debug)]
pub struct AtomicBucket {
    /// Thousandths of a token in the bucket.
    milli: AtomicI64,
    /// Nanoseconds after `base` up to which refills have been added.
    refilled_to: AtomicU64,
    base: Instant,
    per_sec: f64,
    /// The cap, in thousandths.
    cap: i64,
}

impl AtomicBucket {
    /// A bucket holding `initial` tokens, refilled with `per_sec` a second up to `cap`.
    pub fn new(initial: f64, per_sec: f64, cap: f64) -> AtomicBucket {
        let cap = (cap.max(0.0) * MILLI) as i64;
        AtomicBucket {
            milli: AtomicI64::new(((initial.max(0.0) * MILLI) as i64).min(cap)),
            refilled_to: AtomicU64::new(0),
            base: Instant::now(),
            per_sec: per_sec.max(0.0),
            cap,
        }
    }

    fn now_ns(&self) -> u64 {
        let d = Instant::now().saturating_duration_since(self.base);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Adds what the time since the last refill is worth.
    fn refill(&self) {
        if self.per_sec == 0.0 {
            return;
        }
        let now = self.now_ns();
        let mut last = self.refilled_to.load(Ordering::Acquire);
        while now > last {
            let elapsed = now - last;
            let worth = (elapsed as f64 * self.per_sec * MILLI / 1e9).floor();
            if worth < 1.0 {
                return;
            }
            let (add, used) = if worth >= self.cap as f64 {
                // Enough to fill it from empty: the whole interval is used up.
                (self.cap as f64, elapsed)
            } else {
                // The time those whole thousandths took; the rest carries over.
                let used = (worth / (self.per_sec * MILLI) * 1e9).ceil() as u64;
                (worth, used.min(elapsed))
            };
            match self.refilled_to.compare_exchange_weak(
                last,
                last + used,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.add(add as i64);
                    return;
                }
                Err(seen) => last = seen,
            }
        }
    }

    fn add(&self, milli: i64) {
        let before = self.milli.fetch_add(milli, Ordering::AcqRel);
        if before.saturating_add(milli) > self.cap {
            self.milli.fetch_min(self.cap, Ordering::AcqRel);
        }
    }

    /// Adds `tokens` (up to the cap).
    pub fn deposit(&self, tokens: f64) {
        self.refill();
        self.add((tokens.max(0.0) * MILLI) as i64);
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.refill();
        let mut have = self.milli.load(Ordering::Acquire);
        loop {
            if have < MILLI as i64 {
                return false;
            }
            match self.milli.compare_exchange_weak(
                have,
                have - MILLI as i64,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => have = seen,
            }
        }
    }

    /// The tokens in the bucket now (after a refill).
    pub fn tokens(&self) -> f64 {
        self.refill();
        self.milli.load(Ordering::Acquire) as f64 / MILLI
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_at_its_rate_up_to_its_cap_and_keeps_fractions() {
        let b = AtomicBucket::new(2.0, 10.0, 5.0);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take(), "empty");
        // 10 a second: one token after 100 ms, none before.
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.try_take());
        // A thousand refills 10 µs apart (each worth a tenth of a thousandth) add up to the
        // 0.1 token the 10 ms are worth, not to nothing.
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_micros(10)).await;
            b.refill();
        }
        assert!((b.tokens() - 0.1).abs() < 0.002, "{}", b.tokens());
        // An hour later: full, not more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(b.tokens(), 5.0);
        b.deposit(3.0);
        assert_eq!(b.tokens(), 5.0, "deposits stop at the cap too");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_rate_only_deposits_fill_it() {
        let b = AtomicBucket::new(0.0, 0.0, 10.0);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!b.try_take());
        for _ in 0..5 {
            b.deposit(0.2);
        }
        assert!(b.try_take());
        assert!(!b.try_take());
    }

    #[test]
    fn threads_taking_at_once_take_each_token_once() {
        let b = Arc::new(AtomicBucket::new(10_000.0, 0.0, 10_000.0));
        let taken: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let b = Arc::clone(&b);
                    s.spawn(move || (0..5_000).filter(|_| b.try_take()).count())
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).sum()
        });
        assert_eq!(taken, 10_000);
        assert_eq!(b.tokens(), 0.0);
    }
}
