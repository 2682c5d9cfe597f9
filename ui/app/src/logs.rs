//! Log search over the `logs` table: service, minimum severity, text and trace id, kept in
//! the URL. A log that carries a trace id links to its trace.

use leptos::prelude::*;
use serde_json::Value;

use crate::state::{Range, tick, use_url};
use crate::traces::severity_class;
use crate::util::{self, f, lit, s, service_color};
use crate::{ErrorBox, InputField, Loading, SelectField, ServiceField, search_submit};

const FIELDS: [&str; 4] = ["service", "severity", "text", "trace_id"];

/// The severity filter's choices: a level and everything above it.
const SEVERITIES: &[(&str, &str)] = &[
    ("", "Any"),
    ("debug", "Debug and above"),
    ("info", "Info and above"),
    ("warn", "Warn and above"),
    ("error", "Error and above"),
    ("fatal", "Fatal"),
];

fn filters(
    range_sql: String,
    service: Option<String>,
    severity: Option<String>,
    text: Option<String>,
    trace_id: Option<String>,
) -> String {
    let mut w = vec![range_sql];
    if let Some(sv) = service {
        w.push(format!("service_name = {}", lit(&sv)));
    }
    if let Some(min) = severity.and_then(|s| match s.as_str() {
        "debug" => Some(5),
        "info" => Some(9),
        "warn" => Some(13),
        "error" => Some(17),
        "fatal" => Some(21),
        _ => None,
    }) {
        w.push(format!("severity_number >= {min}"));
    }
    if let Some(t) = text {
        w.push(format!("strpos(lower(body), lower({})) > 0", lit(&t)));
    }
    if let Some(t) = trace_id {
        w.push(format!("trace_id = {}", lit(&t.trim().to_lowercase())));
    }
    w.join(" AND ")
}

const BARS: usize = 60;

/// Log counts per time bucket, split into errors, warnings and the rest.
async fn volume(range: Range, filters: String) -> Result<Vec<[f64; 3]>, String> {
    let (a, b) = range.bounds();
    let bin_s = ((b - a) / 1000.0 / BARS as f64).max(1.0);
    let rows = util::sql_rows(format!(
        "SELECT CAST(floor((CAST(CAST(time AS BIGINT) AS DOUBLE) / 1e9 - {a0}) / {bin_s}) AS BIGINT) AS b,
                sum(CASE WHEN severity_number >= 17 THEN 1 ELSE 0 END) AS e,
                sum(CASE WHEN severity_number >= 13 AND severity_number < 17 THEN 1 ELSE 0 END) AS w,
                sum(CASE WHEN severity_number < 13 OR severity_number IS NULL THEN 1 ELSE 0 END) AS o
         FROM logs WHERE {filters} GROUP BY 1",
        a0 = a / 1000.0
    ))
    .await?;
    let mut out = vec![[0.0; 3]; BARS];
    for r in rows {
        let r = Value::Object(r);
        let i = f(&r, "b");
        if i >= 0.0 && (i as usize) < BARS {
            out[i as usize] = [f(&r, "e"), f(&r, "w"), f(&r, "o")];
        }
    }
    Ok(out)
}

#[component]
fn Volume(bars: Vec<[f64; 3]>, range: Range) -> impl IntoView {
    let (w, h) = (1200.0, 70.0);
    let max = bars
        .iter()
        .map(|b| b[0] + b[1] + b[2])
        .fold(0.0, f64::max)
        .max(1.0);
    let bw = w / BARS as f64;
    let rects = bars
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            let x = i as f64 * bw + 1.0;
            let mut y = h - 14.0;
            let mut out = Vec::new();
            for (k, color) in [(2usize, "#38bdf8"), (1, "#f59e0b"), (0, "#ef4444")] {
                let hh = b[k] / max * (h - 20.0);
                if hh > 0.0 {
                    y -= hh;
                    out.push(view! { <rect x=x y=y width=bw - 2.0 height=hh fill=color rx="1.5"></rect> });
                }
            }
            out
        })
        .collect_view();
    let (a, b) = range.bounds();
    view! {
        <div class="card volume">
            <svg viewBox=format!("0 0 {w} {h}") class="chart-svg">
                {rects}
                <text x="0" y=h - 2.0 class="axis">{util::clock(a)}</text>
                <text x=w y=h - 2.0 text-anchor="end" class="axis">{util::clock(b)}</text>
                <text x=w / 2.0 y=h - 2.0 text-anchor="middle" class="axis">{format!("log volume · peak {} per bar", max)}</text>
            </svg>
        </div>
    }
}

