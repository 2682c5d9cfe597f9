//! `meshscope bench overload`: more spans than the server can take, and what it does.
//!
//! 1. Calibrate: closed-loop OTLP/gRPC exports (retrying refusals) measure the rate the
//!    server sustains on this machine.
//! 2. Overload: an open loop offers `--factor` times that rate for `--seconds`, each export
//!    sent once: acknowledged, or refused as `UNAVAILABLE` (retryable), or failed otherwise.
//!    The server's RSS is sampled every second.
//! 3. Recovery: once the load stops, how long until an export is acknowledged again.
//! 4. Completeness: `count(*)` of the spans table must equal the acknowledged spans.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshscope_proto::otlp::collector::trace::v1::trace_service_client::TraceServiceClient;
use tonic::transport::Channel;

use super::{Rng, connect, mesh_request, peak_rss_kib, start_server_with};
use crate::config::BenchOverloadArgs;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    acked_spans: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

async fn count_spans(http: &str) -> Result<u64, String> {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{http}/api/v1/sql"))
        .json(&serde_json::json!({ "sql": "SELECT count(*) FROM spans" }))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    v["rows"][0][0]
        .as_u64()
        .ok_or_else(|| format!("no count in {v}"))
}

pub async fn run(args: BenchOverloadArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("meshscope-overload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let extra = [
        "--max-buffered-bytes".to_string(),
        args.max_buffered_bytes.to_string(),
        "--flush-bytes".to_string(),
        (args.max_buffered_bytes / 4).to_string(),
    ];
    let mut server = start_server_with(&dir, &extra)?;
    let pid = server.child.id();
    let client = connect(&server.grpc, Duration::from_secs(20)).await?;
    let counts = Arc::new(Counts::default());
    let result = overload(&args, &server.grpc, client, pid, &counts, &server.http).await;
    let _ = server.child.kill();
    let _ = server.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn overload(
    args: &BenchOverloadArgs,
    endpoint: &str,
    client: TraceServiceClient<Channel>,
    pid: u32,
    counts: &Arc<Counts>,
    http: &str,
) -> Result<(), String> {
    let batch = args.batch.max(1);
    eprintln!(
        "bench overload: server pid {pid}, --max-buffered-bytes {} MiB; calibrating for {} s",
        args.max_buffered_bytes >> 20,
        args.calibrate_secs
    );
    // 1. Calibrate (closed loop, refusals retried).
    let started = Instant::now();
    let calibrate = Duration::from_secs(args.calibrate_secs.max(1));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency.max(1) {
        let (mut client, counts) = (client.clone(), Arc::clone(counts));
        workers.spawn(async move {
            let mut rng = Rng(0x5eed ^ ((w as u64 + 1) * 0x9E37_79B9));
            while started.elapsed() < calibrate {
                let req = mesh_request(&mut rng, batch, now_ns());
                loop {
                    match client.export(req.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(s) => return Err(format!("export failed: {s}")),
                    }
                }
                counts
                    .acked_spans
                    .fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok::<_, String>(())
        });
    }
    while let Some(j) = workers.join_next().await {
        j.map_err(|e| e.to_string())??;
    }
    let calibrated = counts.acked_spans.load(Ordering::Relaxed);
    let rate = calibrated as f64 / started.elapsed().as_secs_f64();
    let offered_rate = rate * args.factor;
    eprintln!(
        "  sustained {rate:.0} spans/s; offering {offered_rate:.0} spans/s ({}x) for {} s",
        args.factor, args.seconds
    );

    // 2. Overload (open loop: every export sent once, on schedule, up to the in-flight cap).
    let rss_before = rss_kib(pid).unwrap_or(0);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight.max(1)));
    let unsent = AtomicU64::new(0);
    let mut offered = 0u64;
    let mut max_rss = rss_before;
    let load = Duration::from_secs(args.seconds.max(1));
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last_report = Instant::now();
    let mut rng = Rng(0xfeed);
    let (acked0, refused0) = (
        counts.acked_spans.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
    );
    // Many connections, as many proxies would have: one HTTP/2 connection would itself
    // queue the bodies (flow control) and hide the server's answer times.
    let mut clients = Vec::new();
    for _ in 0..32 {
        let channel = Channel::from_shared(endpoint.to_string())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        clients.push(TraceServiceClient::new(channel).max_encoding_message_size(64 << 20));
    }
    let mut sent = tokio::task::JoinSet::new();
    while start.elapsed() < load {
        tick.tick().await;
        let due = (offered_rate * start.elapsed().as_secs_f64()) as u64 / batch as u64;
        while offered < due {
            offered += 1;
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                unsent.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut client = clients[offered as usize % clients.len()].clone();
            let counts = Arc::clone(counts);
            let req = mesh_request(&mut rng, batch, now_ns());
            sent.spawn(async move {
                let _permit = permit;
                match client.export(req).await {
                    Ok(_) => counts
                        .acked_spans
                        .fetch_add(batch as u64, Ordering::Relaxed),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        counts.refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => counts.failed.fetch_add(1, Ordering::Relaxed),
                };
            });
        }
        while sent.try_join_next().is_some() {}
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let rss = rss_kib(pid).unwrap_or(0);
            max_rss = max_rss.max(rss);
            eprintln!(
                "  {:>5.1}s  offered {:>8} requests  acknowledged {:>10} spans  refused {:>7}  RSS {} MiB",
                start.elapsed().as_secs_f64(),
                offered,
                counts.acked_spans.load(Ordering::Relaxed) - acked0,
                counts.refused.load(Ordering::Relaxed) - refused0,
                rss / 1024
            );
        }
    }
    let overload_secs = start.elapsed().as_secs_f64();
    let draining = Instant::now();
    while sent.join_next().await.is_some() {}
    let drained = draining.elapsed();
    max_rss = max_rss.max(rss_kib(pid).unwrap_or(0));
    let acked_in_overload = counts.acked_spans.load(Ordering::Relaxed) - acked0;
    let refused = counts.refused.load(Ordering::Relaxed) - refused0;

    // 3. Recovery: the first acknowledged export after the load stopped.
    let stopped = Instant::now();
    let mut c = client.clone();
    let recovered = loop {
        let req = mesh_request(&mut rng, batch, now_ns());
        match c.export(req).await {
            Ok(_) => {
                counts
                    .acked_spans
                    .fetch_add(batch as u64, Ordering::Relaxed);
                break Some(stopped.elapsed());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {}
            Err(s) => return Err(format!("export failed after the load: {s}")),
        }
        if stopped.elapsed() > Duration::from_secs(120) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // 4. Completeness.
    let acked = counts.acked_spans.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = count_spans(http).await?;
    while stored != acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stored = count_spans(http).await?;
    }
    let peak = peak_rss_kib(pid).unwrap_or(0);

    println!("sustained rate (calibration)   {rate:.0} spans/s");
    println!(
        "offered                         {offered_rate:.0} spans/s ({}x) for {overload_secs:.1} s: {offered} requests of {batch}",
        args.factor
    );
    println!(
        "acknowledged under overload     {acked_in_overload} spans ({:.0} spans/s)",
        acked_in_overload as f64 / overload_secs
    );
    println!("refused (UNAVAILABLE)           {refused} requests");
    println!(
        "in flight at the end            answered within {:.2} s",
        drained.as_secs_f64()
    );
    println!(
        "failed otherwise                {}",
        counts.failed.load(Ordering::Relaxed)
    );
    println!(
        "not sent (client in-flight cap) {}",
        unsent.load(Ordering::Relaxed)
    );
    println!(
        "server RSS                      {} MiB before, {} MiB at most during, {} MiB peak overall",
        rss_before / 1024,
        max_rss / 1024,
        peak / 1024
    );
    match recovered {
        Some(t) => println!(
            "recovered                       in {:.2} s",
            t.as_secs_f64()
        ),
        None => println!("recovered                       no (120 s)"),
    }
    println!(
        "complete                        {} ({stored} stored of {acked} acknowledged)",
        if stored == acked { "yes" } else { "NO" }
    );
    if stored != acked {
        return Err(format!("{acked} spans acknowledged but {stored} stored"));
    }
    if recovered.is_none() {
        return Err("the server did not accept exports again within 120 s".into());
    }
    Ok(())
}
