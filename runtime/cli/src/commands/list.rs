//! `husk list`: every container with its status.

use husk_core::agent::Status;
use husk_core::RuntimeError;
use serde_json::{json, Value};

use super::state::state_json;
use super::{check_format, out, ExitCode, Rt};

pub async fn run(rt: &Rt, format: &str, quiet: bool) -> Result<ExitCode, RuntimeError> {
    check_format(format)?;
    let mut rows = Vec::new();
    for id in rt.state.container_ids()? {
        let Ok(rec) = rt.state.read_container(&id) else { continue };
        let (status, _) = rt.status(&rec).await?;
        rows.push((rec, status));
    }
    if quiet {
        for (rec, _) in &rows {
            out!("{}", rec.id);
        }
    } else if format == "json" {
        let v: Vec<Value> = rows.iter().map(|(r, s)| state_json(r, *s)).collect();
        out!("{}", json!(v));
    } else {
        let table: Vec<[String; 6]> =
            std::iter::once(["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from))
                .chain(rows.iter().map(|(r, s)| {
                    let pid = if *s == Status::Stopped { 0 } else { r.relay_pid };
                    [
                        r.id.clone(),
                        pid.to_string(),
                        s.as_str().into(),
                        r.bundle.display().to_string(),
                        r.created.clone(),
                        "root".into(),
                    ]
                }))
                .collect();
        let widths: Vec<usize> =
            (0..6).map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0).max(9) + 3).collect();
        for row in table {
            let line: String = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out!("{}", line.trim_end());
        }
    }
    Ok(0)
}
