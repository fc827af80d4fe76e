//! The OCI commands: argument checks, the lifecycle call, and output as runc prints it.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use husk_proto as pb;
use serde_json::{json, Value};

use crate::bundle::Bundle;
use crate::cli::{Create, Exec, Run, Update};
use crate::error::RuntimeError;
use crate::ops::{CreateOpts, Runtime, Status, StdioMode};
use crate::state::ContainerRecord;
use crate::{foreground, signals};

/// What a command leaves for `main`: usually success, sometimes a process's exit code.
pub type ExitCode = i32;

const OCI_VERSION: &str = "1.0.2-dev";

/// Prints a line to stdout; a reader that went away (`husk state x | grep -q`) is not an error.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

fn refuse_preserve_fds(n: u32) -> Result<(), RuntimeError> {
    if n > 0 {
        return Err(RuntimeError::InvalidArgument(format!(
            "--preserve-fds {n}: host file descriptors cannot be passed into a sandbox VM"
        )));
    }
    Ok(())
}

pub async fn create(rt: &Runtime, a: Create) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let bundle = Bundle::load(&a.bundle)?;
    let opts = CreateOpts {
        pid_file: a.pid_file,
        stdio: StdioMode::Detached { console_socket: a.console_socket },
        extra_shares: vec![],
        rootfs_share: None,
        memory_mib: None,
        vcpus: None,
    };
    rt.create(&a.id, &bundle, opts).await?;
    Ok(0)
}

/// OCI `run ID`: create + start; in the foreground it relays and removes the container after.
pub async fn run_oci(rt: &Runtime, a: Run) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let id = match a.args.as_slice() {
        [id] => id.clone(),
        _ => {
            return Err(RuntimeError::InvalidArgument(
                "run needs exactly one container id (or --rootfs/--image and a command)".into(),
            ))
        }
    };
    let bundle = Bundle::load(a.bundle.as_deref().unwrap_or(Path::new(".")))?;
    let stdio = if a.detach {
        StdioMode::Detached { console_socket: a.console_socket.clone() }
    } else {
        StdioMode::Foreground { size: foreground::own_terminal_size() }
    };
    let terminal = bundle.terminal();
    if terminal && !a.detach && !foreground::stdin_is_tty() {
        return Err(RuntimeError::InvalidArgument(
            "process.terminal is set but stdin is not a terminal".into(),
        ));
    }
    let opts = CreateOpts {
        pid_file: a.pid_file.clone(),
        stdio,
        extra_shares: vec![],
        rootfs_share: None,
        memory_mib: None,
        vcpus: None,
    };
    let fg = rt.create(&id, &bundle, opts).await?;
    if let Err(e) = rt.start(&id).await {
        let _ = rt.delete(&id, true).await;
        return Err(e);
    }
    let Some(fg) = fg else { return Ok(0) };
    let (outcome, vmm) = foreground::relay(fg, terminal).await?;
    if !a.keep {
        finish_foreground(rt, &id, vmm).await?;
    }
    Ok(outcome.code())
}

/// Removes a foreground container and (if it was the last) its VM, reaping our VMM child.
pub async fn finish_foreground(
    rt: &Runtime,
    id: &str,
    vmm: Option<std::process::Child>,
) -> Result<(), RuntimeError> {
    rt.delete(id, true).await?;
    if let Some(mut c) = vmm {
        // The delete powered the VM off (it was this container's own VM); reap it.
        let _ = c.wait();
    }
    Ok(())
}

pub async fn state(rt: &Runtime, id: &str) -> Result<ExitCode, RuntimeError> {
    let rec = rt.state.read_container(id)?;
    let (status, _) = rt.status(&rec).await;
    out!("{}", pretty(&state_json(&rec, status)));
    Ok(0)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
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

pub async fn kill(rt: &Runtime, id: &str, signal: &str, all: bool) -> Result<ExitCode, RuntimeError> {
    let sig = signals::parse(signal)?;
    rt.kill(id, sig, all).await?;
    Ok(0)
}

/// The exec process: `--process` as given, or the container's own process with overrides.
fn exec_process(rt: &Runtime, a: &Exec) -> Result<(Vec<u8>, bool), RuntimeError> {
    if let Some(p) = &a.process {
        let mut bytes = Vec::new();
        std::fs::File::open(p)
            .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
            .map_err(|e| RuntimeError::InvalidArgument(format!("process {}: {e}", p.display())))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::InvalidArgument(format!("process {}: {e}", p.display())))?;
        let terminal = v.get("terminal").and_then(Value::as_bool).unwrap_or(false);
        return Ok((bytes, terminal));
    }
    if a.command.is_empty() {
        return Err(RuntimeError::InvalidArgument("exec needs a command or --process".into()));
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
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let uid: u32 =
            uid.parse().map_err(|_| RuntimeError::InvalidArgument(format!("--user {u:?}: not UID[:GID]")))?;
        let gid: u32 =
            gid.parse().map_err(|_| RuntimeError::InvalidArgument(format!("--user {u:?}: not UID[:GID]")))?;
        p["user"] = json!({"uid": uid, "gid": gid, "additionalGids": a.additional_gids});
    }
    if a.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    let bytes = serde_json::to_vec(&p).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    Ok((bytes, a.tty))
}

