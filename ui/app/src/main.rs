//! meshscope's web UI: a client-side Leptos app.
//!
//! Layout: `state` (time range, auto-refresh and filters kept in the URL), `util` (API
//! calls, formatting), `charts` (SVG sparklines and line charts), and one module per page:
//! `topology`, `services`, `traces`, `logs`, `security`, `tap`, `mesh`, `alerts`, `sql`.

mod alerts;
mod charts;
mod export;
mod logs;
mod mesh;
mod security;
mod services;
mod sql;
mod state;
mod tap;
mod topology;
mod traces;
mod util;

use std::time::Duration;

use leptos::prelude::*;
use leptos_router::components::{A, Route, Router, Routes};
use leptos_router::path;
use serde_json::Value;

use state::{PRESETS, Tick, go, use_url};

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    provide_context(Tick(RwSignal::new(0)));
    view! {
        <Router>
            <Shell/>
        </Router>
    }
}

#[component]
fn Shell() -> impl IntoView {
    state::install_navigate();
    view! {
        <TopBar/>
        <TokenPrompt/>
        <main>
            <Routes fallback=|| view! { <div class="page"><h1>"Not found"</h1></div> }>
                <Route path=path!("/") view=topology::TopologyPage/>
                <Route path=path!("/services") view=services::ServicesPage/>
                <Route path=path!("/services/:name") view=services::ServicePage/>
                <Route path=path!("/traces") view=traces::TracesPage/>
                <Route path=path!("/traces/:id") view=traces::TracePage/>
                <Route path=path!("/logs") view=logs::LogsPage/>
                <Route path=path!("/security") view=security::SecurityPage/>
                <Route path=path!("/tap") view=tap::TapPage/>
                <Route path=path!("/mesh") view=mesh::MeshPage/>
                <Route path=path!("/alerts") view=alerts::AlertsPage/>
                <Route path=path!("/sql") view=sql::SqlPage/>
            </Routes>
        </main>
    }
}

/// Asked once when the server wants a token (started with `--auth-file`): a token with the
/// `read` scope, kept in the tab's session storage and sent with every API call.
#[component]
fn TokenPrompt() -> impl IntoView {
    let needs = util::needs_token();
    let tick = expect_context::<Tick>().0;
    let value = RwSignal::new(String::new());
    let submit = move || {
        let t = value.get_untracked();
        if t.trim().is_empty() {
            return;
        }
        util::set_token(&t);
        value.set(String::new());
        needs.set(false);
        tick.update(|t| *t += 1);
    };
    view! {
        <Show when=move || needs.get()>
            <div class="token-prompt" data-test="token-prompt">
                <form on:submit=move |ev| { ev.prevent_default(); submit(); }>
                    <label for="token-input">
                        {move || if util::token().is_some() {
                            "That token was refused. API token (read scope):"
                        } else {
                            "This meshscope asks for an API token (read scope):"
                        }}
                    </label>
                    <input id="token-input" type="password" autocomplete="off"
                        prop:value=move || value.get()
                        on:input=move |ev| value.set(event_target_value(&ev))/>
                    <button id="token-submit" type="submit">"Use token"</button>
                    <span class="muted">"Kept in this tab's session storage only."</span>
                </form>
            </div>
        </Show>
    }
}

