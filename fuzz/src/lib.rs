//! Fuzz targets for what meshscope parses from strangers, and the mutation fuzzer that runs
//! them.
//!
//! Each [`Target`] feeds bytes to the same function the server (or the proxy) calls: an
//! OTLP/HTTP body through the receiver's decoder and the conversion to Arrow rows, a
//! `traceparent` header, the proxy's TOML, a SQL statement through the read-only check,
//! and the first bytes of a Postgres connection through the wire protocol's decoder. A
//! target passes when it returns (an error is a fine answer); a panic is a crash.
//!
//! The fuzzer ([`fuzz`]) is a seeded mutation fuzzer on stable Rust: it starts from real
//! inputs (the OTLP examples of `shared/testdata`, valid configs, statements and messages),
//! stacks random byte-level and token-level mutations, and keeps a bounded pool of the
//! inputs it made so mutations compound. It has no coverage feedback (libFuzzer needs a
//! nightly toolchain, which this project's machines do not have): its strength is volume
//! from realistic seeds. Every crash is written to disk; once fixed it is copied to
//! `fuzz/regressions/<target>/`, which [`replay_regressions`] runs in every test run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod targets;

pub use targets::targets;

/// One thing to fuzz.
pub struct Target {
    pub name: &'static str,
    /// Parses `input`; must not panic whatever it is.
    pub run: fn(&[u8]),
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Text targets get token-level mutations (quotes, brackets, keywords) besides bytes.
    pub text: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub executions: u64,
    pub elapsed: Duration,
    /// Files holding the inputs that crashed the target.
    pub crashes: Vec<PathBuf>,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The pool of inputs the fuzzer mutates: the seeds, and up to this many it made.
const POOL: usize = 512;
/// Inputs grow to at most this many bytes.
const MAX_LEN: usize = 64 * 1024;

/// Tokens a text mutation inserts: JSON, TOML and SQL structure, and numbers at the edges.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    ":",
    ",",
    "=",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-1",
    "0",
    "1e309",
    "-9223372036854775809",
    "18446744073709551616",
    "NaN",
    "\n",
    "[[",
    "]]",
    "SELECT",
    "FROM",
    "WITH",
    "(",
    ")",
    ";",
    "--",
    "/*",
    "*/",
    "COPY",
    "INSERT",
    "SET",
    "EXPLAIN",
    "UNION",
    "\u{10ffff}",
    "é",
    "00",
    "-",
    "ff",
    "0x",
    "\"\"\"",
    "inf",
];

/// Runs `target` for about `budget` from `seed`, writing crashing inputs into `crash_dir`.
/// `progress` is called every few seconds with the report so far.
pub fn fuzz(
    target: &Target,
    budget: Duration,
    seed: u64,
    crash_dir: &Path,
    mut progress: impl FnMut(&Report),
) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let seeds = (target.seeds)();
    let mut pool: Vec<Vec<u8>> = seeds.clone();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut report = Report {
        target: target.name,
        executions: 0,
        elapsed: Duration::ZERO,
        crashes: Vec::new(),
    };
    let started = Instant::now();
    let mut last_progress = started;
    let quiet = silence_panics();
    // The seeds themselves first.
    for s in &seeds {
        execute(target, s, crash_dir, &mut report);
    }
    while started.elapsed() < budget {
        let base = &pool[rng.random_range(0..pool.len())];
        let mut input = base.clone();
        let n = 1 + rng.random_range(0..8u32);
        for _ in 0..n {
            let other = &pool[rng.random_range(0..pool.len())];
            mutate(&mut input, other, target.text, &mut rng);
        }
        execute(target, &input, crash_dir, &mut report);
        // Keep some inputs so mutations compound; replace at random once full.
        if rng.random_bool(0.05) {
            if pool.len() < POOL {
                pool.push(input);
            } else {
                let i = rng.random_range(seeds.len().min(POOL - 1)..POOL);
                pool[i] = input;
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            report.elapsed = started.elapsed();
            progress(&report);
        }
    }
    drop(quiet);
    report.elapsed = started.elapsed();
    report
}

