//! Settings in the real binary: each one a flag, a `MESHSCOPE_*` variable or a key of the
//! `--config` file, and the flag beats the variable, which beats the file. Each listener is
//! put on its own loopback address (127.0.0.2–4) so its log line says which source won.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_flag_beats_the_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("meshscope.toml");
    std::fs::write(
        &config,
        "otlp-grpc-addr = \"127.0.0.2:0\"\notlp-http-addr = \"127.0.0.2:0\"\n\
         http-addr = \"127.0.0.2:0\"\npg-addr = \"127.0.0.2:0\"\n",
    )
    .expect("config");
    let log = dir.path().join("serve.log");
    let mut child = Command::new(common::binary())
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--pg-addr", "127.0.0.4:0"])
        .env("MESHSCOPE_HTTP_ADDR", "127.0.0.3:0")
        .env("MESHSCOPE_PG_ADDR", "127.0.0.3:0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start meshscope");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(" ready") {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("meshscope exited with {status}:\n{text}");
        }
        assert!(Instant::now() < deadline, "not ready:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    for (what, from) in [
        ("OTLP/gRPC", "127.0.0.2"),              // the file
        ("OTLP/HTTP", "127.0.0.2"),              // the file
        ("HTTP API", "127.0.0.3"),               // the variable over the file
        ("Postgres wire protocol", "127.0.0.4"), // the flag over both
    ] {
        assert!(
            text.contains(&format!("{what} listening on {from}:")),
            "{what} should listen on {from}:\n{text}"
        );
    }
}
