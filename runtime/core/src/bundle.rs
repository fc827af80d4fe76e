//! OCI bundles: reading `config.json`, and turning it into the spec the guest runs. Host paths
//! mean nothing inside the VM, so the rootfs and every bind-mount source are bind-mounted under
//! the sandbox's share and the spec is pointed at their guest paths; namespace paths of pod
//! peers are mapped to the peers' guest PIDs; host-only settings (hooks, which run on the
//! host, and LSM labels) go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

use crate::error::RuntimeError;
use crate::{hooks, mounts, namespaces, share};

/// The guest network namespace a pod's network namespace becomes: the VM's own, where the
/// pod's interfaces are set up (see `network`).
pub const GUEST_POD_NETNS: &str = "/proc/1/ns/net";

/// Largest config.json read.
const MAX_CONFIG: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    /// Absolute host rootfs directory.
    pub rootfs: PathBuf,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, RuntimeError> {
        let dir = dir.canonicalize().map_err(RuntimeError::bundle_file("directory", dir))?;
        let path = dir.join("config.json");
        let meta = std::fs::metadata(&path).map_err(RuntimeError::bundle_file("config", &path))?;
        if meta.len() > MAX_CONFIG {
            return Err(RuntimeError::Bundle(format!(
                "{} is larger than {MAX_CONFIG} bytes",
                path.display()
            )));
        }
        let bytes = std::fs::read(&path).map_err(RuntimeError::bundle_file("config", &path))?;
        let spec: Spec = serde_json::from_slice(&bytes)
            .map_err(|source| RuntimeError::BundleSpec { path: path.clone(), source })?;
        Self::from_spec(dir, spec)
    }

    pub fn from_spec(dir: PathBuf, spec: Spec) -> Result<Self, RuntimeError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| RuntimeError::Bundle("config.json has no process".into()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(RuntimeError::Bundle("process.args must not be empty".into()));
        }
        let root =
            spec.root().as_ref().ok_or_else(|| RuntimeError::Bundle("config.json has no root".into()))?;
        let rootfs = dir.join(root.path());
        let rootfs = rootfs.canonicalize().map_err(RuntimeError::bundle_file("rootfs", &rootfs))?;
        if !rootfs.is_dir() {
            return Err(RuntimeError::Bundle(format!("rootfs {} is not a directory", rootfs.display())));
        }
        std::fs::read_dir(&rootfs).map_err(RuntimeError::bundle_file("rootfs", &rootfs))?;
        // Checked before any VM boots for it.
        for m in spec.mounts().iter().flatten().filter(|m| is_bind(m)) {
            if let Some(src) = m.source() {
                let src = if src.is_absolute() { src.clone() } else { dir.join(src) };
                std::fs::metadata(&src).map_err(RuntimeError::bundle_file("bind mount source", &src))?;
            }
        }
        for ns in spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()).into_iter().flatten() {
            namespaces::precheck(ns)?;
        }
        hooks::check(spec.hooks().as_ref())?;
        Ok(Self { dir, spec, rootfs })
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default()
    }

    pub fn terminal(&self) -> bool {
        self.spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false)
    }

    /// Whether the container gets a PID namespace of its own (one without a path), whose PID 1
    /// its init is: every process of the container ends when the init does.
    pub fn own_pid_namespace(&self) -> bool {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|nss| nss.iter().any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none()))
    }

    /// The host hooks of one kind.
    pub fn hooks(&self, kind: HostHook) -> Vec<oci_spec::runtime::Hook> {
        let Some(h) = self.spec.hooks() else { return Vec::new() };
        #[allow(deprecated)] // prestart is deprecated in the spec, still used (and run by runc)
        let list = match kind {
            HostHook::Prestart => h.prestart(),
            HostHook::CreateRuntime => h.create_runtime(),
            HostHook::Poststart => h.poststart(),
            HostHook::Poststop => h.poststop(),
        };
        list.clone().unwrap_or_default()
    }
}

/// The hooks husk runs on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHook {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

/// The guest's view of a container, and the host mounts made for it.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec_json: Vec<u8>,
    /// The rootfs path inside the sandbox share.
    pub rootfs_rel: String,
    pub host_mounts: Vec<PathBuf>,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

fn has_opt(m: &Mount, opt: &str) -> bool {
    m.options().iter().flatten().any(|o| o == opt)
}

/// Where bind mount `i` of `source` goes under the container's directory: its own numbered
/// directory, holding an entry with the source's base name, so the guest sees that name.
fn mount_rel(i: usize, source: &Path) -> PathBuf {
    let base = source.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "root".into());
    Path::new("mounts").join(i.to_string()).join(base)
}

