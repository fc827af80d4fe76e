//! How container processes are started; above all, every process gets the container's
//! seccomp profile, whatever the container library does.
//!
//! libcontainer 0.7 builds an exec's spec from the container's namespaces, cgroup,
//! personality and time offsets only, so its processes would run without the profile; and it
//! loads a container's own profile too late for a non-root user (see [`take_seccomp`]). The
//! helper therefore starts every process through [`ConfinedExec`], an executor that loads the
//! profile just before the program is executed. Without no_new_privileges, loading a filter needs
//! CAP_SYS_ADMIN, which is gone by then; so the process is first given CAP_SYS_ADMIN and
//! CAP_SETPCAP on top of its own sets ([`lift_for_seccomp`]), and the executor drops back to
//! exactly its own sets after loading the filter: the order runc uses (filter, then drop).

use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction, Process, Spec};

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

const LIFT: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Adds what loading a filter needs to `process`'s capability sets, if it may lack it;
/// returns the sets to drop back to afterwards.
pub fn lift_for_seccomp(process: &mut Process) -> Option<LinuxCapabilities> {
    if process.no_new_privileges() == Some(true) {
        // The filter loads unprivileged.
        return None;
    }
    // No capability sets: nothing is dropped, the process keeps root's.
    let own = process.capabilities().clone()?;
    let mut lifted = own.clone();
    let add = |set: &Option<std::collections::HashSet<Capability>>| {
        set.clone().map(|mut s| {
            s.extend(LIFT);
            s
        })
    };
    lifted.set_bounding(add(own.bounding()).or_else(|| Some(LIFT.into_iter().collect())));
    lifted.set_effective(add(own.effective()));
    lifted.set_permitted(add(own.permitted()));
    process.set_capabilities(Some(lifted));
    Some(own)
}

/// Takes the spec's seccomp profile out of the container library's hands, for [`ConfinedExec`]
/// to load. libcontainer 0.7 loads a profile for a process whose no_new_privileges is unset
/// after switching to the process's user, so a non-root user (Kubernetes' `runAsUser` with a
/// `RuntimeDefault` profile) has already lost the CAP_SYS_ADMIN that loading needs and the
/// container fails to start; loaded by the executor, with the lift, it works for every user.
/// A profile that hands syscalls to a listener stays with the library, which brings the
/// listener its notify fd (an exec's copy of it is refused by the executor).
pub fn take_seccomp(spec: &mut Spec) -> ConfinedExec {
    let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().clone()) else {
        return ConfinedExec::default();
    };
    if uses_notify(&seccomp) {
        return ConfinedExec::default();
    }
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_seccomp(None);
        spec.set_linux(Some(linux));
    }
    let drop_to = spec.process().clone().and_then(|mut p| {
        let own = lift_for_seccomp(&mut p);
        spec.set_process(Some(p));
        own
    });
    ConfinedExec { seccomp: Some(seccomp), drop_to }
}

fn uses_notify(s: &LinuxSeccomp) -> bool {
    s.listener_path().is_some()
        || s.default_action() == LinuxSeccompAction::ScmpActNotify
        || s.syscalls().iter().flatten().any(|c| c.action() == LinuxSeccompAction::ScmpActNotify)
}

/// How every container process is started: loads `seccomp` (an exec's copy of the
/// container's profile), drops to `drop_to`, then executes the program as the default
/// executor does. Its check of the program follows runc: a path with a `/` needs no `PATH`
/// (a `FROM scratch` image's `/pause` has no environment at all).
#[derive(Clone, Default, Debug, serde::Serialize, serde::Deserialize)]
pub struct ConfinedExec {
    pub seccomp: Option<LinuxSeccomp>,
    pub drop_to: Option<LinuxCapabilities>,
}

