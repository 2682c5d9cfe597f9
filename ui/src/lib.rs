//! The meshscope web UI, embedded in the binary.
//!
//! `build.rs` compiles the Leptos app in `app/` to wasm and runs wasm-bindgen on it; this
//! crate embeds the result (`index.html`, the JS glue, the wasm, the stylesheet, each also
//! gzipped) and serves it with [`router`]: `/` and every client route answer `index.html`
//! (the app routes in the browser), `/assets/<name>-<hash>.<ext>` the assets, cached for a
//! year since the name changes with the content.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The content hash in the assets' names.
pub const TAG: &str = include_str!(concat!(env!("OUT_DIR"), "/tag.txt"));

struct Asset {
    name: &'static str,
    content_type: &'static str,
    plain: &'static [u8],
    gzip: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ct:literal) => {
        Asset {
            name: $name,
            content_type: $ct,
            plain: include_bytes!(concat!(env!("OUT_DIR"), "/", $name)),
            gzip: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".gz")),
        }
    };
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static ASSETS: [Asset; 3] = [
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app_bg.wasm", "application/wasm"),
    asset!("style.css", "text/css; charset=utf-8"),
];

/// `/` and `/assets/{file}`, plus [`index`] as the fallback for client-side routes. Merge
/// it after the API routes so they take precedence.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .fallback(fallback)
}

/// Client routes get the app; unknown API paths and non-GET requests a plain 404.
async fn fallback(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path();
    if method != axum::http::Method::GET
        || path.starts_with("/api/")
        || path.starts_with("/assets/")
    {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    serve(&INDEX, &headers, "no-cache")
}

/// `index.html`: the app's shell, never cached (it names the current assets).
pub async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers, "no-cache")
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    // `app-<tag>.js` → `app.js`; an old tag is a miss, not a stale file.
    let wanted = ASSETS.iter().find(|a| {
        let (stem, ext) = a.name.split_once('.').unwrap_or((a.name, ""));
        file == format!("{stem}-{}.{ext}", TAG.trim())
    });
    match wanted {
        Some(a) => serve(a, &headers, "public, max-age=31536000, immutable"),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

fn serve(a: &Asset, headers: &HeaderMap, cache: &'static str) -> Response {
    let gzip_ok = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut resp = if gzip_ok {
        let mut r = a.gzip.into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        a.plain.into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_the_hashed_assets() {
        let html = std::str::from_utf8(INDEX.plain).expect("index.html is UTF-8");
        assert!(html.contains(&format!("/assets/app-{}.js", TAG.trim())));
        assert!(html.contains(&format!("/assets/style-{}.css", TAG.trim())));
        // The wasm starts with its magic number.
        assert_eq!(&ASSETS[1].plain[..4], b"\0asm");
    }
}
