//! Export of the topology as drawn: SVG (the drawing with the page's styles inside it),
//! PNG (that SVG rasterised on a canvas at twice its size) and JSON (the nodes and edges
//! shown).

use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::Closure;

use leptos::prelude::document;

use crate::util;

/// Every CSS rule of the page, so that the exported drawing looks as it does here.
fn page_css() -> String {
    let mut out = String::new();
    let sheets = document().style_sheets();
    for i in 0..sheets.length() {
        let Some(sheet) = sheets
            .item(i)
            .and_then(|s| s.dyn_into::<web_sys::CssStyleSheet>().ok())
        else {
            continue;
        };
        if let Ok(rules) = sheet.css_rules() {
            for j in 0..rules.length() {
                if let Some(r) = rules.item(j) {
                    out.push_str(&r.css_text());
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// The drawing (`svg.graph`) as a standalone SVG document, and its size.
pub fn svg_document() -> Option<(String, f64, f64)> {
    let svg = document().query_selector("svg.graph").ok()??;
    let copy: web_sys::Element = svg.clone_node_with_deep(true).ok()?.dyn_into().ok()?;
    let view_box = copy.get_attribute("viewBox")?;
    let dims: Vec<f64> = view_box
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let (w, h) = (*dims.get(2)?, *dims.get(3)?);
    let _ = copy.set_attribute("xmlns", "http://www.w3.org/2000/svg");
    let _ = copy.set_attribute("width", &format!("{w:.0}"));
    let _ = copy.set_attribute("height", &format!("{h:.0}"));
    // The whole mesh, whatever the pan and zoom.
    if let Ok(Some(v)) = copy.query_selector(".viewport") {
        let _ = v.remove_attribute("transform");
    }
    let style = document()
        .create_element_ns(Some("http://www.w3.org/2000/svg"), "style")
        .ok()?;
    style.set_text_content(Some(&format!(
        "{}\nsvg.graph {{ background: #0b1120; width: {w:.0}px; height: {h:.0}px; }}",
        page_css()
    )));
    let _ = copy.insert_before(&style, copy.first_child().as_ref());
    Some((copy.outer_html(), w, h))
}

pub fn save_svg() {
    if let Some((svg, _, _)) = svg_document() {
        util::download("meshscope-topology.svg", "image/svg+xml", &svg);
    }
}

/// Draws the SVG on a canvas (twice its size, for sharp text) and saves it as PNG.
pub fn save_png() {
    let Some((svg, w, h)) = svg_document() else {
        return;
    };
    let parts = js_sys::Array::of1(&svg.into());
    let opts = web_sys::BlobPropertyBag::new();
    opts.set_type("image/svg+xml");
    let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts) else {
        return;
    };
    let Ok(src) = web_sys::Url::create_object_url_with_blob(&blob) else {
        return;
    };
    let Ok(img) = web_sys::HtmlImageElement::new() else {
        return;
    };
    let img2 = img.clone();
    let src2 = src.clone();
    let onload = Closure::once_into_js(move || {
        let _ = web_sys::Url::revoke_object_url(&src2);
        let Some(canvas) = document()
            .create_element("canvas")
            .ok()
            .and_then(|c| c.dyn_into::<web_sys::HtmlCanvasElement>().ok())
        else {
            return;
        };
        canvas.set_width((w * 2.0) as u32);
        canvas.set_height((h * 2.0) as u32);
        let Some(ctx) = canvas
            .get_context("2d")
            .ok()
            .flatten()
            .and_then(|c| c.dyn_into::<web_sys::CanvasRenderingContext2d>().ok())
        else {
            return;
        };
        ctx.set_fill_style_str("#0b1120");
        ctx.fill_rect(0.0, 0.0, w * 2.0, h * 2.0);
        let _ =
            ctx.draw_image_with_html_image_element_and_dw_and_dh(&img2, 0.0, 0.0, w * 2.0, h * 2.0);
        let saved = Closure::once_into_js(move |blob: Option<web_sys::Blob>| {
            if let Some(b) = blob {
                util::download_blob("meshscope-topology.png", &b);
            }
        });
        let _ = canvas.to_blob(saved.unchecked_ref());
    });
    img.set_onload(Some(onload.unchecked_ref()));
    img.set_src(&src);
}

/// The nodes and edges shown, as the graph API answers them.
pub fn save_json(nodes: &[serde_json::Value], edges: &[serde_json::Value]) {
    let v = serde_json::json!({ "nodes": nodes, "edges": edges });
    util::download(
        "meshscope-topology.json",
        "application/json",
        &serde_json::to_string_pretty(&v).unwrap_or_default(),
    );
}
