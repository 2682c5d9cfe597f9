//! `meshscope-fuzz`: runs the fuzz targets for as long as asked, printing progress.
//!
//! ```sh
//! scripts/fuzz                     # every target, 10 minutes each
//! scripts/fuzz --seconds 60 --target otlp_json
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Fuzzes meshscope's parsers (OTLP protobuf and JSON, traceparent, the proxy's TOML, the
/// read-only SQL check, Postgres start-up messages).
#[derive(Debug, Parser)]
struct Args {
    /// Only this target (otlp_protobuf, otlp_json, traceparent, proxy_toml, readonly_sql,
    /// pg_startup).
    #[arg(long)]
    target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// RNG seed (a run is repeatable for the same seed and duration).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where crashing inputs are written.
    #[arg(long, default_value = "target/fuzz-crashes")]
    crashes: PathBuf,
    /// Run these saved inputs through --target once each, panics shown (to debug a crash).
    #[arg(long, requires = "target")]
    replay: Vec<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let targets: Vec<_> = meshscope_fuzz::targets()
        .into_iter()
        .filter(|t| args.target.as_deref().is_none_or(|n| n == t.name))
        .collect();
    if targets.is_empty() {
        eprintln!("no target named {:?}", args.target.unwrap_or_default());
        std::process::exit(2);
    }
    if !args.replay.is_empty() {
        for path in &args.replay {
            let input = std::fs::read(path).unwrap_or_else(|e| {
                eprintln!("cannot read {}: {e}", path.display());
                std::process::exit(2)
            });
            for t in &targets {
                eprintln!("{} < {}", t.name, path.display());
                (t.run)(&input);
            }
        }
        return;
    }
    let mut crashed = false;
    println!("| target | executions | seconds | executions/s | crashes |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for t in &targets {
        eprintln!("fuzzing {} for {} s …", t.name, args.seconds);
        let r = meshscope_fuzz::fuzz(
            t,
            Duration::from_secs(args.seconds),
            args.seed,
            &args.crashes,
            |r| {
                eprintln!(
                    "  {}: {} executions ({:.0}/s), {} crashes",
                    r.target,
                    r.executions,
                    r.per_second(),
                    r.crashes.len()
                )
            },
        );
        println!(
            "| {} | {} | {:.0} | {:.0} | {} |",
            r.target,
            r.executions,
            r.elapsed.as_secs_f64(),
            r.per_second(),
            r.crashes.len()
        );
        crashed |= !r.crashes.is_empty();
    }
    if crashed {
        eprintln!(
            "crashing inputs are in {}: fix each, then copy it to fuzz/regressions/<target>/",
            args.crashes.display()
        );
        std::process::exit(1);
    }
}
