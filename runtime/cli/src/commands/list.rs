//! `husk list`: every container with its status, and every sandbox no container holds (what a
//! `husk run` or create that was killed left: a VM, a CNI network), as `stopped`, so that
//! `husk delete --force ID` can be pointed at it.

use husk_core::agent::Status;
use husk_core::state::ContainerRecord;
use husk_core::RuntimeError;
use serde_json::{json, Value};

use super::state::state_json;
use super::{check_format, out, ExitCode, Rt};

pub async fn run(rt: &Rt, format: &str, quiet: bool) -> Result<ExitCode, RuntimeError> {
    check_format(format)?;
    let mut rows = Vec::new();
    let ids = rt.state.container_ids()?;
    for id in &ids {
        let Ok(rec) = rt.state.read_container(id) else { continue };
        // One container whose agent misbehaves must not hide the others.
        let status = match rt.status(&rec).await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("container {id}: {e}");
                Status::Stopped
            }
        };
        rows.push((rec, status));
    }
    for sid in orphan_sandboxes(rt, &ids)? {
        rows.push((orphan_record(sid), Status::Stopped));
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

/// Sandboxes that are no container's (by id) and hold none, and that no call is creating now.
fn orphan_sandboxes(rt: &Rt, containers: &[String]) -> Result<Vec<String>, RuntimeError> {
    Ok(rt
        .state
        .sandbox_ids()?
        .into_iter()
        .filter(|sid| !containers.contains(sid))
        .filter(|sid| match rt.state.read_sandbox(sid) {
            Ok(Some(r)) => r.containers.is_empty(),
            Ok(None) | Err(_) => true,
        })
        .filter(|sid| !rt.state.sandbox_busy(sid))
        .collect())
}

/// A row for a sandbox without a container: its id, nothing running.
fn orphan_record(sid: String) -> ContainerRecord {
    ContainerRecord {
        id: sid.clone(),
        sandbox_id: sid,
        bundle: Default::default(),
        rootfs: Default::default(),
        created: String::new(),
        annotations: Default::default(),
        relay_pid: 0,
        relay_start: 0,
        guest_pid: 0,
        client_pid: None,
        host_mounts: Vec::new(),
        poststart: Vec::new(),
        poststop: Vec::new(),
        own_pid_namespace: false,
    }
}

#[cfg(test)]
mod tests {
    use husk_core::lifecycle::OCI_VERSION;

    use super::*;

    #[test]
    fn an_orphan_sandbox_reads_as_a_stopped_container() {
        let v = state_json(&orphan_record("run-0a1b".into()), Status::Stopped);
        assert_eq!(
            (v["id"].as_str(), v["status"].as_str(), v["pid"].as_i64()),
            (Some("run-0a1b"), Some("stopped"), Some(0))
        );
        assert_eq!(v["ociVersion"], OCI_VERSION);
    }
}
