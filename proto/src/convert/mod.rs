//! OTLP export request -> Arrow `RecordBatch`, one function per signal.
//!
//! Each function keeps every valid record and counts the invalid ones, so the receiver can
//! answer with an OTLP `partial_success`. Validation follows the OTLP specification: trace
//! ids are 16 bytes and not all zero, span ids 8 bytes and not all zero, a span does not end
//! before it starts.

mod attributes;
mod logs;
mod metrics;
pub mod spans;

use arrow::record_batch::RecordBatch;

pub use attributes::any_value_to_string;
pub use logs::logs;
pub use metrics::metrics;
pub use spans::spans;

/// The result of converting one export request.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The accepted records, in the table's schema (may have zero rows).
    pub batch: RecordBatch,
    /// How many records (spans, data points or log records) were rejected.
    pub rejected: u64,
    /// Why, for the first rejected records (the `partial_success.error_message`).
    pub message: Option<String>,
}

/// Counts rejected records and keeps a readable message about the first few.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    count: u64,
    reasons: Vec<String>,
}

impl Rejections {
    const MAX_REASONS: usize = 3;

    pub(crate) fn reject(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.reasons.len() < Self::MAX_REASONS {
            self.reasons.push(what());
        }
    }

    pub(crate) fn into_parts(self) -> (u64, Option<String>) {
        if self.count == 0 {
            return (0, None);
        }
        let mut msg = format!(
            "rejected {} record(s): {}",
            self.count,
            self.reasons.join("; ")
        );
        if self.count as usize > self.reasons.len() {
            msg.push_str("; …");
        }
        (self.count, Some(msg))
    }
}

/// Lowercase hex of an id, without allocating per call beyond the builder's copy.
pub(crate) fn hex_id<'a>(bytes: &[u8], buf: &'a mut [u8; 64]) -> &'a str {
    let n = bytes.len().min(32) * 2;
    // Both lengths are bounded by the buffer, and hex output is ASCII.
    if hex::encode_to_slice(&bytes[..n / 2], &mut buf[..n]).is_err() {
        return "";
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// Why an id is not valid, or `None` when it is.
pub(crate) fn check_id(bytes: &[u8], len: usize, what: &str) -> Option<String> {
    if bytes.len() != len {
        Some(format!("{what} must be {len} bytes, got {}", bytes.len()))
    } else if bytes.iter().all(|b| *b == 0) {
        Some(format!("{what} must not be all zeros"))
    } else {
        None
    }
}

/// Nanoseconds since the epoch as the `i64` Arrow timestamps hold (saturating: OTLP
/// timestamps are `u64`, and anything past year 2262 is clamped).
pub(crate) fn ts_ns(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