pub async fn exec(rt: &Runtime, a: Exec) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let (process, terminal) = exec_process(rt, &a)?;
    let stdio = if a.detach {
        StdioMode::Detached { console_socket: a.console_socket.clone() }
    } else {
        if terminal && !foreground::stdin_is_tty() {
            return Err(RuntimeError::InvalidArgument("--tty needs stdin to be a terminal".into()));
        }
        StdioMode::Foreground { size: foreground::own_terminal_size() }
    };
    let fg = rt.exec(&a.id, process, terminal, a.pid_file.as_deref(), stdio).await?;
    match fg {
        Some(fg) => Ok(foreground::relay(fg, terminal).await?.0.code()),
        None => Ok(0),
    }
}

pub async fn ps(rt: &Runtime, id: &str, format: &str) -> Result<ExitCode, RuntimeError> {
    if format != "table" && format != "json" {
        return Err(RuntimeError::InvalidArgument(format!("invalid format option {format:?}")));
    }
    let procs = rt.processes(id).await?;
    if format == "json" {
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        out!("{}", json!(pids));
    } else {
        out!("{:<8} {:>7} {:>7} {:<5} CMD", "UID", "PID", "PPID", "STAT");
        for p in procs {
            out!("{:<8} {:>7} {:>7} {:<5} {}", p.uid, p.pid, p.ppid, p.state, p.command);
        }
    }
    Ok(0)
}

/// Sizes as runc's flags take them: plain bytes or with a k/m/g/t suffix (binary units).
pub fn parse_bytes(s: &str) -> Result<i64, RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("invalid size {s:?}"));
    if s == "-1" {
        return Ok(-1);
    }
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > i64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as i64)
}

pub fn update_resources(a: &Update) -> Result<Vec<u8>, RuntimeError> {
    let mut r: Value = match &a.resources {
        Some(p) => {
            let mut bytes = Vec::new();
            let read = if p == Path::new("-") {
                std::io::stdin().take(1 << 20).read_to_end(&mut bytes)
            } else {
                std::fs::File::open(p).and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
            };
            read.map_err(|e| RuntimeError::InvalidArgument(format!("resources {}: {e}", p.display())))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| RuntimeError::InvalidArgument(format!("resources: {e}")))?
        }
        None => json!({}),
    };
    let set = |r: &mut Value, group: &str, key: &str, v: Value| {
        if !r[group].is_object() {
            r[group] = json!({});
        }
        r[group][key] = v;
    };
    for (key, v) in [("limit", &a.memory), ("swap", &a.memory_swap), ("reservation", &a.memory_reservation)] {
        if let Some(v) = v {
            set(&mut r, "memory", key, json!(parse_bytes(v)?));
        }
    }
    if let Some(v) = a.cpu_period {
        set(&mut r, "cpu", "period", json!(v));
    }
    if let Some(v) = a.cpu_quota {
        set(&mut r, "cpu", "quota", json!(v));
    }
    if let Some(v) = a.cpu_share {
        set(&mut r, "cpu", "shares", json!(v));
    }
    if let Some(v) = &a.cpuset_cpus {
        set(&mut r, "cpu", "cpus", json!(v));
    }
    if let Some(v) = &a.cpuset_mems {
        set(&mut r, "cpu", "mems", json!(v));
    }
    if let Some(v) = a.pids_limit {
        set(&mut r, "pids", "limit", json!(v));
    }
    // Typed check here, for a clear error before anything is sent.
    serde_json::from_value::<oci_spec::runtime::LinuxResources>(r.clone())
        .map_err(|e| RuntimeError::InvalidArgument(format!("resources: {e}")))?;
    serde_json::to_vec(&r).map_err(|e| RuntimeError::Internal(e.to_string()))
}

/// Go-style durations: `500ms`, `5s`, `1m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("invalid duration {s:?}"));
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
        let n: f64 = rest[..n_end].parse().map_err(|_| bad())?;
        let unit_end =
            rest[n_end..].find(|c: char| c.is_ascii_digit()).map(|i| n_end + i).unwrap_or(rest.len());
        let secs = match &rest[n_end..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(n * secs).map_err(|_| bad())?;
        rest = &rest[unit_end..];
    }
    Ok(total)
}

