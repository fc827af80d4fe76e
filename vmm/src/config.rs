//! VM configuration: one schema, read from CLI flags or a JSON file, validated before any KVM
//! resource is created so that bad input costs nothing and gets a precise message.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Guest memory bounds. The floor keeps the boot structures and a tiny kernel in reach; the
/// ceiling is far beyond any sandbox but catches unit mistakes (bytes given as MiB).
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 1 << 20; // 1 TiB
/// xAPIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// Linux on x86 reads at most 2048 bytes of command line (COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_LEN: usize = 2048;

pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    ReadFile { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Json { path: PathBuf, err: serde_json::Error },
    #[error("{what} {path}: {reason}")]
    File { what: &'static str, path: PathBuf, reason: String },
    #[error("memory_mib {0} is out of range ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB})")]
    Memory(u64),
    #[error("vcpus {0} is out of range (1..={MAX_VCPUS})")]
    Vcpus(u32),
    #[error("cmdline is {0} bytes; the kernel accepts at most {MAX_CMDLINE_LEN}")]
    CmdlineTooLong(usize),
    #[error("cmdline must be printable ASCII without newlines")]
    CmdlineChars,
    #[error("serial {0:?}: expected stdio, none or file:PATH")]
    Serial(String),
    #[error("fs {spec:?}: {reason} (expected tag=TAG,path=DIR[,ro][,cache=never|auto|always])")]
    FsSpec { spec: String, reason: String },
    #[error("fs share {tag:?}: {reason}")]
    FsShare { tag: String, reason: String },
    #[error("vsock {0:?}: expected PATH[,cid=N]")]
    VsockSpec(String),
    #[error("vsock guest cid {0} is reserved or out of range (3..=4294967294)")]
    VsockCid(u64),
    #[error("vsock socket {path}: {reason}")]
    VsockPath { path: PathBuf, reason: String },
    #[error("jail root {path}: {reason}")]
    Jail { path: PathBuf, reason: String },
    #[error("loopback_forward needs a vsock device and a listen_port other than 0")]
    LoopbackForward,
    #[error("net {spec:?}: {reason} (expected tap=NAME or detached, then [,mac=MAC][,mtu=N])")]
    NetSpec { spec: String, reason: String },
    #[error("net device {tap:?}: {reason}")]
    Net { tap: String, reason: String },
}

/// Where the guest's 16550 console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// Output to our stdout; input from our stdin when it is a terminal or pipe.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No console device at all.
    None,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// virtio-vsock with the host side on Unix sockets: `uds_path` takes host-initiated
/// connections (`CONNECT <port>`), and a guest connect to port P reaches `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub uds_path: PathBuf,
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
}

fn default_guest_cid() -> u64 {
    3
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;
    /// `PATH[,cid=N]`
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::VsockSpec(s.to_string());
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let mut cfg = VsockConfig { uds_path: PathBuf::from(path), guest_cid: default_guest_cid() };
        for p in parts {
            let cid = p.strip_prefix("cid=").ok_or_else(bad)?;
            cfg.guest_cid = cid.parse().map_err(|_| bad())?;
        }
        Ok(cfg)
    }
}

impl VsockConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // CIDs are 32-bit in Linux; 0-2 and u32::MAX are reserved.
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let err =
            |reason: &str| ConfigError::VsockPath { path: self.uds_path.clone(), reason: reason.into() };
        // sun_path holds 108 bytes; guest-to-host listeners add `_<port>` (up to 11 bytes).
        if self.uds_path.as_os_str().len() + 11 >= 108 {
            return Err(err("path too long for a Unix socket"));
        }
        let parent = match self.uds_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(err("parent directory does not exist"));
        }
        if self.uds_path.is_dir() {
            return Err(err("is a directory"));
        }
        Ok(())
    }
}

/// Longest virtio-fs mount tag: the size of the tag field in the device's config space.
pub const MAX_FS_TAG_LEN: usize = 36;