#[component]
fn TopBar() -> impl IntoView {
    let url = use_url();
    let tick = expect_context::<Tick>().0;
    let updated = RwSignal::new(util::now_ms());
    Effect::new(move |_| {
        tick.track();
        url.query.track();
        updated.set(util::now_ms());
    });

    // Auto-refresh: one interval, replaced whenever `refresh` changes.
    let handle: StoredValue<Option<IntervalHandle>, LocalStorage> = StoredValue::new_local(None);
    Effect::new(move |_| {
        let every = match url.get("refresh").as_deref() {
            Some("5s") => Some(5),
            Some("10s") => Some(10),
            Some("30s") => Some(30),
            Some("1m") => Some(60),
            _ => None,
        };
        if let Some(h) = handle.get_value() {
            h.clear();
        }
        let h = every.and_then(|s| {
            set_interval_with_handle(move || tick.update(|t| *t += 1), Duration::from_secs(s)).ok()
        });
        handle.set_value(h);
    });

    let nav = move |path: &'static str, label: &'static str| {
        let active = move || {
            let p = url.path.get();
            if path == "/" {
                p == "/"
            } else {
                p.starts_with(path)
            }
        };
        view! { <A href=move || url.link(path, &[]) attr:class=move || if active() { "nav-link active" } else { "nav-link" }>{label}</A> }
    };
    let preset = move || url.range().preset;
    let custom = move || preset() == "custom";
    let from = RwSignal::new(String::new());
    let to = RwSignal::new(String::new());
    let go_custom = move |a: f64, b: f64| {
        go(
            &url.with(&[
                ("range", Some("custom".into())),
                ("from", Some(util::iso(a))),
                ("to", Some(util::iso(b))),
            ]),
            false,
        );
    };
    let pick = move |p: &'static str| {
        if p == "custom" {
            let (a, b) = url.range().bounds();
            from.set(util::iso(a)[..16].to_string());
            to.set(util::iso(b)[..16].to_string());
            go_custom(a, b);
        } else {
            go(
                &url.with(&[("range", Some(p.into())), ("from", None), ("to", None)]),
                false,
            );
        }
    };
    let apply_custom = move |_| {
        let a = js_sys::Date::parse(&format!("{}:00Z", from.get_untracked()));
        let b = js_sys::Date::parse(&format!("{}:00Z", to.get_untracked()));
        if !a.is_nan() && !b.is_nan() && a < b {
            go_custom(a, b);
        }
    };
    Effect::new(move |_| {
        if custom()
            && let (Some(a), Some(b)) = (url.get("from"), url.get("to"))
        {
            from.set(a.get(..16).unwrap_or("").to_string());
            to.set(b.get(..16).unwrap_or("").to_string());
        }
    });
    let presets = PRESETS
        .iter()
        .map(|(k, _)| *k)
        .chain(["custom"])
        .map(|p| {
            let label = if p == "custom" { "Custom".to_string() } else { format!("Last {p}") };
            view! {
                <button class=move || if preset() == p { "seg active" } else { "seg" } data-range=p on:click=move |_| pick(p)>{label}</button>
            }
        })
        .collect_view();
    view! {
        <header class="topbar">
            <a class="brand" href="/">
                <svg viewBox="0 0 24 24" width="22" height="22" class="brand-mark">
                    <circle cx="5" cy="12" r="3"></circle>
                    <circle cx="19" cy="5" r="3"></circle>
                    <circle cx="19" cy="19" r="3"></circle>
                    <path d="M8 12 L16 6 M8 12 L16 18" fill="none" stroke-width="1.6"></path>
                </svg>
                <span>"meshscope"</span>
            </a>
            <nav>
                {nav("/", "Topology")}
                {nav("/services", "Services")}
                {nav("/traces", "Traces")}
                {nav("/logs", "Logs")}
                {nav("/security", "Security")}
                {nav("/tap", "Tap")}
                {nav("/mesh", "Mesh")}
                {nav("/alerts", "Alerts")}
                {nav("/sql", "SQL")}
            </nav>
            <div class="spacer"></div>
            <div class="timebar">
                <div class="segmented">{presets}</div>
                <Show when=custom>
                    <span class="custom-range">
                        <input type="datetime-local" prop:value=move || from.get() on:input=move |e| from.set(event_target_value(&e))/>
                        <span class="muted">"→"</span>
                        <input type="datetime-local" prop:value=move || to.get() on:input=move |e| to.set(event_target_value(&e))/>
                        <span class="muted small">"UTC"</span>
                        <button class="btn small" on:click=apply_custom>"Apply"</button>
                    </span>
                </Show>
                <select class="refresh" title="Auto-refresh"
                    prop:value=move || url.get("refresh").unwrap_or_else(|| "off".into())
                    on:change=move |e| {
                        let v = event_target_value(&e);
                        go(&url.with(&[("refresh", (v != "off").then_some(v))]), true);
                    }>
                    <option value="off">"Auto-refresh off"</option>
                    <option value="5s">"Every 5 s"</option>
                    <option value="10s">"Every 10 s"</option>
                    <option value="30s">"Every 30 s"</option>
                    <option value="1m">"Every 1 min"</option>
                </select>
                <button class="btn icon" title="Refresh now" on:click=move |_| tick.update(|t| *t += 1)>"⟳"</button>
                <span class="updated muted small">{move || format!("updated {} UTC", util::clock(updated.get()))}</span>
            </div>
        </header>
    }
}

/// A fetched JSON answer as a view: the spinner while it loads, the API's error, or `show`.
pub fn fetched(res: Option<Result<Value, String>>, show: impl FnOnce(Value) -> AnyView) -> AnyView {
    match res {
        None => view! { <Loading/> }.into_any(),
        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
        Some(Ok(v)) => show(v),
    }
}

