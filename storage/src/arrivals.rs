//! Which minutes of a table's time column recent writes touched: for a consumer that
//! counts data by time (the `/metrics` golden-signal counters) and must re-read a minute
//! it already counted when data for it arrives late.
//!
//! Every acknowledged write records the minutes its rows fall in (from the batch's
//! smallest to its largest time when they are at most an hour apart, else each row's);
//! the consumer takes the set with [`WrittenMinutes::take`]. The set is bounded: past
//! [`MAX_MINUTES`] the oldest minutes leave first.

use std::collections::BTreeSet;
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;

/// The most minutes the set holds.
pub const MAX_MINUTES: usize = 10_000;

const MINUTE_NS: i64 = 60_000_000_000;

/// Minutes (since the epoch) that writes touched since the last [`WrittenMinutes::take`].
#[derive(Debug, Default)]
pub struct WrittenMinutes {
    minutes: Mutex<BTreeSet<i64>>,
}

/// The minutes a batch's time column covers.
pub fn minutes_of(batch: &RecordBatch, time_column: &str) -> BTreeSet<i64> {
    let Some(times) = batch
        .column_by_name(time_column)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
    else {
        return BTreeSet::new();
    };
    let (Some(lo), Some(hi)) = (
        arrow::compute::min(times).map(|t| t.div_euclid(MINUTE_NS)),
        arrow::compute::max(times).map(|t| t.div_euclid(MINUTE_NS)),
    ) else {
        return BTreeSet::new();
    };
    if hi - lo <= 60 {
        (lo..=hi).collect()
    } else {
        times
            .iter()
            .flatten()
            .map(|t| t.div_euclid(MINUTE_NS))
            .collect()
    }
}

impl WrittenMinutes {
    /// Notes minutes that an acknowledged write touched.
    pub fn record(&self, minutes: BTreeSet<i64>) {
        if minutes.is_empty() {
            return;
        }
        let mut set = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        set.extend(minutes);
        while set.len() > MAX_MINUTES {
            set.pop_first();
        }
    }

    /// The minutes written since the last call.
    pub fn take(&self) -> BTreeSet<i64> {
        std::mem::take(&mut *self.minutes.lock().unwrap_or_else(|p| p.into_inner()))
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
    fn a_batch_covers_the_minutes_between_its_times() {
        let m = MINUTE_NS;
        assert_eq!(
            minutes_of(&batch(&[3 * m + 5, 5 * m - 1]), "t"),
            BTreeSet::from([3, 4])
        );
        // Far apart: only the minutes rows fall in.
        assert_eq!(
            minutes_of(&batch(&[m, 500 * m, m + 7]), "t"),
            BTreeSet::from([1, 500])
        );
        assert!(minutes_of(&batch(&[m]), "other").is_empty());
    }

    #[test]
    fn take_drains_and_the_set_is_bounded() {
        let w = WrittenMinutes::default();
        w.record(BTreeSet::from([7, 9]));
        w.record(BTreeSet::from([8]));
        assert_eq!(w.take(), BTreeSet::from([7, 8, 9]));
        assert!(w.take().is_empty());
        w.record((0..(MAX_MINUTES as i64 + 5)).collect());
        let all = w.take();
        assert_eq!(all.len(), MAX_MINUTES);
        assert_eq!(all.first(), Some(&5));
    }
}