impl Executor for ConfinedExec {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            let notify = libcontainer::seccomp::initialize_seccomp(seccomp)
                .map_err(|e| ExecutorError::Other(format!("loading the container's seccomp profile: {e}")))?;
            if let Some(fd) = notify {
                // SAFETY: the fd was just created for us and nothing else holds it.
                unsafe { libc::close(fd) };
                return Err(ExecutorError::Other(
                    "seccomp notify profiles are not supported for exec'd processes".into(),
                ));
            }
        }
        if let Some(caps) = &self.drop_to {
            let syscall = libcontainer::syscall::syscall::create_syscall();
            libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
                .map_err(|e| ExecutorError::Other(format!("dropping capabilities after seccomp: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let arg0 = process.and_then(|p| p.args().as_ref()).and_then(|a| a.first());
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        match arg0 {
            Some(prog) if prog.contains('/') && !has_path => check_executable(std::path::Path::new(prog)),
            _ => DefaultExecutor {}.validate(spec),
        }
    }
}

fn check_executable(p: &std::path::Path) -> Result<(), ExecutorValidationError> {
    use std::os::unix::fs::PermissionsExt;
    let bad =
        |why: &str| ExecutorValidationError::ArgValidationError(format!("executable {}: {why}", p.display()));
    let meta = std::fs::metadata(p).map_err(|e| bad(&e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not an executable file"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(v: serde_json::Value) -> Process {
        serde_json::from_value(v).expect("process")
    }

    #[test]
    fn lifts_only_what_loading_needs_and_remembers_the_sets() {
        let mut p = process(serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
        }));
        let own = lift_for_seccomp(&mut p).expect("lifted");
        assert_eq!(own.effective().as_ref().map(|s| s.len()), Some(1));
        let caps = p.capabilities().clone().expect("caps");
        for set in [caps.bounding(), caps.effective(), caps.permitted()] {
            let set = set.as_ref().expect("set");
            assert!(set.contains(&Capability::SysAdmin) && set.contains(&Capability::Setpcap));
            assert!(set.contains(&Capability::Kill));
        }
        assert_eq!(caps.inheritable(), own.inheritable());
        assert_eq!(caps.ambient(), own.ambient());
    }

    #[test]
    fn the_profile_moves_to_the_executor_with_the_lift() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "/"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 1000, "gid": 1000},
                        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}},
            "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}
        }))
        .expect("spec");
        let exec = take_seccomp(&mut spec);
        assert!(exec.seccomp.is_some());
        assert!(spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()).is_none(), "left to the library");
        let own = exec.drop_to.expect("dropped back to");
        assert_eq!(own.effective().as_ref().map(|e| e.len()), Some(1));
        let lifted = spec.process().as_ref().and_then(|p| p.capabilities().clone()).expect("caps");
        assert!(lifted.effective().as_ref().is_some_and(|e| e.contains(&Capability::SysAdmin)));
        let mut plain: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "/"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        }))
        .expect("spec");
        let exec = take_seccomp(&mut plain);
        assert!(exec.seccomp.is_none() && exec.drop_to.is_none());
        let mut notify: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "/"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}}
        }))
        .expect("spec");
        assert!(take_seccomp(&mut notify).seccomp.is_none());
        assert!(notify.linux().as_ref().and_then(|l| l.seccomp().as_ref()).is_some(), "left to the library");
    }

    #[test]
    fn an_absolute_program_needs_no_path() {
        let spec = |arg0: &str, env: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2", "root": {"path": "/"},
                "process": {"args": [arg0], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": env}
            }))
            .expect("spec")
        };
        let e = ConfinedExec::default();
        assert!(e.validate(&spec("/bin/sh", serde_json::json!([]))).is_ok());
        assert!(e.validate(&spec("/nonexistent/pause", serde_json::json!([]))).is_err());
        assert!(e.validate(&spec("sh", serde_json::json!([]))).is_err(), "a bare name still needs PATH");
        assert!(e.validate(&spec("sh", serde_json::json!(["PATH=/bin:/usr/bin"]))).is_ok());
    }

    #[test]
    fn no_lift_under_no_new_privileges_or_without_sets() {
        let mut p = process(serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_KILL"]}
        }));
        assert!(lift_for_seccomp(&mut p).is_none());
        assert_eq!(p.capabilities().as_ref().and_then(|c| c.bounding().clone()).map(|b| b.len()), Some(1));
        let mut p = process(serde_json::json!({"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}));
        assert!(lift_for_seccomp(&mut p).is_none());
    }
}
