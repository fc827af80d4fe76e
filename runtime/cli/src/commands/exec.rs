//! `husk exec`: another process in a running container. Every flag is honoured or refused:
//! `--cap` adds to the process's capability sets as runc does, `--ignore-paused` allows a
//! paused container, and `--apparmor`/`--process-label` are refused (the guest kernel has no
//! AppArmor or SELinux to apply them).

use std::io::Read;

use husk_core::bundle::Bundle;
use husk_core::stdio::StdioStrategy;
use husk_core::{ExecOpts, RuntimeError};
use serde_json::{json, Value};

use super::{refuse_preserve_fds, ExitCode, Rt};
use crate::args::Exec;
use crate::foreground;

/// Largest `--process` file read.
const MAX_PROCESS_JSON: u64 = 1 << 20;

fn bad(msg: String) -> RuntimeError {
    RuntimeError::InvalidArgument(msg)
}

/// The exec process: `--process` as given, or the container's own process with overrides;
/// then the flags that apply to both.
fn exec_process(rt: &Rt, a: &Exec) -> Result<(Vec<u8>, bool), RuntimeError> {
    if let Some(l) = &a.apparmor {
        return Err(bad(format!("--apparmor {l:?}: the sandbox guest kernel has no AppArmor")));
    }
    if let Some(l) = &a.process_label {
        return Err(bad(format!("--process-label {l:?}: the sandbox guest kernel has no SELinux")));
    }
    let mut p: Value = if let Some(path) = &a.process {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PROCESS_JSON).read_to_end(&mut bytes))
            .map_err(|e| bad(format!("process {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("process {}: {e}", path.display())))?
    } else {
        if a.command.is_empty() {
            return Err(bad("exec needs a command or --process".into()));
        }
        let rec = rt.state.read_container(&a.id)?;
        let bundle = Bundle::load(&rec.bundle)?;
        let mut p = serde_json::to_value(bundle.spec.process().clone().unwrap_or_default())
            .map_err(|e| RuntimeError::Internal(e.to_string()))?;
        p["args"] = json!(a.command);
        p["terminal"] = json!(a.tty);
        if let Some(cwd) = &a.cwd {
            p["cwd"] = json!(cwd);
        }
        if !a.env.is_empty() {
            let mut env: Vec<Value> = p["env"].as_array().cloned().unwrap_or_default();
            env.extend(a.env.iter().map(|e| json!(e)));
            p["env"] = Value::Array(env);
        }
        if let Some(u) = &a.user {
            let not_user = || bad(format!("--user {u:?}: not UID[:GID]"));
            let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
            let uid: u32 = uid.parse().map_err(|_| not_user())?;
            let gid: u32 = gid.parse().map_err(|_| not_user())?;
            p["user"] = json!({"uid": uid, "gid": gid, "additionalGids": a.additional_gids});
        }
        p
    };
    if a.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    add_caps(&mut p, &a.cap)?;
    // The typed check: a bad process object is refused here, not in the guest.
    let checked: oci_spec::runtime::Process =
        serde_json::from_value(p.clone()).map_err(|e| bad(format!("exec process: {e}")))?;
    let terminal = checked.terminal().unwrap_or(false);
    let bytes = serde_json::to_vec(&p).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    Ok((bytes, terminal))
}

/// runc's `--cap`: into the bounding, effective and permitted sets, and the ambient set when
/// the process has an inheritable set (ambient needs inheritable).
fn add_caps(p: &mut Value, caps: &[String]) -> Result<(), RuntimeError> {
    if caps.is_empty() {
        return Ok(());
    }
    for c in caps {
        serde_json::from_value::<oci_spec::runtime::Capability>(json!(c))
            .map_err(|_| bad(format!("--cap {c:?}: not a capability name (CAP_...)")))?;
    }
    if !p["capabilities"].is_object() {
        p["capabilities"] = json!({});
    }
    let has_inheritable = p["capabilities"]["inheritable"].is_array();
    let mut sets = vec!["bounding", "effective", "permitted"];
    if has_inheritable {
        sets.push("ambient");
    }
    for set in sets {
        let mut list: Vec<Value> = p["capabilities"][set].as_array().cloned().unwrap_or_default();
        for c in caps {
            if !list.iter().any(|v| v == c) {
                list.push(json!(c));
            }
        }
        p["capabilities"][set] = Value::Array(list);
    }
    Ok(())
}

pub async fn run(rt: &Rt, a: Exec) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let (process_json, terminal) = exec_process(rt, &a)?;
    let stdio = if a.detach {
        StdioStrategy::Relay { console_socket: a.console_socket.clone(), pid_file: a.pid_file.clone() }
    } else {
        if terminal && !foreground::stdin_is_tty() {
            return Err(bad("--tty needs stdin to be a terminal".into()));
        }
        StdioStrategy::Held { size: foreground::own_terminal_size() }
    };
    let opts = ExecOpts { process_json, terminal, stdio, ignore_paused: a.ignore_paused, exec_id: None };
    let held = rt.exec(&a.id, opts).await?;
    if !a.detach {
        if let Some(p) = &a.pid_file {
            husk_core::state::write_atomic(p, &std::process::id().to_string())?;
        }
    }
    match held {
        Some(h) => Ok(foreground::relay(rt, h, terminal).await?.0.code()),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_join_the_sets_as_runc_adds_them() {
        let mut p = json!({"capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]}});
        add_caps(&mut p, &["CAP_NET_ADMIN".into(), "CAP_KILL".into()]).expect("caps");
        assert_eq!(p["capabilities"]["bounding"], json!(["CAP_KILL", "CAP_NET_ADMIN"]));
        assert_eq!(p["capabilities"]["permitted"], json!(["CAP_NET_ADMIN", "CAP_KILL"]));
        assert!(p["capabilities"].get("ambient").is_none(), "no ambient without inheritable");
        let mut q = json!({"capabilities": {"inheritable": []}});
        add_caps(&mut q, &["CAP_SYS_TIME".into()]).expect("caps");
        assert_eq!(q["capabilities"]["ambient"], json!(["CAP_SYS_TIME"]));
        assert!(add_caps(&mut q, &["NET_ADMIN_PLEASE".into()]).is_err());
    }
}
