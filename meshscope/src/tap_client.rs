//! `meshscope tap`: follows `GET /api/v1/tap` (Server-Sent Events) and prints one line per
//! request span, like `linkerd viz tap`.

use serde::Deserialize;

use crate::config::{TapArgs, TapFormat};

/// The fields of a tap event the text format prints (the API's `TapEvent`).
#[derive(Debug, Deserialize)]
struct Event {
    time: String,
    trace_id: String,
    service: String,
    peer: Option<String>,
    kind: String,
    method: Option<String>,
    path: Option<String>,
    status: Option<i32>,
    span_status: String,
    duration_ms: f64,
}

/// `time  caller → callee  kind  method path  status  latency  trace=…`.
fn line(e: &Event) -> String {
    let peer = e.peer.as_deref().unwrap_or("?");
    let (from, to) = match e.kind.as_str() {
        "SERVER" | "CONSUMER" => (peer, e.service.as_str()),
        _ => (e.service.as_str(), peer),
    };
    let status = match (e.status, e.span_status.as_str()) {
        (Some(s), _) => s.to_string(),
        (None, "ERROR") => "error".into(),
        (None, _) => "-".into(),
    };
    format!(
        "{time}  {from} → {to}  {kind:<8} {method} {path}  :status={status}  latency={ms}ms  trace={trace}",
        time = e.time,
        kind = e.kind,
        method = e.method.as_deref().unwrap_or("-"),
        path = e.path.as_deref().unwrap_or("-"),
        ms = e.duration_ms,
        trace = e.trace_id,
    )
}

/// Splits a Server-Sent Events byte stream into `(event, data)` pairs.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: String,
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8], mut out: impl FnMut(&str, &str)) {
        self.buf.extend_from_slice(chunk);
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    out(&self.event, &self.data);
                }
                self.event.clear();
                self.data.clear();
            } else if let Some(v) = text.strip_prefix("event:") {
                self.event = v.trim_start().to_string();
            } else if let Some(v) = text.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
            // `:` comments (keep-alives) and other fields are skipped.
        }
    }
}

pub async fn run(args: TapArgs) -> Result<(), String> {
    let url = format!("{}/api/v1/tap", args.client.server.trim_end_matches('/'));
    let mut query: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("service", &args.service),
        ("peer", &args.peer),
        ("path_prefix", &args.path_prefix),
        ("method", &args.method),
        ("status", &args.status),
    ] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    if let Some(l) = args.limit {
        query.push(("limit", l.to_string()));
    }
    let full = reqwest::Url::parse_with_params(&url, &query)
        .map_err(|e| format!("{url} is not a URL: {e}"))?;
    let mut request = reqwest::Client::new()
        .get(full)
        .header("accept", "text/event-stream");
    if let Some(token) = &args.client.token {
        request = request.bearer_auth(token);
    }
    let mut resp = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.bytes().await.unwrap_or_default();
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(format!("{msg} (HTTP {})", status.as_u16()));
    }
    eprintln!("tapping {url}; Ctrl-C to stop");
    let mut parser = SseParser::default();
    let mut failure = None;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("the tap stream broke: {e}"))?
    {
        parser.feed(&chunk, |event, data| match (event, args.format) {
            ("span", TapFormat::Json) => println!("{data}"),
            ("span", TapFormat::Text) => match serde_json::from_str::<Event>(data) {
                Ok(e) => println!("{}", line(&e)),
                Err(e) => failure = Some(format!("unreadable tap event {data:?}: {e}")),
            },
            ("end", _) => eprintln!("tap ended: {data}"),
            _ => {}
        });
        if let Some(f) = failure.take() {
            return Err(f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_keepalives() {
        let mut p = SseParser::default();
        let mut seen = Vec::new();
        let stream = b": keep-alive\n\nevent: span\ndata: {\"a\":1}\n\nevent: end\r\ndata: {\"events\":1}\r\n\r\n";
        for chunk in stream.chunks(7) {
            p.feed(chunk, |e, d| seen.push((e.to_string(), d.to_string())));
        }
        assert_eq!(
            seen,
            vec![
                ("span".to_string(), "{\"a\":1}".to_string()),
                ("end".to_string(), "{\"events\":1}".to_string())
            ]
        );
    }

    #[test]
    fn a_line_reads_caller_to_callee() {
        let e: Event = serde_json::from_str(
            r#"{"time":"2026-12-02T05:00:00Z","trace_id":"ab","span_id":"cd","service":"cart","peer":"frontend","kind":"SERVER","method":"GET","path":"/cart","status":200,"span_status":"UNSET","duration_ms":1.5}"#,
        )
        .unwrap();
        assert_eq!(
            line(&e),
            "2026-12-02T05:00:00Z  frontend → cart  SERVER   GET /cart  :status=200  latency=1.5ms  trace=ab"
        );
    }
}
