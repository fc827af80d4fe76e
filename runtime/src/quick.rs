//! `husk run --rootfs DIR | --image LAYOUT[:TAG] [-it] ... -- CMD...`: a command in a fresh
//! sandbox with no bundle to write. The rootfs is shared read-only and overlaid in the guest,
//! so the run never changes it; the sandbox is removed afterwards; the exit code is the
//! command's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::bundle::Bundle;
use crate::cli::Run;
use crate::commands::{finish_foreground, ExitCode};
use crate::error::RuntimeError;
use crate::foreground;
use crate::image::{self, ImageConfig};
use crate::ops::{CreateOpts, Runtime, StdioMode};
use crate::sandbox::ExtraShare;

const ROOTFS_TAG: &str = "rootfs";
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A `-v HOST:GUEST[:ro]` argument as an OCI bind mount.
fn volume(v: &str) -> Result<Value, RuntimeError> {
    let bad = |why: &str| RuntimeError::InvalidArgument(format!("--volume {v:?}: {why}"));
    let parts: Vec<&str> = v.split(':').collect();
    let (host, guest, ro) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => return Err(bad("expected HOST:GUEST[:ro]")),
    };
    if !Path::new(host).is_absolute() || !Path::new(guest).is_absolute() {
        return Err(bad("both paths must be absolute"));
    }
    if guest.split('/').any(|c| c == "..") {
        return Err(bad("the guest path must not contain '..'"));
    }
    let host = Path::new(host).canonicalize().map_err(|e| bad(&e.to_string()))?;
    let mut opts = vec!["rbind", "rprivate"];
    if ro {
        opts.push("ro");
    }
    Ok(json!({"destination": guest, "type": "bind", "source": host, "options": opts}))
}

/// `uid[:gid]` from an image's `User` (names are looked up in the rootfs's /etc files).
fn user(spec: &str, rootfs: &Path) -> Result<(u32, u32), RuntimeError> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = spec.split_once(':').map(|(u, g)| (u, Some(g))).unwrap_or((spec, None));
    // (id, gid) of the /etc/<file> entry whose name (field 0) or id (field 2) is `key`.
    let lookup = |file: &str, key: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(rootfs.join("etc").join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let hit = f.len() > 3 && (f[0] == key || f[2] == key);
            hit.then(|| Some((f[2].parse().ok()?, f[3].parse().unwrap_or(0))))?
        })
    };
    let bad = || RuntimeError::InvalidArgument(format!("image user {spec:?} not found in the image"));
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, lookup("passwd", u).map(|p| p.1).unwrap_or(0)),
        Err(_) => lookup("passwd", u).ok_or_else(bad)?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("group", g).map(|p| p.0).ok_or_else(bad)?,
        };
    }
    Ok((uid, gid))
}

