//! `husk state`: runc's state object.

use husk_core::agent::Status;
use husk_core::lifecycle::OCI_VERSION;
use husk_core::state::ContainerRecord;
use husk_core::RuntimeError;
use serde_json::{json, Value};

use super::{out, ExitCode, Rt};

pub async fn run(rt: &Rt, id: &str) -> Result<ExitCode, RuntimeError> {
    let rec = rt.state.read_container(id)?;
    let (status, _) = rt.status(&rec).await?;
    let v = state_json(&rec, status);
    out!("{}", serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()));
    Ok(0)
}

/// runc's `state` object.
pub fn state_json(rec: &ContainerRecord, status: Status) -> Value {
    let pid = if status == Status::Stopped { 0 } else { rec.relay_pid };
    let mut v = json!({
        "ociVersion": OCI_VERSION,
        "id": rec.id,
        "pid": pid,
        "status": status.as_str(),
        "bundle": rec.bundle,
        "rootfs": rec.rootfs,
        "created": rec.created,
        "owner": "",
    });
    if !rec.annotations.is_empty() {
        v["annotations"] = json!(rec.annotations);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_json_is_runcs_shape() {
        let rec = ContainerRecord {
            id: "c".into(),
            sandbox_id: "c".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "T".into(),
            annotations: Default::default(),
            relay_pid: 42,
            relay_start: 1,
            guest_pid: 1,
            client_pid: None,
            host_mounts: vec![],
            poststart: vec![],
            poststop: vec![],
            own_pid_namespace: false,
        };
        let v = state_json(&rec, Status::Running);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "running");
        assert_eq!(v["ociVersion"], OCI_VERSION);
        assert!(v.get("annotations").is_none());
        assert_eq!(state_json(&rec, Status::Stopped)["pid"], 0);
    }
}