/// How much of a share the guest may cache (the meaning of virtiofsd's `cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsCache {
    /// Nothing cached: every access reaches the host (directories the host changes too).
    Never,
    /// Close-to-open consistency; attributes and names trusted for one second.
    #[default]
    Auto,
    /// Everything cached for a day: only for directories nothing else changes.
    Always,
}

impl std::str::FromStr for FsCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            _ => Err(format!("cache={s:?} is not never, auto or always")),
        }
    }
}

/// A host directory shared with the guest over virtio-fs (`mount -t virtiofs TAG DIR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsShareConfig {
    pub tag: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub cache: FsCache,
}

impl std::str::FromStr for FsShareConfig {
    type Err = ConfigError;
    /// `tag=TAG,path=DIR[,ro][,cache=never|auto|always]` (so DIR cannot contain a comma).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::FsSpec { spec: s.to_string(), reason };
        let (mut tag, mut path, mut ro, mut cache) = (None, None, None, None);
        for part in s.split(',') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let repeated = match (key, value) {
                ("tag", Some(v)) => tag.replace(v.to_string()).is_some(),
                ("path", Some(v)) => path.replace(PathBuf::from(v)).is_some(),
                ("ro", None) => ro.replace(true).is_some(),
                ("cache", Some(v)) => cache.replace(v.parse::<FsCache>().map_err(bad)?).is_some(),
                ("tag" | "path" | "cache", None) => return Err(bad(format!("{key} needs a value"))),
                ("ro", Some(_)) => return Err(bad("ro takes no value".into())),
                _ => return Err(bad(format!("unknown option {part:?}"))),
            };
            if repeated {
                return Err(bad(format!("{key} given twice")));
            }
        }
        Ok(Self {
            tag: tag.ok_or_else(|| bad("tag= is missing".into()))?,
            path: path.ok_or_else(|| bad("path= is missing".into()))?,
            read_only: ro.unwrap_or(false),
            cache: cache.unwrap_or_default(),
        })
    }
}

impl FsShareConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError::FsShare { tag: self.tag.clone(), reason };
        if self.tag.is_empty() {
            return Err(err("tag is empty".into()));
        }
        if self.tag.len() > MAX_FS_TAG_LEN {
            return Err(err(format!("tag is {} bytes; at most {MAX_FS_TAG_LEN} fit", self.tag.len())));
        }
        if self.tag.contains('\0') {
            return Err(err("tag contains a NUL byte".into()));
        }
        let path = self.path.display();
        if self.path.to_str().is_none_or(|p| p.contains('\0')) {
            return Err(err(format!("path {path}: not valid UTF-8 or contains NUL")));
        }
        match std::fs::metadata(&self.path) {
            Err(e) => Err(err(format!("path {path}: {e}"))),
            Ok(m) if !m.is_dir() => Err(err(format!("path {path}: not a directory"))),
            Ok(_) => Ok(()),
        }
    }
}

