//! Which minutes of a table's time column recent writes touched: for a consumer that
//! counts data by time (the `/metrics` golden-signal counters) and must re-read a minute
//! it already counted when data for it arrives late.
//!
//! Every acknowledged write records the minutes its rows fall in, each with the earliest
//! time written into it, so a consumer can tell a late write (earlier than what it has
//! counted) from one for the minute it is still counting; it takes them with
//! [`WrittenMinutes::take`]. Bounded: past [`MAX_MINUTES`] the oldest minutes leave first.

use std::collections::BTreeMap;
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;

/// The most minutes the set holds.
pub const MAX_MINUTES: usize = 10_000;

const MINUTE_NS: i64 = 60_000_000_000;

/// Minute (since the epoch) → the earliest time (ns) written into it.
pub type Minutes = BTreeMap<i64, i64>;

/// The minutes writes touched since the last [`WrittenMinutes::take`].
#[derive(Debug, Default)]
pub struct WrittenMinutes {
    minutes: Mutex<Minutes>,
}

/// The minutes a batch's time column falls in, each with its earliest time.
pub fn minutes_of(batch: &RecordBatch, time_column: &str) -> Minutes {
    let mut out = Minutes::new();
    let Some(times) = batch
        .column_by_name(time_column)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
    else {
        return out;
    };
    for t in times.iter().flatten() {
        let e = out.entry(t.div_euclid(MINUTE_NS)).or_insert(t);
        *e = (*e).min(t);
    }
    out
}

/// Every minute from `min_ns` to `max_ns` (a file's time range), each with its earliest
/// possible time: `min_ns` in the first minute, the minute's start after it. At most
/// [`MAX_MINUTES`] (the latest ones).
pub fn minutes_between(min_ns: i64, max_ns: i64) -> Minutes {
    let (first, last) = (min_ns.div_euclid(MINUTE_NS), max_ns.div_euclid(MINUTE_NS));
    let first = first.max(last - MAX_MINUTES as i64 + 1);
    (first..=last)
        .map(|m| (m, (m * MINUTE_NS).max(min_ns)))
        .collect()
}

fn merge(into: &mut Minutes, from: Minutes) {
    for (m, t) in from {
        let e = into.entry(m).or_insert(t);
        *e = (*e).min(t);
    }
}

impl WrittenMinutes {
    /// Notes the minutes an acknowledged write touched.
    pub fn record(&self, minutes: Minutes) {
        if minutes.is_empty() {
            return;
        }
        let mut set = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        merge(&mut set, minutes);
        while set.len() > MAX_MINUTES {
            set.pop_first();
        }
    }

    /// The minutes written since the last call.
    pub fn take(&self) -> Minutes {
        std::mem::take(&mut *self.minutes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn a_files_range_covers_its_minutes() {
        let m = MINUTE_NS;
        let got = minutes_between(5 * m + 7, 7 * m + 1);
        assert_eq!(got, Minutes::from([(5, 5 * m + 7), (6, 6 * m), (7, 7 * m)]));
        assert_eq!(minutes_between(3 * m, 3 * m + 9).len(), 1);
        assert_eq!(
            minutes_between(0, (MAX_MINUTES as i64 + 50) * m).len(),
            MAX_MINUTES
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::TimestampNanosecondArray;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    fn batch(times: &[i64]) -> RecordBatch {
        let schema = Schema::new(vec![Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        )]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(TimestampNanosecondArray::from(times.to_vec()))],
        )
        .expect("batch")
    }

    #[test]
    fn a_batch_gives_each_minute_its_earliest_time() {
        let m = MINUTE_NS;
        assert_eq!(
            minutes_of(&batch(&[3 * m + 50, 3 * m + 5, 5 * m - 1, 500 * m]), "t"),
            Minutes::from([(3, 3 * m + 5), (4, 5 * m - 1), (500, 500 * m)])
        );
        assert!(minutes_of(&batch(&[m]), "other").is_empty());
    }

    #[test]
    fn take_drains_keeps_the_earliest_and_is_bounded() {
        let w = WrittenMinutes::default();
        w.record(Minutes::from([(7, 700), (9, 900)]));
        w.record(Minutes::from([(7, 650), (8, 800)]));
        assert_eq!(w.take(), Minutes::from([(7, 650), (8, 800), (9, 900)]));
        assert!(w.take().is_empty());
        w.record((0..(MAX_MINUTES as i64 + 5)).map(|m| (m, m)).collect());
        let all = w.take();
        assert_eq!(all.len(), MAX_MINUTES);
        assert_eq!(all.first_key_value(), Some((&5, &5)));
    }
}