const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The spec of a sandbox run: what Docker-like users expect by default.
fn run_spec(a: &Run, rootfs: &Path, img: &ImageConfig) -> Result<Value, RuntimeError> {
    let args: Vec<String> = if !a.args.is_empty() {
        a.args.clone()
    } else {
        img.entrypoint.iter().chain(&img.cmd).cloned().collect()
    };
    if args.is_empty() {
        return Err(RuntimeError::InvalidArgument("no command given (and the image names none)".into()));
    }
    let mut env: Vec<String> = Vec::new();
    if !img.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.into());
    }
    env.extend(img.env.iter().cloned());
    if a.tty {
        env.push("TERM=xterm".into());
    }
    for e in &a.env {
        if !e.contains('=') {
            return Err(RuntimeError::InvalidArgument(format!("--env {e:?}: expected KEY=VALUE")));
        }
        env.push(e.clone());
    }
    let cwd = a.workdir.clone().or_else(|| Some(img.working_dir.clone()).filter(|w| !w.is_empty()));
    let cwd = cwd.unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(RuntimeError::InvalidArgument(format!("working directory {cwd:?} is not absolute")));
    }
    let (uid, gid) = user(&img.user, rootfs)?;
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
    ];
    for v in &a.volume {
        mounts.push(volume(v)?);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": a.tty,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": a.hostname.clone().unwrap_or_else(|| "husk".into()),
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    }))
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("run-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

pub async fn run(rt: &Runtime, a: Run) -> Result<ExitCode, RuntimeError> {
    if a.tty && !foreground::stdin_is_tty() {
        return Err(RuntimeError::InvalidArgument("the input device is not a TTY (drop -t)".into()));
    }
    if a.detach || a.pid_file.is_some() || a.console_socket.is_some() {
        return Err(RuntimeError::InvalidArgument(
            "--detach, --pid-file and --console-socket are for OCI bundles (husk run ID)".into(),
        ));
    }
    rt.cfg.preflight()?;
    let id = new_id();
    let work = rt.state.root.join("runs").join(&id);
    std::fs::create_dir_all(&work).map_err(RuntimeError::io(format!("creating {}", work.display())))?;
    let result = run_in(rt, &a, &id, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(rt: &Runtime, a: &Run, id: &str, work: &Path) -> Result<ExitCode, RuntimeError> {
    let (rootfs, img): (PathBuf, ImageConfig) = match (&a.rootfs, &a.image) {
        (Some(r), None) => {
            let r =
                r.canonicalize().map_err(|e| RuntimeError::Bundle(format!("rootfs {}: {e}", r.display())))?;
            (r, ImageConfig::default())
        }
        (None, Some(i)) => {
            let (layout, tag) = image::parse_reference(i)?;
            let dest = work.join("rootfs");
            std::fs::create_dir_all(&dest)
                .map_err(RuntimeError::io(format!("creating {}", dest.display())))?;
            let cfg = image::unpack(&layout, &tag, &dest)?;
            (dest, cfg)
        }
        _ => return Err(RuntimeError::InvalidArgument("give one of --rootfs or --image".into())),
    };
    let spec_json = run_spec(a, &rootfs, &img)?;
    let spec: oci_spec::runtime::Spec =
        serde_json::from_value(spec_json).map_err(|e| RuntimeError::Internal(format!("run spec: {e}")))?;
    let bundle = Bundle::from_spec(work.to_path_buf(), spec)?;
    let opts = CreateOpts {
        pid_file: None,
        stdio: StdioMode::Foreground { size: if a.tty { foreground::own_terminal_size() } else { None } },
        extra_shares: vec![ExtraShare { tag: ROOTFS_TAG.into(), path: rootfs.clone(), read_only: true }],
        rootfs_share: Some((ROOTFS_TAG.into(), String::new())),
        memory_mib: a.memory,
        vcpus: a.cpus,
    };
    // Ctrl-C while the VM boots: finish creating, then remove everything and exit 130.
    let interrupted = Arc::new(AtomicBool::new(false));
    let watch = {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        })
    };
    let created = rt.create(id, &bundle, opts).await;
    watch.abort();
    let Some(mut fg) = created? else {
        return Err(RuntimeError::Internal("foreground create returned no streams".into()));
    };
    if interrupted.load(Ordering::SeqCst) {
        finish_foreground(rt, id, fg.vmm.take()).await?;
        return Ok(130);
    }
    if let Err(e) = rt.start(id).await {
        finish_foreground(rt, id, fg.vmm.take()).await?;
        return Err(e);
    }
    if !a.interactive {
        // No input: the process sees EOF at once.
        fg.guest.stdin = None;
    }
    let (outcome, vmm) = foreground::relay(fg, a.tty).await?;
    finish_foreground(rt, id, vmm).await?;
    Ok(outcome.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes() {
        let v = volume("/tmp:/data:ro").expect("valid");
        assert_eq!(v["destination"], "/data");
        assert!(v["options"].as_array().is_some_and(|o| o.contains(&json!("ro"))));
        for bad in ["/tmp", "tmp:/data", "/tmp:data", "/tmp:/a/../b", "/tmp:/d:rx", "/does-not-exist:/d"] {
            assert!(volume(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn users_from_the_image() {
        let d = std::env::temp_dir().join(format!("husk-quick-user-{}", std::process::id()));
        std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        std::fs::write(d.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/false\n")
            .expect("w");
        std::fs::write(d.join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("w");
        assert_eq!(user("", &d).ok(), Some((0, 0)));
        assert_eq!(user("web", &d).ok(), Some((33, 34)));
        assert_eq!(user("33", &d).ok(), Some((33, 34)));
        assert_eq!(user("web:staff", &d).ok(), Some((33, 50)));
        assert_eq!(user("1000:1000", &d).ok(), Some((1000, 1000)));
        assert!(user("nobody", &d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
