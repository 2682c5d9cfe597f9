//! Builds the web app in `app/` for `wasm32-unknown-unknown` (release, its own target dir),
//! runs wasm-bindgen on it (as a library) and leaves `index.html`, the JS glue, the wasm and
//! the stylesheet, each also gzipped, in `OUT_DIR` for `src/lib.rs` to embed.
//!
//! Installs the wasm target with rustup when it is missing. Re-runs only when the app's
//! sources change.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    if let Err(e) = run() {
        eprintln!("\nerror: building the meshscope web UI failed:\n{e}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let app = manifest.join("app");
    let out = PathBuf::from(env("OUT_DIR")?);
    for p in ["src", "Cargo.toml", "Cargo.lock", "index.html", "style.css"] {
        println!("cargo:rerun-if-changed={}", app.join(p).display());
    }
    // The topology's layout, a crate of its own the app builds from source.
    for p in ["layout/src", "layout/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", manifest.join(p).display());
    }

    ensure_wasm_target()?;

    // A target dir of its own (beside the workspace's profile dirs, so debug, test and
    // clippy builds share it), never the one the outer cargo holds locked.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("ui-wasm"))
        .unwrap_or_else(|| out.join("ui-wasm"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&app)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    scrub_env(&mut cmd);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo for the web app: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build --release --target {TARGET}` in {} failed ({status})",
            app.display()
        ));
    }
    let wasm = target_dir
        .join(TARGET)
        .join("release")
        .join("meshscope-ui-app.wasm");
    let wasm = if wasm.exists() {
        wasm
    } else {
        target_dir
            .join(TARGET)
            .join("release")
            .join("meshscope_ui_app.wasm")
    };

    let bindgen_out = out.join("bindgen");
    let _ = std::fs::remove_dir_all(&bindgen_out);
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&wasm)
        .web(true)
        .map_err(|e| e.to_string())?
        .typescript(false)
        .out_name("app")
        .generate(&bindgen_out)
        .map_err(|e| format!("wasm-bindgen on {}: {e}", wasm.display()))?;

    let js = read(&bindgen_out.join("app.js"))?;
    let wasm_bytes = read(&bindgen_out.join("app_bg.wasm"))?;
    let css = read(&app.join("style.css"))?;
    // Content-hashed names, so browsers may cache the assets forever.
    let tag = format!("{:016x}", fnv(&[&js, &wasm_bytes, &css]));
    let html = String::from_utf8(read(&app.join("index.html"))?)
        .map_err(|e| format!("index.html: {e}"))?
        .replace("{TAG}", &tag);

    write_asset(&out, "index.html", html.as_bytes())?;
    write_asset(&out, "app.js", &js)?;
    write_asset(&out, "app_bg.wasm", &wasm_bytes)?;
    write_asset(&out, "style.css", &css)?;
    std::fs::write(out.join("tag.txt"), &tag).map_err(|e| e.to_string())?;
    Ok(())
}

fn env(k: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| format!("{k} is not set (run through cargo)"))
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn write_asset(out: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    std::fs::write(out.join(name), bytes).map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).map_err(|e| e.to_string())?;
    let gz = gz.finish().map_err(|e| e.to_string())?;
    std::fs::write(out.join(format!("{name}.gz")), gz).map_err(|e| e.to_string())
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Adds the wasm target with rustup when the sysroot lacks it.
fn ensure_wasm_target() -> Result<(), String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run {rustc}: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let lib = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib");
    if lib.is_dir() {
        return Ok(());
    }
    println!("cargo:warning=installing the {TARGET} target with rustup (first build only)");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map_err(|e| {
            format!(
                "the Rust target {TARGET} is missing and rustup could not be run ({e}).\n\
                 Install it with `rustup target add {TARGET}` (or your distribution's \
                 rust-std for {TARGET}) and build again."
            )
        })?;
    if !status.success() {
        return Err(format!(
            "`rustup target add {TARGET}` failed ({status}); run it by hand and build again."
        ));
    }
    Ok(())
}

/// The outer cargo's per-build variables must not leak into the nested build.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let keep = k == "CARGO_HOME"
            || k.starts_with("CARGO_NET_")
            || k.starts_with("CARGO_HTTP_")
            || k.starts_with("CARGO_REGISTRIES_")
            || k.starts_with("CARGO_REGISTRY_");
        let drop = (k.starts_with("CARGO_") && !keep)
            || matches!(
                k,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "RUSTC_LINKER"
            );
        if drop {
            cmd.env_remove(k);
        }
    }
}