fn stats_event(id: &str, s: &pb::ContainerStatsResponse) -> Value {
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {"total": s.cpu_usage_usec.saturating_mul(1000)}},
            "memory": {"usage": {"usage": s.memory_usage_bytes, "limit": s.memory_limit_bytes}, "oom_kills": s.oom_kills},
            "pids": {"current": s.pids_current},
        }
    })
}

pub async fn events(rt: &Runtime, id: &str, interval: &str, once: bool) -> Result<ExitCode, RuntimeError> {
    let interval = parse_duration(interval)?;
    if interval.is_zero() {
        return Err(RuntimeError::InvalidArgument("duration interval must be greater than 0".into()));
    }
    let s = rt.stats(id).await?;
    out!("{}", stats_event(id, &s));
    if once {
        return Ok(0);
    }
    let rec = rt.state.read_container(id)?;
    let srec = rt.state.read_sandbox(&rec.sandbox_id)?.ok_or_else(|| RuntimeError::NotFound(id.into()))?;
    let client = crate::sandbox::connect_long(&srec.vsock).await?;
    let mut stream = client.events.clone().subscribe(pb::Empty {}).await?.into_inner();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            ev = stream.message() => match ev {
                Ok(Some(pb::Event { kind: Some(pb::event::Kind::Oom(o)) })) if o.container_id == id => {
                    out!("{}", json!({"type": "oom", "id": id}));
                }
                Ok(Some(pb::Event { kind: Some(pb::event::Kind::Exit(e)) })) if e.container_id == id && e.exec_id.is_empty() => {
                    return Ok(0);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(0),
            },
            _ = tick.tick() => {
                match rt.stats(id).await {
                    Ok(s) => out!("{}", stats_event(id, &s)),
                    Err(_) => return Ok(0),
                }
            }
        }
    }
}

pub async fn list(rt: &Runtime, format: &str, quiet: bool) -> Result<ExitCode, RuntimeError> {
    if format != "table" && format != "json" {
        return Err(RuntimeError::InvalidArgument(format!("invalid format option {format:?}")));
    }
    let mut rows = Vec::new();
    for id in rt.state.container_ids()? {
        let Ok(rec) = rt.state.read_container(&id) else { continue };
        let (status, _) = rt.status(&rec).await;
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

pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
                         "private", "rprivate", "shared", "rshared", "slave", "rslave", "relatime", "norelatime",
                         "strictatime", "nostrictatime", "noatime", "atime", "mode", "size", "newinstance",
                         "ptmxmode", "gid", "uid"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps(),
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "org.husk.sandbox": "kvm-microvm",
            "org.husk.pod-annotations": "io.kubernetes.cri.sandbox-id,io.kubernetes.cri-o.SandboxID"
        }
    })
}

fn caps() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ]
}

/// `spec`: runc's default config.json, for a busybox-like rootfs in `rootfs/`.
pub fn spec(bundle: &Path, rootless: bool) -> Result<ExitCode, RuntimeError> {
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(RuntimeError::InvalidArgument("File config.json exists. Remove it first".into()));
    }
    let spec = if rootless {
        oci_spec::runtime::Spec::rootless(nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    } else {
        oci_spec::runtime::Spec::default()
    };
    let bytes = serde_json::to_vec_pretty(&spec).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(RuntimeError::io(format!("writing {}", path.display())))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("100").ok(), Some(100));
        assert_eq!(parse_bytes("64m").ok(), Some(64 << 20));
        assert_eq!(parse_bytes("1G").ok(), Some(1 << 30));
        assert_eq!(parse_bytes("-1").ok(), Some(-1));
        for bad in ["", "x", "-5", "12q", "1e400"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").ok(), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s").ok(), Some(Duration::from_secs(90)));
        for bad in ["", "5", "s", "5x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

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
            host_mounts: vec![],
        };
        let v = state_json(&rec, Status::Running);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "running");
        assert_eq!(v["ociVersion"], OCI_VERSION);
        assert!(v.get("annotations").is_none());
        assert_eq!(state_json(&rec, Status::Stopped)["pid"], 0);
    }

    #[test]
    fn update_builds_resources() {
        let u = Update {
            resources: None,
            memory: Some("64m".into()),
            memory_swap: None,
            memory_reservation: None,
            cpu_period: Some(100000),
            cpu_quota: Some(50000),
            cpu_share: None,
            cpuset_cpus: None,
            cpuset_mems: None,
            pids_limit: Some(10),
            id: "c".into(),
        };
        let v: Value = serde_json::from_slice(&update_resources(&u).expect("valid")).expect("json");
        assert_eq!(v["memory"]["limit"], 64 << 20);
        assert_eq!(v["cpu"]["quota"], 50000);
        assert_eq!(v["pids"]["limit"], 10);
    }
}