/// Prepares `bundle` as container `cid` in the sandbox whose share is `shared`. `peers` maps
/// host PIDs of pod peers (their relays, which clients see as the containers' PIDs) to guest
/// PIDs. On error, mounts already made are undone.
/// With `bind_rootfs` false the rootfs comes from a share of its own and is not mounted here.
pub fn to_guest(
    bundle: &Bundle,
    cid: &str,
    shared: &Path,
    peers: &HashMap<i32, u32>,
    bind_rootfs: bool,
    starts_vm: bool,
) -> Result<GuestSpec, RuntimeError> {
    let mut done = Vec::new();
    match to_guest_inner(bundle, cid, shared, peers, bind_rootfs, starts_vm, &mut done) {
        Ok(mut g) => {
            g.host_mounts = done;
            Ok(g)
        }
        Err(e) => {
            mounts::unmount_all(&done);
            // Removing through a mount that did not go would delete the host's files.
            let dir = shared.join(cid);
            match mounts::first_mount_under(&dir) {
                Ok(None) => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Ok(Some(m)) => {
                    tracing::warn!("not removing {}: {} is still mounted", dir.display(), m.display())
                }
                Err(e) => tracing::warn!("not removing {}: {e}", dir.display()),
            }
            Err(e)
        }
    }
}

