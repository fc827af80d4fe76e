//! Where the VMM, guest kernel and initramfs are, how big a sandbox VM is by default, and where
//! `husk run` finds its CNI networks and plugins.
//!
//! Sources, later ones winning: built-in defaults (files next to the `husk` binary as the build
//! lays them out, then `/usr/lib/husk`), the JSON file named by `HUSK_CONFIG` (default
//! `/etc/husk/config.json`, optional), then `HUSK_VMM`, `HUSK_KERNEL`, `HUSK_INITRAMFS`,
//! `HUSK_VM_MEMORY_MIB`, `HUSK_VM_VCPUS`, `HUSK_BOOT_TIMEOUT_SECS`, `HUSK_CNI_CONF_DIR`,
//! `HUSK_IMAGE_ROOT`, `HUSK_VMM_JAIL`, `HUSK_VMM_SECCOMP`, `HUSK_SNAPSHOTS`, `HUSK_SNAPSHOT_DIR`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::RuntimeError;

const DEFAULT_CONFIG: &str = "/etc/husk/config.json";
const SYSTEM_DIR: &str = "/usr/lib/husk";
/// husk's own CNI network configs (not `/etc/cni/net.d`: a node's Kubernetes networks are not
/// what a one-command sandbox should join by default).
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/husk/net.d";
/// Debian's containernetworking-plugins, then the upstream release tarball's place.
pub const DEFAULT_CNI_BIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// How long a new VM's agent gets to answer.
    pub boot_timeout: Duration,
    /// Guest kernel command line.
    pub cmdline: String,
    /// Where `husk run` looks for `*.conflist` network configs.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked up, in order (also their `CNI_PATH`).
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Images: where they are stored, which registries to reach how, unpacking caps.
    pub images: ImagesConfig,
    /// How each sandbox's VMM is confined.
    pub confinement: ConfinementConfig,
    /// Whether sandbox VMs start from a snapshot of a booted guest, and where those live.
    pub snapshots: SnapshotsConfig,
}

/// The config file's `snapshots` section; env `HUSK_SNAPSHOTS=0|1` and `HUSK_SNAPSHOT_DIR`
/// override it (`husk --no-snapshot` too).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotsConfig {
    /// Start VMs from a snapshot when one fits (made on first use); off boots every VM cold.
    pub enabled: bool,
    /// Where VM snapshots are kept (default `<images.root>/vm-snapshots`).
    pub dir: Option<PathBuf>,
    /// How many of the 2 MiB chunks of guest memory a restored guest touches most each VM
    /// copies into private 2 MiB pages before it runs (default: the VMM's, 6; 0: none; at
    /// most [`MAX_PRIVATE_CHUNKS`], 32). Each is 2 MiB more private memory per VM, and saves the guest's page faults
    /// there.
    pub private_chunks: Option<u32>,
}

/// Most `snapshots.private_chunks`: the VMM's own bound.
pub const MAX_PRIVATE_CHUNKS: u32 = husk_vmm::snapshot::busy_chunks::MAX_CHUNKS as u32;

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self { enabled: true, dir: None, private_chunks: None }
    }
}

/// The config file's `confinement` section; env `HUSK_VMM_JAIL=0` and
/// `HUSK_VMM_SECCOMP=enforce|log|off` override it. Turning anything off is for debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfinementConfig {
    /// The VMM in its own PID, mount, IPC and UTS namespaces, pivoted into a jail, in a cgroup
    /// of its own with memory and pids limits.
    pub jail: bool,
    /// The per-thread seccomp filters' action.
    pub seccomp: husk_vmm::confine::SeccompMode,
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        Self { jail: true, seccomp: husk_vmm::confine::SeccompMode::Enforce }
    }
}

/// The config file's `images` section (husk-image's settings, kept as plain data here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// husk's data root; images live in `<root>/images`.
    pub root: PathBuf,
    /// `host[:port]` of registries reached over plain HTTP (loopback ones always are).
    pub insecure_registries: Vec<String>,
    /// Registry → mirrors tried first, e.g. `{"docker.io": ["mirror.local:5000"]}`.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Largest uncompressed layer unpacked, in bytes.
    pub max_layer_bytes: u64,
    /// Most entries in one layer.
    pub max_layer_entries: u64,
    /// Layers fetched at once.
    pub parallel_downloads: usize,
}

/// husk's data root when the config names none.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/husk";

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_DATA_ROOT),
            insecure_registries: Vec::new(),
            mirrors: BTreeMap::new(),
            max_layer_bytes: 16 << 30,
            max_layer_entries: 1_000_000,
            parallel_downloads: 3,
        }
    }
}