/// Smallest and largest MTU a guest interface can be given (Linux's IPv4 minimum; what the
/// config field holds).
pub const MIN_MTU: u16 = 68;

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("MAC {s:?} is not six hex pairs separated by ':'");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net device on a tap in husk-vmm's network namespace (created if absent), or
/// detached from any: what the guest sends is dropped and nothing arrives. A snapshot
/// template's devices are detached, so every VM restored from it attaches a tap of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's name; none: detached.
    #[serde(default)]
    pub tap: Option<String>,
    /// The guest interface's MAC; a random locally administered one when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Offered to the guest (VIRTIO_NET_F_MTU) when set.
    #[serde(default)]
    pub mtu: Option<u16>,
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;
    /// `tap=NAME[,mac=MAC][,mtu=N]` or `detached[,mac=MAC][,mtu=N]`
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::NetSpec { spec: s.to_string(), reason };
        let (mut tap, mut mac, mut mtu, mut detached) = (None, None, None, false);
        for part in s.split(',') {
            if part == "detached" {
                if std::mem::replace(&mut detached, true) {
                    return Err(bad("detached given twice".into()));
                }
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(bad(format!("{part:?} is not KEY=VALUE")));
            };
            let repeated = match key {
                "tap" => tap.replace(value.to_string()).is_some(),
                "mac" => mac.replace(value.parse::<MacAddr>().map_err(bad)?).is_some(),
                "mtu" => {
                    mtu.replace(value.parse::<u16>().map_err(|_| bad(format!("mtu={value:?}")))?).is_some()
                }
                _ => return Err(bad(format!("unknown option {key:?}"))),
            };
            if repeated {
                return Err(bad(format!("{key} given twice")));
            }
        }
        match (tap, detached) {
            (Some(_), true) => Err(bad("a device is on a tap or detached, not both".into())),
            (None, false) => Err(bad("tap= (or detached) is missing".into())),
            (tap, _) => Ok(Self { tap, mac, mtu }),
        }
    }
}

impl NetConfig {
    /// The tap's name, or "detached": how errors name the device.
    pub fn label(&self) -> String {
        self.tap.clone().unwrap_or_else(|| "detached".into())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError::Net { tap: self.label(), reason };
        if let Some(tap) = &self.tap {
            crate::devices::virtio::net::tap::check_name(tap).map_err(|e| err(e.to_string()))?;
        }
        if let Some(m) = self.mac {
            if m.0[0] & 1 != 0 {
                return Err(err(format!("MAC {m} is a multicast address")));
            }
            if m.0 == [0; 6] {
                return Err(err("MAC 00:00:00:00:00:00 is no address".into()));
            }
        }
        if let Some(mtu) = self.mtu.filter(|m| *m < MIN_MTU) {
            return Err(err(format!("mtu {mtu} is below {MIN_MTU}")));
        }
        Ok(())
    }
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_vcpus() -> u32 {
    1
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_true() -> bool {
    true
}

/// The whole VM description. The JSON file uses these field names; CLI flags map onto them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF `vmlinux` with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (any format the kernel unpacks).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; husk appends its device parameters to it.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-rng, so the guest's entropy pool is ready without waiting for jitter.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Host directories shared over virtio-fs, one device each.
    #[serde(default)]
    pub fs: Vec<FsShareConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-net devices, one per tap, in guest interface order (eth0 first).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// TCP connections to this namespace's loopback carried to the guest's (needs `vsock`).
    #[serde(default)]
    pub loopback_forward: Option<LoopbackForward>,
    /// Confine the VMM process: its own mount, IPC and UTS namespaces with a root of its own.
    #[serde(default)]
    pub jail: Option<JailConfig>,
    /// What the per-thread seccomp filters do with a syscall outside them.
    #[serde(default)]
    pub seccomp: crate::confine::SeccompMode,
}

/// The VMM's jail: a root holding only its shares and its vsock socket directory (see `jail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An empty directory; the VMM mounts a small tmpfs on it and pivots into it.
    pub root: PathBuf,
    /// RLIMIT_NOFILE for the VMM (kept within the inherited hard limit without CAP_SYS_RESOURCE).
    #[serde(default = "default_nofile")]
    pub nofile: u64,
}

/// Share inodes and open files (capped in `fs::limits`), vsock connections (1024) and a few
/// dozen of the VMM's own.
pub const DEFAULT_JAIL_NOFILE: u64 = 65_536;

fn default_nofile() -> u64 {
    DEFAULT_JAIL_NOFILE
}