fn to_guest_inner(
    bundle: &Bundle,
    cid: &str,
    shared: &Path,
    peers: &HashMap<i32, u32>,
    bind_rootfs: bool,
    starts_vm: bool,
    done: &mut Vec<PathBuf>,
) -> Result<GuestSpec, RuntimeError> {
    let mut spec = bundle.spec.clone();
    let base = shared.join(cid);
    let rootfs_rel = format!("{cid}/rootfs");
    let readonly = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
    if bind_rootfs {
        let target = shared.join(&rootfs_rel);
        mounts::bind(&bundle.rootfs, &target, true, readonly)?;
        done.push(target);
    }

    let mut out_mounts = Vec::new();
    for (i, m) in spec.mounts().clone().unwrap_or_default().into_iter().enumerate() {
        if !is_bind(&m) {
            out_mounts.push(m);
            continue;
        }
        let source = m.source().clone().ok_or_else(|| {
            RuntimeError::Bundle(format!("bind mount on {} has no source", m.destination().display()))
        })?;
        // Relative sources are relative to the bundle, as runc resolves them; symlinks are
        // resolved here, so the base name the guest sees is the real source's.
        let source = if source.is_absolute() { source } else { bundle.dir.join(source) };
        let source =
            source.canonicalize().map_err(RuntimeError::bundle_file("bind mount source", &source))?;
        let rel = mount_rel(i, &source);
        let target = base.join(&rel);
        mounts::bind(&source, &target, has_opt(&m, "rbind"), has_opt(&m, "ro"))?;
        done.push(target);
        let mut m = m;
        m.set_source(Some(share::guest_path(&Path::new(cid).join(rel))));
        out_mounts.push(m);
    }
    spec.set_mounts(Some(out_mounts));

    // Host-only settings: hooks run on the host (see `hooks`), LSM labels name host policies.
    spec.set_hooks(None);
    if let Some(mut p) = spec.process().clone() {
        p.set_apparmor_profile(None);
        p.set_selinux_label(None);
        spec.set_process(Some(p));
    }
    // A hostname without a UTS namespace of its own (CRI's host-network pods) names the VM's,
    // which the sandbox got when it booted; the container library refuses to set it again.
    let own_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none()));
    if !own_uts && spec.hostname().is_some() {
        spec.set_hostname(None);
    }
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_mount_label(None);
        linux.set_cgroups_path(None);
        if let Some(nss) = linux.namespaces().clone() {
            let mapped: Vec<LinuxNamespace> = nss
                .into_iter()
                .map(|mut ns| {
                    let mut guest = namespaces::guest_path(&ns, peers);
                    if guest.is_none() {
                        namespaces::validate(&ns)?;
                    }
                    if ns.path().is_none() && ns.typ() == LinuxNamespaceType::Network && starts_vm {
                        // A new network namespace for the container that starts the VM: the
                        // VM's own holds nothing else either (only a loopback; its agent uses
                        // vsock) and costs no namespace to make and tear down. Later members
                        // that ask for one of their own still get it.
                        guest = Some(PathBuf::from(GUEST_POD_NETNS));
                    }
                    if ns.path().is_some() && guest.is_none() {
                        if ns.typ() == LinuxNamespaceType::Network {
                            // The pod's network namespace (CNI's) is wired to the VM, whose
                            // own namespace (the agent's, PID 1) has its interfaces.
                            guest = Some(PathBuf::from(GUEST_POD_NETNS));
                        } else {
                            // Another host namespace: the guest gets its own.
                            tracing::debug!("container {cid}: {:?} namespace path dropped", ns.typ());
                        }
                    }
                    ns.set_path(guest);
                    Ok(ns)
                })
                .collect::<Result<_, RuntimeError>>()?;
            linux.set_namespaces(Some(mapped));
        }
        spec.set_linux(Some(linux));
    }
    let spec_json =
        serde_json::to_vec(&spec).map_err(|e| RuntimeError::Internal(format!("encoding spec: {e}")))?;
    Ok(GuestSpec { spec_json, rootfs_rel, host_mounts: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_sources_keep_their_base_name() {
        assert_eq!(
            mount_rel(3, Path::new("/var/lib/kubelet/pods/x/etc-hosts")),
            Path::new("mounts/3/etc-hosts")
        );
        assert_eq!(mount_rel(0, Path::new("/")), Path::new("mounts/0/root"));
        assert_eq!(mount_rel(1, Path::new("/data/.hidden")), Path::new("mounts/1/.hidden"));
    }

    /// A bundle in a fresh directory `name` whose spec has these namespaces.
    fn bundle_with_namespaces(name: &str, namespaces: serde_json::Value) -> (PathBuf, Bundle) {
        let d = std::env::temp_dir().join(format!("husk-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).expect("mkdir");
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": namespaces},
        }))
        .expect("spec");
        let b = Bundle::from_spec(d.clone(), spec).expect("bundle");
        (d, b)
    }

    #[test]
    fn a_pod_network_namespace_becomes_the_vms_own() {
        let (d, b) = bundle_with_namespaces(
            "ns",
            serde_json::json!([
                {"type": "network", "path": "/proc/self/ns/net"},
                {"type": "uts", "path": "/proc/self/ns/uts"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "pid"},
            ]),
        );
        let peers = HashMap::from([(42, 7u32)]);
        let g = to_guest(&b, "c1", &d.join("shared"), &peers, false, false).expect("guest spec");
        let out: oci_spec::runtime::Spec = serde_json::from_slice(&g.spec_json).expect("json");
        let paths: Vec<(LinuxNamespaceType, Option<PathBuf>)> = out
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            paths,
            vec![
                (LinuxNamespaceType::Network, Some(PathBuf::from(GUEST_POD_NETNS))),
                (LinuxNamespaceType::Uts, None),
                (LinuxNamespaceType::Ipc, Some(PathBuf::from("/proc/7/ns/ipc"))),
                (LinuxNamespaceType::Pid, None),
            ]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_new_network_namespace_is_the_vms_own_for_the_container_that_starts_the_vm() {
        let (d, b) =
            bundle_with_namespaces("newns", serde_json::json!([{"type": "network"}, {"type": "pid"}]));
        let net_path = |starts_vm: bool| {
            let g = to_guest(&b, "c1", &d.join("shared"), &HashMap::new(), false, starts_vm).expect("guest");
            let out: oci_spec::runtime::Spec = serde_json::from_slice(&g.spec_json).expect("json");
            let nss = out.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
            assert_eq!(nss.len(), 2, "{nss:?}");
            nss.into_iter().find(|n| n.typ() == LinuxNamespaceType::Network).and_then(|n| n.path().clone())
        };
        assert_eq!(net_path(true), Some(PathBuf::from(GUEST_POD_NETNS)));
        // A later member of the VM that asks for its own network gets one.
        assert_eq!(net_path(false), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn load_refuses_bad_bundles() {
        let d = std::env::temp_dir().join(format!("husk-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).expect("mkdir");
        let e = Bundle::load(&d).expect_err("no config").to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(d.join("config.json"), b"{ not json").expect("write");
        let e = Bundle::load(&d).expect_err("bad json").to_string();
        assert!(e.contains("invalid OCI spec"), "{e}");
        let good = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#;
        std::fs::write(d.join("config.json"), good).expect("write");
        let b = Bundle::load(&d).expect("valid");
        assert_eq!(b.rootfs, d.join("rootfs").canonicalize().expect("canon"));
        std::fs::write(d.join("config.json"), good.replace("rootfs", "missing")).expect("write");
        let e = Bundle::load(&d).expect_err("missing rootfs").to_string();
        assert!(e.contains("rootfs"), "{e}");
        std::fs::write(d.join("config.json"), good.replace(r#"["sh"]"#, "[]")).expect("write");
        assert!(Bundle::load(&d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
