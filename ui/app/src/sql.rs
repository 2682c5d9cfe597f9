//! The SQL console: an editor with the table schemas at hand, results as a table, a chart
//! when the result is a time series, CSV download and readable errors.

use std::collections::BTreeMap;

use leptos::prelude::*;
use serde_json::Value;

use crate::charts::{LineChart, Series};
use crate::state::{go, use_url};
use crate::util::{self, fmt_num, s, show};
use crate::{ErrorBox, Loading};

const DEFAULT: &str = "SELECT service_name, count(*) AS spans,
       approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) / 1e6 AS p99_ms
FROM spans
WHERE start_time > now() - INTERVAL '15 minutes'
GROUP BY service_name
ORDER BY spans DESC";

const COLORS: [&str; 5] = ["#38bdf8", "#f472b6", "#34d399", "#fbbf24", "#a78bfa"];

fn is_numeric(t: &str) -> bool {
    ["Int", "UInt", "Float", "Decimal"]
        .iter()
        .any(|p| t.starts_with(p))
}

fn csv(result: &Value) -> String {
    let esc = |v: String| {
        if v.contains([',', '"', '\n']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v
        }
    };
    let mut out = String::new();
    let cols: Vec<String> = result["columns"]
        .as_array()
        .map(|c| c.iter().map(|c| esc(s(c, "name"))).collect())
        .unwrap_or_default();
    out.push_str(&cols.join(","));
    out.push('\n');
    for r in result["rows"].as_array().cloned().unwrap_or_default() {
        let cells: Vec<String> = r
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|v| esc(if v.is_null() { String::new() } else { show(v) }))
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[component]
pub fn SqlPage() -> impl IntoView {
    let url = use_url();
    let editor = RwSignal::new(
        url.get_untracked("q")
            .unwrap_or_else(|| DEFAULT.to_string()),
    );
    let schema = LocalResource::new(|| {
        util::sql_rows(
            "SELECT table_name, column_name, data_type FROM information_schema.columns
             WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
                .to_string(),
        )
    });
    // The query that ran; results follow the URL so a link reproduces them.
    let ran = Memo::new(move |_| url.get("q"));
    let result = LocalResource::new(move || {
        let q = ran.get();
        async move {
            match q {
                Some(q) => {
                    let started = util::now_ms();
                    util::sql(q)
                        .await
                        .map(|v| Some((v, util::now_ms() - started)))
                }
                None => Ok(None),
            }
        }
    });
    let run = move || {
        let q = editor.get_untracked();
        if url.get_untracked("q").as_deref() == Some(q.as_str()) {
            result.refetch();
        } else {
            go(&url.with(&[("q", Some(q))]), false);
        }
    };
    let keydown = move |e: leptos::ev::KeyboardEvent| {
        if e.key() == "Enter" && (e.ctrl_key() || e.meta_key()) {
            e.prevent_default();
            run();
        }
    };
    let insert = move |text: String| {
        editor.update(|v| {
            if !v.ends_with(char::is_whitespace) && !v.is_empty() {
                v.push(' ');
            }
            v.push_str(&text);
        })
    };
    view! {
        <div class="page sql-page">
            <div class="toolbar"><h1>"SQL"</h1><span class="muted small">"Read-only SQL over spans, logs and metrics (DataFusion dialect). Ctrl+Enter runs."</span></div>
            <div class="sql-layout">
                <aside class="card schema" data-test="schema">
                    <h3>"Tables"</h3>
                    {move || match schema.get() {
                        None => view! { <Loading/> }.into_any(),
                        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                        Some(Ok(rows)) => {
                            let mut tables: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
                            for r in rows {
                                let r = Value::Object(r);
                                tables.entry(s(&r, "table_name")).or_default().push((s(&r, "column_name"), s(&r, "data_type")));
                            }
                            tables.into_iter().map(|(t, cols)| {
                                let t2 = t.clone();
                                view! {
                                    <details class="table-schema" open=t == "spans">
                                        <summary><span class="tname" on:click=move |_| insert(t2.clone())>{t.clone()}</span><span class="muted tiny">{format!(" {} columns", cols.len())}</span></summary>
                                        <ul>
                                            {cols.into_iter().map(|(c, ty)| {
                                                let c2 = c.clone();
                                                view! { <li on:click=move |_| insert(c2.clone())><span class="mono">{c}</span><span class="ty">{ty}</span></li> }
                                            }).collect_view()}
                                        </ul>
                                    </details>
                                }
                            }).collect_view().into_any()
                        }
                    }}
                </aside>
                <section class="sql-main">
                    <div class="card editor-card">
                        <textarea class="editor mono" data-test="sql-editor" spellcheck="false" rows="9"
                            prop:value=move || editor.get() on:input=move |e| editor.set(event_target_value(&e)) on:keydown=keydown></textarea>
                        <div class="editor-bar">
                            <button class="btn primary" data-test="run-sql" on:click=move |_| run()>"Run  ⌃↵"</button>
                            <div class="spacer"></div>
                            {move || match result.get() {
                                Some(Ok(Some((v, ms)))) => {
                                    let n = v["rows"].as_array().map(Vec::len).unwrap_or(0);
                                    let v2 = v.clone();
                                    view! {
                                        <span class="muted small">{format!("{n} rows in {ms:.0} ms")}</span>
                                        <button class="btn" on:click=move |_| util::download("meshscope-query.csv", "text/csv", &csv(&v2))>"Download CSV"</button>
                                    }.into_any()
                                }
                                _ => ().into_any(),
                            }}
                        </div>
                    </div>
                    {move || match result.get() {
                        None => view! { <Loading/> }.into_any(),
                        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                        Some(Ok(None)) => view! { <div class="empty small"><p>"Write a query and run it. Click a table or column on the left to insert its name."</p></div> }.into_any(),
                        Some(Ok(Some((v, _)))) => view! { <ResultView result=v/> }.into_any(),
                    }}
                </section>
            </div>
        </div>
    }
}

#[component]
fn ResultView(result: Value) -> impl IntoView {
    let cols: Vec<(String, String)> = result["columns"]
        .as_array()
        .map(|c| c.iter().map(|c| (s(c, "name"), s(c, "type"))).collect())
        .unwrap_or_default();
    let rows = result["rows"].as_array().cloned().unwrap_or_default();
    // A chart when there is a time column and at least one number column.
    let time_col = cols
        .iter()
        .position(|(_, t)| t.starts_with("Timestamp") || t.starts_with("Date"));
    let chart = time_col.and_then(|tc| {
        let nums: Vec<usize> = cols.iter().enumerate().filter(|(i, (_, t))| *i != tc && is_numeric(t)).map(|(i, _)| i).collect();
        if nums.is_empty() || rows.len() < 2 {
            return None;
        }
        let series = nums
            .iter()
            .take(COLORS.len())
            .enumerate()
            .map(|(k, &ci)| {
                let mut points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter_map(|r| {
                        let t = util::ts_ms(&r[tc]);
                        let v = r[ci].as_f64()?;
                        (t > 0.0).then_some((t, v))
                    })
                    .collect();
                points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
                Series { label: cols[ci].0.clone(), color: COLORS[k], points }
            })
            .collect::<Vec<_>>();
        Some(view! { <LineChart title=format!("{} over {}", cols[nums[0]].0, cols[tc].0) series=series fmt=fmt_num width=1100.0 height=240.0/> })
    });
    let numeric: Vec<bool> = cols.iter().map(|(_, t)| is_numeric(t)).collect();
    view! {
        {chart}
        <div class="card table-scroll">
            <table class="table results" data-test="sql-results">
                <thead><tr>{cols.iter().map(|(n, t)| view! { <th title=t.clone()>{n.clone()}<div class="ty">{t.clone()}</div></th> }).collect_view()}</tr></thead>
                <tbody>
                    {rows.into_iter().take(2000).map(|r| {
                        let cells = r.as_array().cloned().unwrap_or_default();
                        view! {
                            <tr>{cells.into_iter().enumerate().map(|(i, c)| {
                                let null = c.is_null();
                                let text = match &c {
                                    Value::Null => "NULL".to_string(),
                                    // Floats at six decimals at most (CSV keeps every digit).
                                    Value::Number(n) if n.is_f64() => {
                                        let t = format!("{:.6}", n.as_f64().unwrap_or(0.0));
                                        t.trim_end_matches('0').trim_end_matches('.').to_string()
                                    }
                                    other => show(other),
                                };
                                view! { <td class:num=numeric.get(i).copied().unwrap_or(false) class:null=null>{text}</td> }
                            }).collect_view()}</tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </div>
    }
}
