//! The live tap (`/tap`): each request span as it is ingested, streamed from
//! `GET /api/v1/tap` (Server-Sent Events read through `fetch`, so the API token goes in a
//! header as for every other call), newest first, with filters kept in the URL, pause,
//! and a click through to the trace.

use std::collections::VecDeque;

use leptos::prelude::*;
use serde_json::Value;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::data_table;
use crate::state::{go, use_url};
use crate::util::{self, enc, f, fmt_ms, s};

/// Rows kept on the page; older ones scroll away.
const KEEP: usize = 500;

/// The filters the page passes on to the API (and keeps in its URL).
const FILTERS: [(&str, &str); 5] = [
    ("service", "Service"),
    ("peer", "Peer"),
    ("path_prefix", "Path prefix"),
    ("method", "Method"),
    ("status", "Status (503, 5xx, error)"),
];

/// Splits Server-Sent Events bytes into `(event, data)` pairs; what is left over waits for
/// the next chunk (blocks end at a blank line, so a UTF-8 character is never cut).
fn take_events(buf: &mut Vec<u8>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let raw: Vec<u8> = buf.drain(..end + 2).collect();
        let block = String::from_utf8_lossy(&raw);
        let (mut event, mut data) = (String::new(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !event.is_empty() {
            out.push((event, data));
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Connecting,
    Live,
    Ended,
}

/// Reads the tap until it ends or `abort` fires, handing each event to `on_event`.
async fn follow(
    url: String,
    abort: web_sys::AbortSignal,
    on_event: impl Fn(&str, &str),
) -> Result<(), String> {
    let mut req = gloo_net::http::Request::get(&url).abort_signal(Some(&abort));
    if let Some(t) = util::token() {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach meshscope: {e}"))?;
    if resp.status() == 401 {
        util::needs_token().set(true);
    }
    if !resp.ok() {
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(format!("HTTP {}: {msg}", resp.status()));
    }
    let body = resp.body().ok_or("the tap answered without a body")?;
    let reader: web_sys::ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| "the tap's body cannot be read as a stream".to_string())?;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = match JsFuture::from(reader.read()).await {
            Ok(c) => c,
            // Aborted (the page left or the filters changed) or the connection broke.
            Err(_) => return Ok(()),
        };
        let done = js_sys::Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return Ok(());
        }
        let value = js_sys::Reflect::get(&chunk, &"value".into()).unwrap_or_default();
        buf.extend(js_sys::Uint8Array::new(&value).to_vec());
        for (event, data) in take_events(&mut buf) {
            on_event(&event, &data);
        }
    }
}

thread_local! {
    /// The open tap's request, aborted when the filters change or the page goes. Kept
    /// outside the reactive arena: cleanup runs while the page's owner is disposed, when
    /// its stored values may be gone already.
    static STREAM: std::cell::RefCell<Option<web_sys::AbortController>> = const { std::cell::RefCell::new(None) };
}

#[component]
pub fn TapPage() -> impl IntoView {
    let url = use_url();
    let rows: RwSignal<VecDeque<Value>> = RwSignal::new(VecDeque::new());
    let paused = RwSignal::new(false);
    let held = RwSignal::new(0usize);
    let seen = RwSignal::new(0u64);
    let status = RwSignal::new(Status::Connecting);
    let error = RwSignal::new(None::<String>);
    let stop = || {
        if let Some(c) = STREAM.with(|s| s.borrow_mut().take()) {
            c.abort();
        }
    };
    // (Re)connects whenever the filters change.
    Effect::new(move |_| {
        // Leaving the page changes the URL before the page is gone: no new tap for it.
        if url.path.get() != "/tap" {
            stop();
            return;
        }
        let mut q: Vec<String> = Vec::new();
        for (k, _) in FILTERS {
            if let Some(v) = url.get(k) {
                q.push(format!("{k}={}", enc(&v)));
            }
        }
        stop();
        let Ok(c) = web_sys::AbortController::new() else {
            error.set(Some("this browser cannot cancel requests".into()));
            return;
        };
        let signal = c.signal();
        STREAM.with(|s| *s.borrow_mut() = Some(c));
        rows.set(VecDeque::new());
        seen.set(0);
        error.set(None);
        status.set(Status::Connecting);
        let api = format!("/api/v1/tap?{}", q.join("&"));
        wasm_bindgen_futures::spawn_local(async move {
            status.set(Status::Live);
            let r = follow(api, signal, move |event, data| {
                if event != "span" {
                    return;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    return;
                };
                seen.update(|n| *n += 1);
                if paused.get_untracked() {
                    held.update(|n| *n += 1);
                    return;
                }
                rows.update(|r| {
                    r.push_front(v);
                    r.truncate(KEEP);
                });
            })
            .await;
            if let Err(e) = r {
                error.set(Some(e));
            }
            status.set(Status::Ended);
        });
    });
    // A full navigation may keep the page in the back/forward cache with its stream open.
    let hidden = window_event_listener_untyped("pagehide", move |_| stop());
    on_cleanup(move || {
        hidden.remove();
        stop();
    });

    let filters = FILTERS
        .into_iter()
        .map(|(k, label)| {
            view! {
                <label class="field">
                    <span>{label}</span>
                    <input type="text" data-test=format!("tap-{k}") prop:value=move || url.get(k).unwrap_or_default()
                        on:change=move |e| go(&url.with(&[(k, Some(event_target_value(&e)))]), true)/>
                </label>
            }
        })
        .collect_view();
    let toggle = move |_| {
        paused.update(|p| *p = !*p);
        if !paused.get_untracked() {
            held.set(0);
        }
    };
    let table = move || {
        let list = rows.get();
        if list.is_empty() {
            return view! {
                <div class="empty" data-test="tap-waiting">
                    <h2>"Waiting for requests…"</h2>
                    <p>"Each request span appears here as meshscope ingests it."</p>
                </div>
            }
            .into_any();
        }
        let head = view! {
            <th>"Time"</th><th>"From"</th><th>"To"</th><th>"Kind"</th><th>"Request"</th><th>"Status"</th><th>"Latency"</th><th>"Trace"</th>
        }
        .into_any();
        data_table("table tap-table", "tap-rows", head, list, |e| {
            let server = matches!(s(&e, "kind").as_str(), "SERVER" | "CONSUMER");
            let peer = e["peer"].as_str().unwrap_or("?").to_string();
            let (from, to) = if server {
                (peer, s(&e, "service"))
            } else {
                (s(&e, "service"), peer)
            };
            let code = e["status"].as_i64();
            let bad = code.is_some_and(|c| c >= 500) || s(&e, "span_status") == "ERROR";
            let trace = s(&e, "trace_id");
            let href = url.link(&format!("/traces/{trace}"), &[]);
            let time = s(&e, "time");
            view! {
                <tr class:bad=bad data-test="tap-row">
                    <td class="mono">{time.get(11..23).unwrap_or(&time).to_string()}</td>
                    <td>{from}</td>
                    <td>{to}</td>
                    <td class="muted">{s(&e, "kind")}</td>
                    <td class="mono">{format!("{} {}", e["method"].as_str().unwrap_or("-"), e["path"].as_str().unwrap_or("-"))}</td>
                    <td class=if bad { "bad" } else { "" }>{code.map(|c| c.to_string()).unwrap_or_else(|| s(&e, "span_status"))}</td>
                    <td>{fmt_ms(f(&e, "duration_ms"))}</td>
                    <td><a class="mono" href=href>{trace.get(..12).unwrap_or(&trace).to_string()}"…"</a></td>
                </tr>
            }
            .into_any()
        })
    };
    view! {
        <div class="page tap-page">
            <div class="toolbar">
                <h1>"Live tap"</h1>
                {filters}
                <button class="btn" data-test="tap-pause" on:click=toggle>
                    {move || if paused.get() { format!("Resume ({} held)", held.get()) } else { "Pause".to_string() }}
                </button>
                <button class="btn ghost" on:click=move |_| rows.set(VecDeque::new())>"Clear"</button>
                <span class="muted small" data-test="tap-state">
                    {move || match status.get() {
                        Status::Connecting => "connecting…".to_string(),
                        Status::Live => format!("live · {} requests", seen.get()),
                        Status::Ended => format!("ended · {} requests", seen.get()),
                    }}
                </span>
            </div>
            {move || error.get().map(|e| view! { <crate::ErrorBox msg=e/> })}
            {table}
        </div>
    }
}