/// The config file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    vmm: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    memory_mib: Option<u32>,
    vcpus: Option<u32>,
    boot_timeout_secs: Option<u64>,
    cmdline: Option<String>,
    cni_conf_dir: Option<PathBuf>,
    cni_bin_dirs: Option<Vec<PathBuf>>,
    images: Option<ImagesConfig>,
    confinement: Option<ConfinementConfig>,
    snapshots: Option<SnapshotsConfig>,
}

/// Smallest sandbox VM the runtime makes (the VMM's own floor is lower; the agent needs this).
pub const MIN_MEMORY_MIB: u32 = 64;
pub use husk_vmm::config::{MAX_MEMORY_MIB, MAX_VCPUS};

impl Config {
    pub fn load() -> Result<Self, RuntimeError> {
        Self::load_from(None)
    }

    /// As [`load`](Self::load), with the config file named by the caller (a shim's runtime
    /// options) instead of `HUSK_CONFIG`; a file named either way must exist.
    pub fn load_from(file: Option<&Path>) -> Result<Self, RuntimeError> {
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        let mut c = Self::defaults(exe_dir.as_deref());
        let path = file.map(Path::to_path_buf).or_else(|| std::env::var_os("HUSK_CONFIG").map(PathBuf::from));
        let file = path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        match std::fs::read(&file) {
            Ok(bytes) => {
                let f: FileConfig = serde_json::from_slice(&bytes)
                    .map_err(|e| RuntimeError::InvalidArgument(format!("config {}: {e}", file.display())))?;
                c.apply(f);
            }
            // Only a file named explicitly must exist.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_none() => {}
            Err(e) => {
                return Err(RuntimeError::Io {
                    what: format!("reading config {}", file.display()),
                    source: e,
                })
            }
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<u64>, RuntimeError> {
            env(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| RuntimeError::InvalidArgument(format!("{k}={v:?} is not a number")))
                })
                .transpose()
        };
        c.apply(FileConfig {
            vmm: env("HUSK_VMM").map(PathBuf::from),
            kernel: env("HUSK_KERNEL").map(PathBuf::from),
            initramfs: env("HUSK_INITRAMFS").map(PathBuf::from),
            memory_mib: num("HUSK_VM_MEMORY_MIB")?.map(|v| v.min(u32::MAX as u64) as u32),
            vcpus: num("HUSK_VM_VCPUS")?.map(|v| v.min(u32::MAX as u64) as u32),
            boot_timeout_secs: num("HUSK_BOOT_TIMEOUT_SECS")?,
            cmdline: env("HUSK_CMDLINE"),
            cni_conf_dir: env("HUSK_CNI_CONF_DIR").map(PathBuf::from),
            cni_bin_dirs: None,
            images: None,
            confinement: None,
            snapshots: None,
        });
        let flag = |k: &str| -> Result<Option<bool>, RuntimeError> {
            env(k)
                .map(|v| match v.as_str() {
                    "1" | "true" => Ok(true),
                    "0" | "false" => Ok(false),
                    _ => Err(RuntimeError::InvalidArgument(format!("{k}={v:?}: expected 0 or 1"))),
                })
                .transpose()
        };
        if let Some(on) = flag("HUSK_SNAPSHOTS")? {
            c.snapshots.enabled = on;
        }
        if let Some(d) = env("HUSK_SNAPSHOT_DIR") {
            c.snapshots.dir = Some(PathBuf::from(d));
        }
        if let Some(on) = flag("HUSK_VMM_JAIL")? {
            c.confinement.jail = on;
        }
        if let Some(v) = env("HUSK_VMM_SECCOMP") {
            c.confinement.seccomp =
                serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                    RuntimeError::InvalidArgument(format!(
                        "HUSK_VMM_SECCOMP={v:?}: expected enforce, log or off"
                    ))
                })?;
        }
        if let Some(root) = env("HUSK_IMAGE_ROOT") {
            c.images.root = PathBuf::from(root);
        }
        c.validate()?;
        Ok(c)
    }

    fn defaults(exe_dir: Option<&Path>) -> Self {
        // target/release/husk finds target/release/husk-vmm and target/husk/{vmlinux,agent.cpio}.
        let pick = |name: &str, build_rel: &str| -> PathBuf {
            let candidates = exe_dir
                .map(|d| vec![d.join(build_rel).join(name), d.join(name)])
                .unwrap_or_default()
                .into_iter()
                .chain([Path::new(SYSTEM_DIR).join(name)]);
            let all: Vec<PathBuf> = candidates.collect();
            all.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| all[0].clone())
        };
        Self {
            vmm: pick("husk-vmm", "."),
            kernel: pick("vmlinux", "../husk"),
            initramfs: pick("agent.cpio", "../husk"),
            memory_mib: 256,
            vcpus: 1,
            boot_timeout: Duration::from_secs(120),
            // pty.legacy_count=0: no BSD ptys (Unix98 ones are what containers use); making
            // the 256 of them was a third of the guest kernel's initcall time.
            cmdline: "console=ttyS0 reboot=k panic=-1 pci=off quiet pty.legacy_count=0".into(),
            cni_conf_dir: PathBuf::from(DEFAULT_CNI_CONF_DIR),
            cni_bin_dirs: DEFAULT_CNI_BIN_DIRS.iter().map(PathBuf::from).collect(),
            images: ImagesConfig::default(),
            confinement: ConfinementConfig::default(),
            snapshots: SnapshotsConfig::default(),
        }
    }

    /// Where VM snapshots are kept.
    pub fn snapshot_root(&self) -> PathBuf {
        self.snapshots.dir.clone().unwrap_or_else(|| self.images.root.join("vm-snapshots"))
    }

    fn apply(&mut self, f: FileConfig) {
        if let Some(v) = f.snapshots {
            self.snapshots = v;
        }
        if let Some(v) = f.confinement {
            self.confinement = v;
        }
        if let Some(v) = f.vmm {
            self.vmm = v;
        }
        if let Some(v) = f.kernel {
            self.kernel = v;
        }
        if let Some(v) = f.initramfs {
            self.initramfs = v;
        }
        if let Some(v) = f.memory_mib {
            self.memory_mib = v;
        }
        if let Some(v) = f.vcpus {
            self.vcpus = v;
        }
        if let Some(v) = f.boot_timeout_secs {
            self.boot_timeout = Duration::from_secs(v);
        }
        if let Some(v) = f.cmdline {
            self.cmdline = v;
        }
        if let Some(v) = f.cni_conf_dir {
            self.cni_conf_dir = v;
        }
        if let Some(v) = f.cni_bin_dirs {
            self.cni_bin_dirs = v;
        }
        if let Some(v) = f.images {
            self.images = v;
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        if self.memory_mib < MIN_MEMORY_MIB || u64::from(self.memory_mib) > MAX_MEMORY_MIB {
            return Err(RuntimeError::InvalidArgument(format!(
                "VM memory {} MiB is not {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(RuntimeError::InvalidArgument(format!(
                "VM vCPUs {} is not 1-{MAX_VCPUS}",
                self.vcpus
            )));
        }
        if !self.cni_conf_dir.is_absolute() {
            return Err(RuntimeError::InvalidArgument(format!(
                "cni_conf_dir {} is not absolute",
                self.cni_conf_dir.display()
            )));
        }
        if self.snapshots.dir.as_deref().is_some_and(|d| !d.is_absolute()) {
            return Err(RuntimeError::InvalidArgument("snapshots.dir is not absolute".into()));
        }
        if let Some(n) = self.snapshots.private_chunks.filter(|n| *n > MAX_PRIVATE_CHUNKS) {
            return Err(RuntimeError::InvalidArgument(format!(
                "snapshots.private_chunks {n} is more than {MAX_PRIVATE_CHUNKS}"
            )));
        }
        if !self.images.root.is_absolute() {
            return Err(RuntimeError::InvalidArgument(format!(
                "images.root {} is not absolute",
                self.images.root.display()
            )));
        }
        if self.images.max_layer_bytes == 0 || self.images.max_layer_entries == 0 {
            return Err(RuntimeError::InvalidArgument(
                "images.max_layer_bytes/max_layer_entries must be > 0".into(),
            ));
        }
        if !(1..=16).contains(&self.images.parallel_downloads) {
            return Err(RuntimeError::InvalidArgument("images.parallel_downloads must be 1-16".into()));
        }
        if self.cni_bin_dirs.is_empty() {
            return Err(RuntimeError::InvalidArgument("cni_bin_dirs is empty".into()));
        }
        // They are joined with ':' into the plugins' CNI_PATH.
        if let Some(d) = self
            .cni_bin_dirs
            .iter()
            .find(|d| !d.is_absolute() || d.as_os_str().as_encoded_bytes().contains(&b':'))
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "cni_bin_dirs: {} must be an absolute path without ':'",
                d.display()
            )));
        }
        Ok(())
    }

    /// Checks what a VM needs on this host, with a hint for each missing piece.
    pub fn preflight(&self) -> Result<(), RuntimeError> {
        if let Err(e) = std::fs::File::options().read(true).write(true).open("/dev/kvm") {
            return Err(RuntimeError::Missing {
                problem: format!("KVM is not usable: /dev/kvm: {e}"),
                hint: "husk runs every sandbox in a KVM microVM: enable hardware virtualization (or nested \
                       virtualization on a cloud VM), load kvm_intel or kvm_amd, and run as a user who may \
                       open /dev/kvm"
                    .into(),
            });
        }
        let missing = |what: &str, path: &Path, hint: &str| RuntimeError::Missing {
            problem: format!("{what} not found at {}", path.display()),
            hint: hint.to_string(),
        };
        if !self.vmm.is_file() {
            return Err(missing("husk-vmm", &self.vmm, "install husk-vmm next to husk, or set HUSK_VMM"));
        }
        if !self.kernel.is_file() {
            return Err(missing(
                "the guest kernel",
                &self.kernel,
                "build it with guest-kernel/build.sh (./tests/build-artifacts.sh does it), or set HUSK_KERNEL",
            ));
        }
        if !self.initramfs.is_file() {
            return Err(missing(
                "the guest initramfs",
                &self.initramfs,
                "build it with ./tests/build-artifacts.sh (target/husk/agent.cpio), or set HUSK_INITRAMFS",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_build_layout() {
        let c = Config::defaults(Some(Path::new("/x/target/release")));
        // Nothing exists there, so the first candidate (the build layout) is reported.
        assert_eq!(c.vmm, PathBuf::from("/x/target/release/./husk-vmm"));
        assert_eq!(c.kernel, PathBuf::from("/x/target/release/../husk/vmlinux"));
        assert_eq!(c.initramfs, PathBuf::from("/x/target/release/../husk/agent.cpio"));
        assert_eq!(c.cni_conf_dir, PathBuf::from("/etc/husk/net.d"));
        assert_eq!(c.cni_bin_dirs, vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn file_overrides_and_validation() {
        let mut c = Config::defaults(None);
        let f: FileConfig = serde_json::from_str(r#"{"memory_mib": 512, "vcpus": 2}"#).expect("parse");
        c.apply(f);
        assert_eq!((c.memory_mib, c.vcpus), (512, 2));
        assert!(serde_json::from_str::<FileConfig>(r#"{"memroy_mib": 1}"#).is_err());
        let f: FileConfig = serde_json::from_str(
            r#"{"images": {"insecure_registries": ["reg:5000"], "mirrors": {"docker.io": ["m:5000"]}, "max_layer_bytes": 1024}}"#,
        )
        .expect("parse");
        c.apply(f);
        assert_eq!(c.images.insecure_registries, ["reg:5000"]);
        assert_eq!(c.images.mirrors["docker.io"], ["m:5000"]);
        assert_eq!((c.images.max_layer_bytes, c.images.max_layer_entries), (1024, 1_000_000));
        assert_eq!(c.images.root, PathBuf::from("/var/lib/husk"));
        assert!(c.validate().is_ok());
        assert!(serde_json::from_str::<FileConfig>(r#"{"images": {"mirorrs": {}}}"#).is_err());
        c.memory_mib = 8;
        assert!(c.validate().is_err());
        let f: FileConfig =
            serde_json::from_str(r#"{"cni_conf_dir": "/n", "cni_bin_dirs": ["/a", "/b"]}"#).expect("parse");
        c.memory_mib = 128;
        c.apply(f);
        assert_eq!(c.cni_conf_dir, PathBuf::from("/n"));
        assert_eq!(c.cni_bin_dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(c.validate().is_ok());
        let mut c2 = c.clone();
        c2.apply(serde_json::from_str(r#"{"snapshots": {"private_chunks": 0}}"#).expect("parse"));
        assert_eq!(c2.snapshots.private_chunks, Some(0));
        assert!(c2.validate().is_ok());
        for bad in [
            r#"{"cni_bin_dirs": []}"#,
            r#"{"cni_bin_dirs": ["rel"]}"#,
            r#"{"cni_bin_dirs": ["/a:b"]}"#,
            r#"{"snapshots": {"private_chunks": 33}}"#,
        ] {
            let mut c2 = c.clone();
            c2.apply(serde_json::from_str(bad).expect("parse"));
            assert!(c2.validate().is_err(), "{bad}");
        }
        c.memory_mib = 128;
        c.vcpus = 0;
        assert!(c.validate().is_err());
    }
}