/// husk-vmm listens on `127.0.0.1:<listen_port>` of its network namespace (the pod's) and
/// turns each connection into a vsock stream to guest port `guest_port`, opened with
/// `FORWARD <the connection's original destination port>` (see `loopback_forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopbackForward {
    pub listen_port: u16,
    pub guest_port: u32,
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initramfs: None,
            cmdline: default_cmdline(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            serial: SerialConfig::Stdio,
            rng: true,
            fs: Vec::new(),
            vsock: None,
            net: Vec::new(),
            loopback_forward: None,
            jail: None,
            seccomp: Default::default(),
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::ReadFile { path: path.to_path_buf(), err })?;
        Self::from_json(&text).map_err(|err| ConfigError::Json { path: path.to_path_buf(), err })
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Checks everything that can be checked without KVM: ranges, strings and that input
    /// files are readable regular files. Image formats are checked when loading.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if !self.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ConfigError::CmdlineChars);
        }
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initramfs {
            check_readable_file("initramfs", initrd)?;
        }
        for (i, share) in self.fs.iter().enumerate() {
            share.validate()?;
            if self.fs[..i].iter().any(|s| s.tag == share.tag) {
                return Err(ConfigError::FsShare { tag: share.tag.clone(), reason: "tag used twice".into() });
            }
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        for (i, n) in self.net.iter().enumerate() {
            n.validate()?;
            if n.tap.is_some() && self.net[..i].iter().any(|o| o.tap == n.tap) {
                return Err(ConfigError::Net { tap: n.label(), reason: "tap used twice".into() });
            }
        }
        if let Some(f) = &self.loopback_forward {
            if self.vsock.is_none() || f.listen_port == 0 {
                return Err(ConfigError::LoopbackForward);
            }
        }
        if let Some(j) = &self.jail {
            let err = |reason: &str| ConfigError::Jail { path: j.root.clone(), reason: reason.into() };
            if !j.root.is_absolute() {
                return Err(err("must be an absolute path"));
            }
            let mut entries = std::fs::read_dir(&j.root).map_err(|e| err(&e.to_string()))?;
            if entries.next().is_some() {
                return Err(err("is not empty"));
            }
            if j.nofile < 64 {
                return Err(err("nofile below 64"));
            }
        }
        Ok(())
    }
}

fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File { what, path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("file is empty".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_file(name: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("husk-cfg-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn json_defaults_and_round_trip() {
        let cfg = VmConfig::from_json(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(cfg, VmConfig::new("/k".into()));
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(VmConfig::from_json(&text).unwrap(), cfg);
        let cfg = VmConfig::from_json(r#"{"kernel":"/k","serial":{"file":"/tmp/x"},"vcpus":2}"#).unwrap();
        assert_eq!(cfg.serial, SerialConfig::File("/tmp/x".into()));
    }

    #[test]
    fn json_rejects_unknown_fields_and_bad_types() {
        assert!(VmConfig::from_json(r#"{"kernel":"/k","memory":64}"#).is_err());
        assert!(VmConfig::from_json(r#"{"kernel":"/k","vcpus":-1}"#).is_err());
        assert!(VmConfig::from_json(r#"{"kernel":"/k","serial":{"file":"/x","y":1}}"#).is_err());
        assert!(VmConfig::from_json(r#"{"kernel":"/k""#).is_err());
        assert!(VmConfig::from_json(r#"{}"#).is_err());
    }

    #[test]
    fn validate_ranges() {
        let k = tmp_file("kernel", b"x");
        let mut cfg = VmConfig::new(k.clone());
        cfg.validate().unwrap();
        cfg.vcpus = 0;
        assert!(matches!(cfg.validate(), Err(ConfigError::Vcpus(0))));
        cfg.vcpus = 100_000;
        assert!(matches!(cfg.validate(), Err(ConfigError::Vcpus(_))));
        cfg.vcpus = 1;
        cfg.memory_mib = 1;
        assert!(matches!(cfg.validate(), Err(ConfigError::Memory(1))));
        cfg.memory_mib = u64::MAX;
        assert!(cfg.validate().is_err());
        cfg.memory_mib = 64;
        cfg.cmdline = "a\nb".into();
        assert!(matches!(cfg.validate(), Err(ConfigError::CmdlineChars)));
        cfg.cmdline = "x".repeat(4096);
        assert!(matches!(cfg.validate(), Err(ConfigError::CmdlineTooLong(_))));
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn validate_files() {
        let cfg = VmConfig::new("/nonexistent/vmlinux".into());
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("kernel /nonexistent/vmlinux"), "{msg}");
        let cfg = VmConfig::new("/".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("not a regular file"));
        let empty = tmp_file("empty", b"");
        let cfg = VmConfig::new(empty.clone());
        assert!(cfg.validate().unwrap_err().to_string().contains("empty"));
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn net_parse_and_validate() {
        let n: NetConfig = "tap=tap0,mac=02:00:0a:d5:07:02,mtu=1450".parse().unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0x0a, 0xd5, 7, 2])));
        assert_eq!(n.mtu, Some(1450));
        n.validate().unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.contains("\"02:00:0a:d5:07:02\""), "{json}");
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), n);
        for bad in [
            "",
            "tap0",
            "mac=02:00:00:00:00:01",
            "tap=a,tap=b",
            "tap=a,mac=02:00",
            "tap=a,mtu=x",
            "tap=a,x=1",
            "tap=a,detached",
            "detached,detached",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        // Detached: no tap; any number of them, as a template has one per pod interface.
        let d: NetConfig = "detached,mac=02:68:75:73:6b:00".parse().unwrap();
        assert_eq!((d.tap.as_deref(), d.label().as_str()), (None, "detached"));
        d.validate().unwrap();
        assert_eq!(serde_json::from_str::<NetConfig>(&serde_json::to_string(&d).unwrap()).unwrap(), d);
        for bad in [
            "tap=a-name-too-long-16",
            "tap=a/b",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
            "tap=a,mtu=67",
        ] {
            let n: NetConfig = bad.parse().unwrap();
            assert!(n.validate().is_err(), "{bad}");
        }
        let k = tmp_file("kernel-net", b"x");
        let mut cfg = VmConfig::new(k.clone());
        cfg.net = vec!["tap=t0".parse().unwrap(), "tap=t0".parse().unwrap()];
        assert!(cfg.validate().unwrap_err().to_string().contains("tap used twice"));
        cfg.net = vec!["detached".parse().unwrap(), "detached".parse().unwrap()];
        cfg.validate().unwrap();
        assert!(VmConfig::from_json(r#"{"kernel":"/k","net":[{"tap":"t0","mac":"zz"}]}"#).is_err());
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn vsock_parse_and_validate() {
        let v: VsockConfig = "/tmp/v.sock".parse().unwrap();
        assert_eq!((v.uds_path.to_str(), v.guest_cid), (Some("/tmp/v.sock"), 3));
        let v: VsockConfig = "/tmp/v.sock,cid=42".parse().unwrap();
        assert_eq!(v.guest_cid, 42);
        v.validate().unwrap();
        for bad in ["", ",cid=3", "/tmp/x,cid=", "/tmp/x,cid=-1", "/tmp/x,port=3"] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let v = VsockConfig { uds_path: "/tmp/v.sock".into(), guest_cid: cid };
            assert!(matches!(v.validate(), Err(ConfigError::VsockCid(_))), "{cid}");
        }
        let v: VsockConfig = "/nonexistent/dir/v.sock".parse().unwrap();
        assert!(v.validate().unwrap_err().to_string().contains("parent directory"));
        let long = format!("/tmp/{}", "x".repeat(120));
        assert!(long
            .parse::<VsockConfig>()
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
            .contains("too long"));
        let cfg =
            VmConfig::from_json(r#"{"kernel":"/k","vsock":{"uds_path":"/tmp/v","guest_cid":9}}"#).unwrap();
        assert_eq!(cfg.vsock.unwrap().guest_cid, 9);
        assert!(VmConfig::from_json(r#"{"kernel":"/k","vsock":{"uds_path":"/tmp/v","cid":9}}"#).is_err());
    }

    #[test]
    fn fs_share_parse() {
        let s: FsShareConfig = "tag=src,path=/a/b".parse().unwrap();
        assert_eq!(
            s,
            FsShareConfig { tag: "src".into(), path: "/a/b".into(), read_only: false, cache: FsCache::Auto }
        );
        let s: FsShareConfig = "path=/x,ro,cache=never,tag=t".parse().unwrap();
        assert_eq!((s.tag.as_str(), s.read_only, s.cache), ("t", true, FsCache::Never));
        assert_eq!("tag=t,path=/x,cache=always".parse::<FsShareConfig>().unwrap().cache, FsCache::Always);
        for (bad, why) in [
            ("", "unknown option"),
            ("tag=t", "path= is missing"),
            ("path=/x", "tag= is missing"),
            ("tag=t,path=/x,tag=u", "tag given twice"),
            ("tag=t,path=/x,ro,ro", "ro given twice"),
            ("tag=t,path=/x,ro=1", "ro takes no value"),
            ("tag,path=/x", "tag needs a value"),
            ("tag=t,path=/x,cache=sometimes", "not never, auto or always"),
            ("tag=t,path=/x,rw", "unknown option \"rw\""),
            ("tag=t,path=/a,b", "unknown option \"b\""),
        ] {
            let msg = bad.parse::<FsShareConfig>().unwrap_err().to_string();
            assert!(msg.contains(why) && msg.contains("expected tag=TAG"), "{bad}: {msg}");
        }
    }

    #[test]
    fn fs_share_validate() {
        let k = tmp_file("fs-kernel", b"x");
        let dir = std::env::temp_dir();
        let share = |tag: &str, path: &Path| FsShareConfig {
            tag: tag.into(),
            path: path.into(),
            read_only: true,
            cache: FsCache::Auto,
        };
        let mut cfg = VmConfig::new(k.clone());
        cfg.fs = vec![share("a", &dir), share(&"x".repeat(MAX_FS_TAG_LEN), &dir)];
        cfg.validate().unwrap();
        let check = |shares: Vec<FsShareConfig>, why: &str| {
            let mut cfg = VmConfig::new(k.clone());
            cfg.fs = shares;
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.contains(why), "{msg}");
        };
        check(vec![share("", &dir)], "tag is empty");
        check(vec![share(&"x".repeat(MAX_FS_TAG_LEN + 1), &dir)], "at most 36");
        check(vec![share("a\0b", &dir)], "NUL");
        check(vec![share("a", &dir), share("a", &dir)], "tag used twice");
        check(vec![share("a", Path::new("/nonexistent/husk"))], "/nonexistent/husk");
        check(vec![share("a", &k)], "not a directory");
        check(vec![share("a", Path::new("/tmp/a\0b"))], "NUL");
        let cfg = VmConfig::from_json(
            r#"{"kernel":"/k","fs":[{"tag":"t","path":"/d","read_only":true,"cache":"never"}]}"#,
        )
        .unwrap();
        let want =
            FsShareConfig { tag: "t".into(), path: "/d".into(), read_only: true, cache: FsCache::Never };
        assert_eq!(cfg.fs, vec![want]);
        let bad_shares = [r#"{"tag":"t","path":"/d","ro":true}"#, r#"{"tag":"t","path":"/d","cache":"no"}"#];
        for bad in bad_shares {
            assert!(VmConfig::from_json(&format!(r#"{{"kernel":"/k","fs":[{bad}]}}"#)).is_err(), "{bad}");
        }
        assert_eq!(VmConfig::from_json(r#"{"kernel":"/k"}"#).unwrap().fs, vec![]);
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn serial_parse() {
        assert_eq!("stdio".parse::<SerialConfig>().unwrap(), SerialConfig::Stdio);
        assert_eq!("file:/a".parse::<SerialConfig>().unwrap(), SerialConfig::File("/a".into()));
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
    }
}
