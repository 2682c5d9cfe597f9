//! Time ranges and SQL literals.

use chrono::{DateTime, Duration, SecondsFormat, Utc};

use crate::engine::QueryError;

/// `[start, end)` of a request; a span belongs to it by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl TimeRange {
    /// From optional RFC 3339 `start` / `end`; absent means the last 15 minutes.
    pub fn parse(
        start: Option<&str>,
        end: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Self, QueryError> {
        let parse = |name: &str, v: &str| {
            DateTime::parse_from_rfc3339(v)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|e| {
                    QueryError::Invalid(format!(
                        "{name} must be RFC 3339 (e.g. 2026-11-26T12:00:00Z): {e}"
                    ))
                })
        };
        let end = match end {
            Some(e) => parse("end", e)?,
            None => now,
        };
        let start = match start {
            Some(s) => parse("start", s)?,
            None => end.checked_sub_signed(Duration::minutes(15)).unwrap_or(end),
        };
        // Timestamps are nanoseconds in an i64: about 1677 to 2262; stay inside with room.
        let (lo, hi) = (
            DateTime::from_timestamp_nanos(i64::MIN / 2),
            DateTime::from_timestamp_nanos(i64::MAX / 2),
        );
        let (start, end) = (start.clamp(lo, hi), end.clamp(lo, hi));
        if start >= end {
            return Err(QueryError::Invalid("start must be before end".into()));
        }
        Ok(TimeRange { start, end })
    }

    pub fn seconds(&self) -> f64 {
        (self.end - self.start)
            .num_nanoseconds()
            .unwrap_or(i64::MAX) as f64
            / 1e9
    }

    /// The same range widened on both sides (to find the other half of a pair).
    pub fn widened(&self, by: Duration) -> TimeRange {
        TimeRange {
            start: self.start.checked_sub_signed(by).unwrap_or(self.start),
            end: self.end.checked_add_signed(by).unwrap_or(self.end),
        }
    }

    /// `<col> >= '…' AND <col> < '…'` for a timestamp column.
    pub fn sql(&self, column: &str) -> String {
        format!(
            "{column} >= {} AND {column} < {}",
            ts_literal(self.start),
            ts_literal(self.end)
        )
    }
}

/// A timestamp literal DataFusion compares with `Timestamp(ns, UTC)` columns.
pub fn ts_literal(t: DateTime<Utc>) -> String {
    format!(
        "CAST('{}' AS TIMESTAMP)",
        t.to_rfc3339_opts(SecondsFormat::Nanos, true)
    )
}

/// An empty parameter (`?service=`, as HTML forms send) is the same as an absent one.
pub(crate) fn empty_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match <Option<String> as serde::Deserialize>::deserialize(d)?.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}"))),
    }
}

#[cfg(test)]
mod range_limits {
    use super::*;

    #[test]
    fn extreme_ranges_are_clamped_not_overflowed() {
        let now = Utc::now();
        let r = TimeRange::parse(
            Some("0001-01-01T00:00:00Z"),
            Some("9999-12-31T23:59:59Z"),
            now,
        )
        .expect("parse");
        assert_eq!(r.start, DateTime::from_timestamp_nanos(i64::MIN / 2));
        let w = r.widened(Duration::hours(1));
        assert!(w.start <= r.start && w.end >= r.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_the_last_15_minutes() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let r = TimeRange::parse(None, None, now).expect("range");
        assert_eq!(r.end, now);
        assert_eq!(r.seconds(), 900.0);
        assert!(TimeRange::parse(Some("yesterday"), None, now).is_err());
        assert!(
            TimeRange::parse(
                Some("2026-11-26T12:00:00Z"),
                Some("2026-11-26T11:00:00Z"),
                now
            )
            .is_err()
        );
    }
}