#[component]
pub fn LogsPage() -> impl IntoView {
    let url = use_url();
    let sigs: Vec<RwSignal<String>> = FIELDS
        .iter()
        .map(|k| RwSignal::new(url.get_untracked(k).unwrap_or_default()))
        .collect();
    let [service, severity, text, trace_id] = [sigs[0], sigs[1], sigs[2], sigs[3]];
    Effect::new(move |_| {
        for (k, sig) in FIELDS.iter().zip([service, severity, text, trace_id]) {
            sig.set(url.get(k).unwrap_or_default());
        }
    });
    let services = LocalResource::new(move || {
        let r = url.range();
        util::sql_rows(format!(
            "SELECT DISTINCT service_name FROM logs WHERE {} ORDER BY 1",
            r.sql("time")
        ))
    });
    let where_ = move || {
        filters(
            url.range().sql("time"),
            url.get("service"),
            url.get("severity"),
            url.get("text"),
            url.get("trace_id"),
        )
    };
    let results = LocalResource::new(move || {
        let q = format!(
            "SELECT time, severity_text, severity_number, service_name, body, trace_id, span_id FROM logs WHERE {} ORDER BY time DESC LIMIT 500",
            where_()
        );
        tick();
        util::sql_rows(q)
    });
    let histogram = LocalResource::new(move || {
        let (r, w) = (url.range(), where_());
        tick();
        async move { volume(r.clone(), w).await.map(|bars| (bars, r)) }
    });
    let submit = search_submit(url, FIELDS, [service, severity, text, trace_id]);
    let names = Signal::derive(move || {
        services
            .get()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .map(|r| s(&Value::Object(r), "service_name"))
            .collect()
    });
    view! {
        <div class="page">
            <div class="toolbar"><h1>"Logs"</h1></div>
            <form class="search-form card" on:submit=submit data-test="log-search">
                <ServiceField value=service names=names/>
                <SelectField label="Severity" name="severity" value=severity options=SEVERITIES/>
                <InputField label="Text" name="text" value=text kind="search" grow=true placeholder="contains…"/>
                <InputField label="Trace id" name="trace_id" value=trace_id grow=true mono=true placeholder="32 hex digits"/>
                <button class="btn primary" type="submit">"Search"</button>
            </form>
            {move || histogram.get().and_then(Result::ok).map(|(bars, r)| view! { <Volume bars=bars range=r/> })}
            {move || match results.get() {
                None => view! { <Loading/> }.into_any(),
                Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                Some(Ok(rows)) if rows.is_empty() => view! { <div class="empty"><h2>"No logs match"</h2><p>"Widen the time range or loosen the filters."</p></div> }.into_any(),
                Some(Ok(rows)) => view! {
                    <div class="muted small result-count">{format!("{} logs, newest first{}", rows.len(), if rows.len() == 500 { " (first 500)" } else { "" })}</div>
                    <div class="card log-list" data-test="log-results">
                        {rows.into_iter().map(|r| {
                            let r = Value::Object(r);
                            let sev = s(&r, "severity_text");
                            let tid = s(&r, "trace_id");
                            let svc = s(&r, "service_name");
                            let cls = format!("log-row sev-{}", severity_class(f(&r, "severity_number")));
                            view! {
                                <div class=cls data-service=svc.clone()>
                                    <span class="mono small muted time">{util::datetime(util::ts_ms(&r["time"]))}</span>
                                    <span class="sev">{if sev.is_empty() { "LOG".to_string() } else { sev }}</span>
                                    <span class="svc" style=format!("color:{}", service_color(&svc))>{svc.clone()}</span>
                                    <span class="body">{s(&r, "body")}</span>
                                    {(!tid.is_empty()).then(|| {
                                        let href = url.link(&format!("/traces/{tid}"), &[]);
                                        view! { <a class="trace-chip mono" href=href title="Open the trace">{format!("trace {}…", &tid[..tid.len().min(8)])}</a> }
                                    })}
                                </div>
                            }
                        }).collect_view()}
                    </div>
                }.into_any(),
            }}
        </div>
    }
}
