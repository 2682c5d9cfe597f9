//! `meshscope sql "SELECT …"`: runs a statement on a server and prints the result as a
//! table, JSON or CSV.

use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatch;

use crate::config::{Format, SqlArgs};

const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

pub async fn run(args: SqlArgs) -> Result<(), String> {
    let url = format!("{}/api/v1/sql", args.client.server.trim_end_matches('/'));
    let accept = match args.format {
        Format::Json => "application/json",
        Format::Table | Format::Csv => ARROW_STREAM,
    };
    let mut request = reqwest::Client::new().post(&url).header("accept", accept);
    if let Some(token) = &args.client.token {
        request = request.bearer_auth(token);
    }
    let resp = request
        .json(&serde_json::json!({ "sql": args.sql }))
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(format!("{msg} (HTTP {})", status.as_u16()));
    }
    match args.format {
        Format::Json => {
            println!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Format::Table => {
            let batches = decode(&body)?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let table =
                arrow::util::pretty::pretty_format_batches(&batches).map_err(|e| e.to_string())?;
            println!("{table}");
            println!("({rows} row{})", if rows == 1 { "" } else { "s" });
            Ok(())
        }
        Format::Csv => {
            let batches = decode(&body)?;
            let stdout = std::io::stdout();
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(stdout.lock());
            for b in &batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

fn decode(body: &[u8]) -> Result<Vec<RecordBatch>, String> {
    let reader =
        StreamReader::try_new(body, None).map_err(|e| format!("invalid Arrow answer: {e}"))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid Arrow answer: {e}"))
}
