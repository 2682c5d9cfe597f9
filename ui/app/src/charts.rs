//! SVG charts drawn by hand: sparklines for tables and line charts over time.

use leptos::prelude::*;

use crate::util::clock;

/// A tiny line of `values` (oldest first), scaled to its own maximum.
#[component]
pub fn Sparkline(
    values: Vec<f64>,
    #[prop(default = "#38bdf8")] color: &'static str,
) -> impl IntoView {
    let (w, h) = (72.0, 20.0);
    let max = values.iter().cloned().fold(0.0_f64, f64::max);
    let n = values.len();
    let points: Vec<(f64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = if n <= 1 {
                w / 2.0
            } else {
                i as f64 * w / (n - 1) as f64
            };
            let y = if max > 0.0 {
                h - 2.0 - v / max * (h - 4.0)
            } else {
                h - 2.0
            };
            (x, y)
        })
        .collect();
    let line = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    let area = if n > 1 {
        format!("0,{h} {line} {w},{h}")
    } else {
        String::new()
    };
    view! {
        <svg class="spark" viewBox=format!("0 0 {w} {h}") width=w height=h preserveAspectRatio="none">
            <polygon points=area fill=color fill-opacity="0.15" stroke="none"></polygon>
            <polyline points=line fill="none" stroke=color stroke-width="1.4" stroke-linejoin="round"></polyline>
        </svg>
    }
}

#[derive(Clone)]
pub struct Series {
    pub label: String,
    pub color: &'static str,
    /// `(epoch ms, value)`, in time order.
    pub points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    // Four grid steps of round values: 0.25, 0.5, 1, 1.5, 2, 2.5 × 10^k.
    for m in [1.0, 2.0, 4.0, 6.0, 8.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// A moment to mark on a chart over time: a policy change.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    /// Epoch ms.
    pub at: f64,
    /// Drawn at the top of the line (`v3`).
    pub label: String,
    /// Shown on hover: what changed, when, who.
    pub detail: String,
}

/// Marks closer than 8 units on the drawing made one: `(x, label, detail)`, the label
/// `v2` for one, `v1–v3` for several, the details of all on hover.
fn cluster(mut marks: Vec<Mark>, sx: impl Fn(f64) -> f64) -> Vec<(f64, String, String)> {
    marks.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut out: Vec<(f64, Vec<Mark>)> = Vec::new();
    for m in marks {
        let x = sx(m.at);
        match out.last_mut() {
            Some((x0, group)) if x - *x0 < 8.0 => group.push(m),
            _ => out.push((x, vec![m])),
        }
    }
    out.into_iter()
        .map(|(x, group)| {
            let label = match (group.first(), group.last()) {
                (Some(a), Some(b)) if group.len() > 1 => format!("{}–{}", a.label, b.label),
                (Some(a), _) => a.label.clone(),
                _ => String::new(),
            };
            let detail = group
                .iter()
                .rev()
                .map(|m| m.detail.as_str())
                .collect::<Vec<_>>()
                .join("\n\n");
            (x, label, detail)
        })
        .collect()
}

/// A line chart of one or more series over time, with a y axis in `fmt`'s unit, and
/// `marks` (policy changes) as dashed vertical lines where they fall within it.
#[component]
pub fn LineChart(
    title: String,
    series: Vec<Series>,
    fmt: fn(f64) -> String,
    #[prop(default = 200.0)] height: f64,
    /// The drawing's width in its own units; about the width it is shown at, so text
    /// keeps its size.
    #[prop(default = 480.0)]
    width: f64,
    #[prop(optional)] marks: Vec<Mark>,
) -> impl IntoView {
    let (w, h) = (width, height);
    let (l, r, t, b) = (56.0, 12.0, 10.0, 24.0);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    // The marks (asked for the page's range) widen the axis to take them in.
    let (x0, x1) = if x0 > x1 {
        (x0, x1)
    } else {
        marks
            .iter()
            .fold((x0, x1), |(a, b), m| (a.min(m.at), b.max(m.at)))
    };
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let empty = x0 > x1;
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let sx = move |x: f64| l + (x - x0) / span * (w - l - r);
    let sy = move |y: f64| t + (1.0 - y / ymax) * (h - t - b);
    let grid = (0..=4)
        .map(|i| {
            let v = ymax * i as f64 / 4.0;
            let y = sy(v);
            view! {
                <line x1=l x2=w - r y1=y y2=y class="grid"></line>
                <text x=l - 6.0 y=y + 4.0 text-anchor="end" class="axis">{fmt(v)}</text>
            }
        })
        .collect_view();
    let xticks = if empty {
        Vec::new()
    } else {
        (0..=4)
            .map(|i| {
                let x = x0 + span * i as f64 / 4.0;
                let label = clock(x);
                let label = label.get(..5).unwrap_or("").to_string();
                let anchor = match i {
                    0 => "start",
                    4 => "end",
                    _ => "middle",
                };
                view! { <text x=sx(x) y=h - 6.0 text-anchor=anchor class="axis">{label}</text> }
            })
            .collect::<Vec<_>>()
    };
    let lines = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let area = (i == 0 && s.points.len() > 1).then(|| {
                let first = sx(s.points[0].0);
                let last = sx(s.points[s.points.len() - 1].0);
                format!("{first:.1},{:.1} {} {last:.1},{:.1}", sy(0.0), pts.join(" "), sy(0.0))
            });
            let dots = (s.points.len() == 1).then(|| {
                let (x, y) = s.points[0];
                view! { <circle cx=sx(x) cy=sy(y) r="3" fill=s.color></circle> }
            });
            view! {
                {area.map(|a| view! { <polygon points=a fill=s.color fill-opacity="0.12"></polygon> })}
                <polyline points=pts.join(" ") fill="none" stroke=s.color stroke-width="2" stroke-linejoin="round"></polyline>
                {dots}
            }
        })
        .collect_view();
    let marks = cluster(if empty { Vec::new() } else { marks }, sx)
        .into_iter()
        .map(|(x, label, detail)| {
            // The label sits right of its line, or left of it near the right edge.
            let (lx, anchor) = if x > w - r - 40.0 {
                (x - 3.0, "end")
            } else {
                (x + 3.0, "start")
            };
            view! {
                <g class="mark" data-test="chart-mark">
                    <title>{detail}</title>
                    <line x1=x x2=x y1=t y2=h - b class="mark-line"></line>
                    <rect x=x - 3.0 y=t width="6" height=h - t - b class="mark-hit"></rect>
                    <text x=lx y=t + 9.0 text-anchor=anchor class="mark-label">{label}</text>
                </g>
            }
        })
        .collect_view();
    let legend = series
        .iter()
        .map(|s| {
            let style = format!("background:{}", s.color);
            view! { <span class="legend-item"><i style=style></i>{s.label.clone()}</span> }
        })
        .collect_view();
    view! {
        <div class="chart">
            <div class="chart-head"><span class="chart-title">{title}</span><span class="legend">{legend}</span></div>
            <svg viewBox=format!("0 0 {w} {h}") class="chart-svg">
                {grid}
                {xticks}
                {lines}
                {marks}
                {empty.then(|| view! { <text x=w / 2.0 y=h / 2.0 text-anchor="middle" class="axis">"no data in this range"</text> })}
            </svg>
        </div>
    }
}
