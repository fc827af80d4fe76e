//! Which VM a container belongs in, from the annotations CRI implementations put on it.

use std::collections::HashMap;

use oci_spec::runtime::LinuxNamespaceType;

use crate::error::RuntimeError;

/// (container-type key, sandbox-id key) for containerd's CRI plugin and for CRI-O.
const CRI_KEYS: [(&str, &str); 2] = [
    ("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Its own VM, named after the container.
    Standalone,
    /// The pod's sandbox (pause) container: starts the pod's VM.
    PodSandbox(String),
    /// A container of the pod whose VM already runs.
    PodMember(String),
}

impl Role {
    pub fn sandbox_id<'a>(&'a self, container_id: &'a str) -> &'a str {
        match self {
            Role::Standalone => container_id,
            Role::PodSandbox(s) | Role::PodMember(s) => s,
        }
    }

    pub fn starts_vm(&self) -> bool {
        !matches!(self, Role::PodMember(_))
    }
}

/// A pod's containers must have their own PID, IPC and network namespaces (or a pod peer's): a
/// spec without one asks for the host's (`hostPID`, `hostIPC`, `hostNetwork`), which a VM
/// cannot share; refused rather than given the VM's instead. Any other container must have a
/// network namespace (`ctr run --net-host` or `podman --network host` leave it out): its VM
/// cannot be on the host's network stack. (A standalone container without a PID or IPC
/// namespace of its own still gets the VM's, as it always has: nothing else runs there.)
pub fn check_namespaces(spec: &oci_spec::runtime::Spec, role: &Role) -> Result<(), RuntimeError> {
    let nss = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    if *role == Role::Standalone {
        if !nss.iter().any(|n| n.typ() == LinuxNamespaceType::Network) {
            return Err(RuntimeError::InvalidArgument(
                "the container asks for the host's network (the spec has no network namespace): a \
                 sandbox VM cannot share the host's network stack; give it a network namespace \
                 (one from CNI, or none for loopback only)"
                    .into(),
            ));
        }
        return Ok(());
    }
    for (typ, what) in [
        (LinuxNamespaceType::Pid, "the host's PID namespace (hostPID, PID mode NODE)"),
        (LinuxNamespaceType::Ipc, "the host's IPC namespace (hostIPC)"),
        (LinuxNamespaceType::Network, "the host's network (hostNetwork)"),
    ] {
        if !nss.iter().any(|n| n.typ() == typ) {
            return Err(RuntimeError::InvalidArgument(format!(
                "the pod asks for {what}: a sandbox VM cannot share the host's"
            )));
        }
    }
    Ok(())
}

pub fn role(annotations: &HashMap<String, String>, container_id: &str) -> Result<Role, RuntimeError> {
    for (type_key, sandbox_key) in CRI_KEYS {
        let Some(kind) = annotations.get(type_key) else { continue };
        let sandbox = annotations.get(sandbox_key).map(String::as_str);
        return match (kind.as_str(), sandbox) {
            ("sandbox", s) => Ok(Role::PodSandbox(s.unwrap_or(container_id).to_string())),
            ("container", Some(s)) if s == container_id => Ok(Role::PodSandbox(s.to_string())),
            ("container", Some(s)) => Ok(Role::PodMember(s.to_string())),
            ("container", None) => Err(RuntimeError::InvalidArgument(format!(
                "annotation {type_key}=container without {sandbox_key}"
            ))),
            (k, _) => Err(RuntimeError::InvalidArgument(format!(
                "annotation {type_key}={k:?} is not sandbox or container"
            ))),
        };
    }
    Ok(Role::Standalone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn roles() {
        assert_eq!(role(&ann(&[]), "c").ok(), Some(Role::Standalone));
        let sb =
            ann(&[("io.kubernetes.cri.container-type", "sandbox"), ("io.kubernetes.cri.sandbox-id", "p")]);
        assert_eq!(role(&sb, "p").ok(), Some(Role::PodSandbox("p".into())));
        let m =
            ann(&[("io.kubernetes.cri.container-type", "container"), ("io.kubernetes.cri.sandbox-id", "p")]);
        assert_eq!(role(&m, "c").ok(), Some(Role::PodMember("p".into())));
        let crio = ann(&[
            ("io.kubernetes.cri-o.ContainerType", "container"),
            ("io.kubernetes.cri-o.SandboxID", "q"),
        ]);
        assert_eq!(role(&crio, "c").ok(), Some(Role::PodMember("q".into())));
        assert!(role(&ann(&[("io.kubernetes.cri.container-type", "container")]), "c").is_err());
        assert!(role(&ann(&[("io.kubernetes.cri.container-type", "weird")]), "c").is_err());
        assert_eq!(Role::PodMember("p".into()).sandbox_id("c"), "p");
        assert_eq!(Role::Standalone.sandbox_id("c"), "c");
    }

    #[test]
    fn pods_cannot_have_the_hosts_pid_ipc_or_network_namespace() {
        let spec = |nss: serde_json::Value| -> oci_spec::runtime::Spec {
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": nss}}))
                .expect("spec")
        };
        let pod = Role::PodSandbox("p".into());
        let all = spec(serde_json::json!([
            {"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "network", "path": "/run/netns/p"}
        ]));
        assert!(check_namespaces(&all, &pod).is_ok());
        let e = check_namespaces(&spec(serde_json::json!([{"type": "ipc"}, {"type": "network"}])), &pod)
            .expect_err("hostPID");
        assert!(e.to_string().contains("hostPID"), "{e}");
        let e = check_namespaces(&spec(serde_json::json!([{"type": "pid"}, {"type": "network"}])), &pod)
            .expect_err("hostIPC");
        assert!(e.to_string().contains("hostIPC"), "{e}");
        let e = check_namespaces(&spec(serde_json::json!([{"type": "pid"}, {"type": "ipc"}])), &pod)
            .expect_err("hostNetwork");
        assert!(e.to_string().contains("hostNetwork"), "{e}");
        let e = check_namespaces(&spec(serde_json::json!([{"type": "pid"}])), &Role::Standalone)
            .expect_err("host network, standalone");
        assert!(e.to_string().contains("host's network"), "{e}");
        assert!(check_namespaces(&spec(serde_json::json!([{"type": "network"}])), &Role::Standalone).is_ok());
    }
}