/// Runs one input; a panic is recorded as a crash.
fn execute(target: &Target, input: &[u8], crash_dir: &Path, report: &mut Report) {
    report.executions += 1;
    if catch_unwind(AssertUnwindSafe(|| (target.run)(input))).is_err() {
        let _ = std::fs::create_dir_all(crash_dir);
        let path = crash_dir.join(format!("{}-{:016x}", target.name, fnv(input)));
        let _ = std::fs::write(&path, input);
        eprintln!(
            "CRASH in {}: input saved to {} ({} bytes)",
            target.name,
            path.display(),
            input.len()
        );
        report.crashes.push(path);
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Replaces the panic hook with a silent one while fuzzing (a crash is reported by
/// [`execute`] instead of a backtrace per input); the hook is restored on drop.
type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

struct Quiet(Option<PanicHook>);

fn silence_panics() -> Quiet {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    Quiet(Some(previous))
}

impl Drop for Quiet {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            std::panic::set_hook(h);
        }
    }
}

/// One random change to `input`; `other` is another pool input to splice from.
fn mutate(input: &mut Vec<u8>, other: &[u8], text: bool, rng: &mut StdRng) {
    let len = input.len();
    let at = |rng: &mut StdRng, n: usize| if n == 0 { 0 } else { rng.random_range(0..n) };
    match rng.random_range(0..if text { 11 } else { 9 }) {
        // Flip a bit.
        0 if len > 0 => {
            let i = at(rng, len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        // A random byte, or one of the values parsers treat specially.
        1 if len > 0 => {
            let i = at(rng, len);
            input[i] = *[0u8, 0x7f, 0x80, 0xff, b'0', b'"', rng.random()]
                .get(rng.random_range(0..7))
                .unwrap_or(&0);
        }
        // Insert random bytes.
        2 => {
            let i = at(rng, len + 1);
            let n = rng.random_range(1..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            input.splice(i..i, bytes);
        }
        // Delete a range.
        3 if len > 0 => {
            let i = at(rng, len);
            let n = rng.random_range(1..=(len - i).min(64));
            input.drain(i..i + n);
        }
        // Duplicate a range (repetition: deep nesting, long runs).
        4 if len > 0 => {
            let i = at(rng, len);
            let n = rng.random_range(1..=(len - i).min(256));
            let piece = input[i..i + n].to_vec();
            let times = rng.random_range(1..8);
            for _ in 0..times {
                input.splice(i..i, piece.iter().copied());
            }
        }
        // Splice a piece of another input in.
        5 if !other.is_empty() => {
            let j = at(rng, other.len());
            let n = rng.random_range(1..=(other.len() - j).min(512));
            let i = at(rng, len + 1);
            input.splice(i..i, other[j..j + n].iter().copied());
        }
        // Truncate.
        6 if len > 0 => input.truncate(at(rng, len)),
        // A protobuf varint of a huge or negative value (lengths, counts).
        7 => {
            let i = at(rng, len + 1);
            let v: &[u8] = match rng.random_range(0..3) {
                0 => &[0xff, 0xff, 0xff, 0xff, 0x0f],
                1 => &[0xff; 10],
                _ => &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            };
            input.splice(i..i, v.iter().copied());
        }
        // Overwrite with a random byte run.
        8 if len > 0 => {
            let i = at(rng, len);
            let n = rng.random_range(1..=(len - i).min(8));
            for b in &mut input[i..i + n] {
                *b = rng.random();
            }
        }
        // Text: insert a token.
        9 | 10 => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())];
            let i = char_boundary(input, at(rng, len + 1));
            input.splice(i..i, token.bytes());
        }
        _ => {}
    }
    input.truncate(MAX_LEN);
}

/// The nearest UTF-8 character boundary at or before `i` (so text stays mostly text).
fn char_boundary(input: &[u8], mut i: usize) -> usize {
    while i > 0 && i < input.len() && (input[i] & 0xc0) == 0x80 {
        i -= 1;
    }
    i
}

/// Runs every saved regression input of every target (`fuzz/regressions/<target>/*`);
/// answers the inputs that still crash.
pub fn replay_regressions(dir: &Path) -> Vec<PathBuf> {
    let mut failing = Vec::new();
    for t in targets() {
        let Ok(entries) = std::fs::read_dir(dir.join(t.name)) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let quiet = silence_panics();
            let crashed = catch_unwind(AssertUnwindSafe(|| (t.run)(&bytes))).is_err();
            drop(quiet);
            if crashed {
                failing.push(e.path());
            }
        }
    }
    failing
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeded run of the test command: each target for a few seconds from a fixed
    /// seed. (`scripts/fuzz` runs them for as long as asked.)
    #[test]
    fn every_target_survives_a_seeded_run() {
        let crash_dir = std::env::temp_dir().join(format!("meshscope-fuzz-{}", std::process::id()));
        let mut total = 0;
        for t in targets() {
            let r = fuzz(&t, Duration::from_secs(6), 0x5eed, &crash_dir, |_| {});
            eprintln!(
                "{}: {} executions in {:.1} s, {} crashes",
                r.target,
                r.executions,
                r.elapsed.as_secs_f64(),
                r.crashes.len()
            );
            assert!(
                r.crashes.is_empty(),
                "{}: crashes in {:?}",
                r.target,
                r.crashes
            );
            assert!(
                r.executions > 100,
                "{}: only {} executions",
                r.target,
                r.executions
            );
            total += r.executions;
        }
        assert!(total > 0);
    }

    #[test]
    fn regressions_stay_fixed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        assert_eq!(replay_regressions(&dir), Vec::<PathBuf>::new());
    }

    #[test]
    fn seeds_are_valid_inputs() {
        // Every target has seeds, and the fuzzer's own mutations keep lengths bounded.
        for t in targets() {
            assert!(!(t.seeds)().is_empty(), "{} has no seeds", t.name);
        }
        // The OTLP targets start from the shared examples (three real payloads each,
        // besides the empty ones), and those decode.
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        for name in ["otlp_json", "otlp_protobuf"] {
            let t = targets().into_iter().find(|t| t.name == name).unwrap();
            let seeds = (t.seeds)();
            assert!(seeds.len() >= 6, "{name}: {} seeds", seeds.len());
            let trace = seeds.iter().find(|s| s.len() > 100 && s[0] == 0).unwrap();
            let decoded = meshscope_collector::http::decode_otlp::<ExportTraceServiceRequest>(
                name == "otlp_json",
                &trace[1..],
            )
            .unwrap();
            assert!(!decoded.resource_spans.is_empty());
        }
        let mut rng = StdRng::seed_from_u64(1);
        let mut v = vec![b'x'; MAX_LEN];
        for _ in 0..1000 {
            mutate(&mut v, b"abc", true, &mut rng);
            assert!(v.len() <= MAX_LEN);
        }
    }
}