/// A fetched JSON list as a view: as [`fetched`], and a small empty-state box (`title`, `hint`)
/// when the list has no items.
pub fn fetched_list(
    res: Option<Result<Value, String>>,
    (title, hint): (&'static str, &'static str),
    show: impl FnOnce(Vec<Value>) -> AnyView,
) -> AnyView {
    fetched(res, |v| {
        let list = v.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            view! { <div class="empty small-empty"><h2>{title}</h2><p>{hint}</p></div> }.into_any()
        } else {
            show(list)
        }
    })
}

/// A search form's submit handler: the URL takes each field's current value (so the search
/// is a link, and back and forward work).
pub fn search_submit<const N: usize>(
    url: state::Url,
    fields: [&'static str; N],
    values: [RwSignal<String>; N],
) -> impl Fn(leptos::ev::SubmitEvent) + Copy + 'static {
    move |ev| {
        ev.prevent_default();
        let updates: Vec<(&str, Option<String>)> = fields
            .iter()
            .zip(values)
            .map(|(k, v)| (*k, Some(v.get_untracked())))
            .collect();
        go(&url.with(&updates), false);
    }
}

/// A search form's "Service" select, bound to `value`, offering `names`.
#[component]
pub fn ServiceField(
    value: RwSignal<String>,
    #[prop(into)] names: Signal<Vec<String>>,
) -> impl IntoView {
    view! {
        <label class="field">
            <span>"Service"</span>
            <select name="service" prop:value=move || value.get() on:change=move |e| value.set(event_target_value(&e))>
                <option value="">"Any service"</option>
                {move || names.get().into_iter().map(|n| {
                    let m = n.clone();
                    view! { <option value=n.clone() selected=move || value.get() == m>{n.clone()}</option> }
                }).collect_view()}
            </select>
        </label>
    }
}

/// A search form's labelled select bound to `value`: `options` as (value, label) pairs.
#[component]
pub fn SelectField(
    label: &'static str,
    name: &'static str,
    value: RwSignal<String>,
    options: &'static [(&'static str, &'static str)],
) -> impl IntoView {
    view! {
        <label class="field">
            <span>{label}</span>
            <select name=name prop:value=move || value.get() on:change=move |e| value.set(event_target_value(&e))>
                {options.iter().map(|&(v, l)| view! { <option value=v selected=move || value.get() == v>{l}</option> }).collect_view()}
            </select>
        </label>
    }
}

/// A search form's labelled text (or, with `kind`, number or search) input bound to `value`.
#[component]
pub fn InputField(
    label: &'static str,
    name: &'static str,
    value: RwSignal<String>,
    #[prop(optional)] placeholder: &'static str,
    #[prop(optional)] kind: Option<&'static str>,
    #[prop(optional)] min: Option<&'static str>,
    #[prop(optional)] max: Option<&'static str>,
    #[prop(optional)] grow: bool,
    #[prop(optional)] mono: bool,
) -> impl IntoView {
    view! {
        <label class=if grow { "field grow" } else { "field" }>
            <span>{label}</span>
            <input name=name type=kind min=min max=max class=if mono { "mono" } else { "" } placeholder=placeholder
                prop:value=move || value.get() on:input=move |e| value.set(event_target_value(&e))/>
        </label>
    }
}

/// A data table: its class and `data-test` name (none when empty), the header row's cells,
/// and one row per item.
pub fn data_table<T>(
    class: &'static str,
    test: &'static str,
    head: AnyView,
    items: impl IntoIterator<Item = T>,
    row: impl FnMut(T) -> AnyView,
) -> AnyView {
    let rows = items.into_iter().map(row).collect_view();
    view! {
        <table class=class data-test=(!test.is_empty()).then_some(test)>
            <thead><tr>{head}</tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
    .into_any()
}

/// A loading placeholder.
#[component]
pub fn Loading() -> impl IntoView {
    view! { <div class="loading"><span class="spinner"></span>"Loading…"</div> }
}

/// An error box with the API's message.
#[component]
pub fn ErrorBox(msg: String) -> impl IntoView {
    view! { <div class="error-box"><strong>"Error"</strong><pre>{msg}</pre></div> }
}

/// A number tile.
#[component]
pub fn Kpi(
    label: &'static str,
    value: String,
    #[prop(optional)] class: &'static str,
) -> impl IntoView {
    view! { <div class=format!("kpi {class}")><div class="kpi-label">{label}</div><div class="kpi-value">{value}</div></div> }
}
