//! Where tests find what `tests/build-artifacts.sh` built: husk binaries in the cargo target
//! directory, and guest images (kernel, initramfs) under `target/husk/`.

use std::path::{Path, PathBuf};

/// Set by the test command (and so by CI): a missing prerequisite fails the test instead of
/// skipping it.
pub const STRICT_ENV: &str = "HUSK_TESTS_STRICT";

pub fn strict() -> bool {
    std::env::var(STRICT_ENV).is_ok_and(|v| v == "1")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// Guest images: `vmlinux`, `bzImage`, `test-init.cpio`.
pub fn guest_dir() -> PathBuf {
    target_dir().join("husk")
}

/// A workspace binary built in the same profile as the running test (target/<profile>/).
pub fn bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Test executables live in target/<profile>/deps/.
    let profile_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let p = profile_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is not built (run tests/build-artifacts.sh or cargo build)", p.display()))
    }
}

pub fn guest_artifact(name: &str) -> Result<PathBuf, String> {
    let p = guest_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is missing (run tests/build-artifacts.sh)", p.display()))
    }
}

/// A static guest binary (built for x86_64-unknown-linux-gnu with crt-static).
pub fn guest_bin(name: &str) -> Result<PathBuf, String> {
    let p = target_dir().join("x86_64-unknown-linux-gnu/release").join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is not built (run tests/build-artifacts.sh)", p.display()))
    }
}

/// Resolves prerequisites or returns from the test: skipping with the reason, or panicking
/// with it in strict mode.
#[macro_export]
macro_rules! require {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reason) => {
                if $crate::artifacts::strict() {
                    panic!("prerequisite missing in strict mode: {reason}");
                }
                eprintln!("skipped: {reason}");
                return;
            }
        }
    };
}

/// What a device end-to-end test runs: the VMM, the host-side probe, the guest kernel and the
/// test initramfs. In a job, the files go along with [`DeviceTestKit::files`].
#[derive(Debug)]
pub struct DeviceTestKit {
    pub vmm: PathBuf,
    pub probe: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl DeviceTestKit {
    /// Resolves the kit, or why it (or the KVM test host) is unavailable.
    pub fn find() -> Result<Self, String> {
        if let Some(reason) = crate::unavailable_reason() {
            return Err(reason);
        }
        Ok(Self {
            vmm: bin("husk-vmm")?,
            probe: bin("husk-vsock-probe")?,
            kernel: guest_artifact("vmlinux")?,
            initrd: guest_artifact("test-init.cpio")?,
        })
    }

    pub fn files(&self) -> [&Path; 4] {
        [&self.vmm, &self.probe, &self.kernel, &self.initrd]
    }
}

/// A usable KVM (directly or nested) and a static busybox for container root file systems.
fn kvm_and_busybox() -> Result<PathBuf, String> {
    if let Some(reason) = crate::unavailable_reason() {
        return Err(reason);
    }
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.is_file() {
        return Err("/bin/busybox is missing (apt-get install busybox-static)".into());
    }
    Ok(busybox)
}

/// What the agent end-to-end test runs: the VMM, the static agent (host mode) and its initramfs
/// (VM mode), the probe that drives it, the guest kernel, and busybox for the container rootfs.
#[derive(Debug)]
pub struct AgentTestKit {
    pub vmm: PathBuf,
    pub agent: PathBuf,
    pub probe: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub busybox: PathBuf,
}

impl AgentTestKit {
    pub fn find() -> Result<Self, String> {
        let busybox = kvm_and_busybox()?;
        Ok(Self {
            vmm: bin("husk-vmm")?,
            agent: guest_bin("husk-agent")?,
            probe: bin("husk-agent-probe")?,
            kernel: guest_artifact("vmlinux")?,
            initrd: guest_artifact("agent.cpio")?,
            busybox,
        })
    }

    pub fn files(&self) -> [&Path; 6] {
        [&self.vmm, &self.agent, &self.probe, &self.kernel, &self.initrd, &self.busybox]
    }
}

/// What the runtime end-to-end test runs: the `husk` CLI with the VMM, kernel and agent
/// initramfs it finds next to itself, busybox for rootfs, and the real clients that drive it
/// (containerd + ctr + its runc shim, podman + conmon, umoci for an image layout, `script`
/// for a pty).
#[derive(Debug)]
pub struct RuntimeTestKit {
    pub husk: PathBuf,
    /// containerd-shim-husk-v2, next to `husk`.
    pub shim: PathBuf,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub busybox: PathBuf,
    /// Peer programs, absolute.
    pub peers: Vec<PathBuf>,
}

/// The clients and tools the runtime test drives, with the Debian package of each.
pub const RUNTIME_PEERS: [(&str, &str); 7] = [
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("podman", "podman"),
    ("conmon", "conmon"),
    ("umoci", "umoci"),
    ("script", "util-linux"),
];

impl RuntimeTestKit {
    pub fn find() -> Result<Self, String> {
        let busybox = kvm_and_busybox()?;
        let mut peers = Vec::new();
        for (name, pkg) in RUNTIME_PEERS {
            let p = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| format!("{name} is not installed (apt-get install {pkg})"))?;
            peers.push(p);
        }
        Ok(Self {
            husk: bin("husk")?,
            shim: bin("containerd-shim-husk-v2")?,
            vmm: bin("husk-vmm")?,
            kernel: guest_artifact("vmlinux")?,
            initrd: guest_artifact("agent.cpio")?,
            busybox,
            peers,
        })
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [&self.husk, &self.shim, &self.vmm, &self.kernel, &self.initrd, &self.busybox]
            .into_iter()
            .map(PathBuf::as_path)
            .chain(self.peers.iter().map(PathBuf::as_path))
    }
}

/// What the network end-to-end test adds to the runtime kit: its L1-side probe, the guest's UDP
/// echo server, the CNI plugins of husk's default network and of podman's, and iptables
/// (the plugins run it).
#[derive(Debug)]
pub struct NetTestKit {
    pub runtime: RuntimeTestKit,
    /// husk-net-probe (host build).
    pub probe: PathBuf,
    /// husk-udp-echo (static, for the container rootfs).
    pub udp_echo: PathBuf,
    /// husk-tcp-hello (static, for the container rootfs): the many-connections check's server.
    pub tcp_hello: PathBuf,
    /// CNI plugins, iptables and its extensions, netavark where podman would use it.
    pub net_files: Vec<PathBuf>,
}

/// CNI plugins the test's networks use: husk's default conflist (bridge, host-local, portmap;
/// loopback) and podman's default network (adds firewall and tuning).
pub const CNI_PLUGINS: [&str; 6] = ["bridge", "host-local", "portmap", "loopback", "firewall", "tuning"];

/// The CNI plugins of [`CNI_PLUGINS`] and iptables, which they run: Debian's iptables are
/// links (through /etc/alternatives) to xtables-nft-multi, which dlopens its match and target
/// extensions; the firewall plugin needs ip6tables too.
pub fn cni_files() -> Result<Vec<PathBuf>, String> {
    let need = |p: String, pkg: &str| -> Result<PathBuf, String> {
        let path = PathBuf::from(&p);
        if path.exists() {
            Ok(path)
        } else {
            Err(format!("{p} is missing (apt-get install {pkg})"))
        }
    };
    let mut files = Vec::new();
    for p in CNI_PLUGINS {
        files.push(need(format!("/usr/lib/cni/{p}"), "containernetworking-plugins")?);
    }
    for t in
        ["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"]
    {
        files.push(need(format!("/usr/sbin/{t}"), "iptables")?);
    }
    files.push(need("/usr/lib/x86_64-linux-gnu/xtables".into(), "iptables")?);
    Ok(files)
}

impl NetTestKit {
    pub fn find() -> Result<Self, String> {
        let runtime = RuntimeTestKit::find()?;
        let mut net_files = cni_files()?;
        // Where a machine has netavark, podman uses it instead of CNI, with its helpers.
        if Path::new("/usr/lib/podman/netavark").exists() {
            net_files.push(PathBuf::from("/usr/lib/podman"));
        }
        Ok(Self {
            runtime,
            probe: bin("husk-net-probe")?,
            udp_echo: guest_bin("husk-udp-echo")?,
            tcp_hello: guest_bin("husk-tcp-hello")?,
            net_files,
        })
    }

    /// Everything the job needs in L1: only the runtime peers it drives (podman, conmon), since
    /// every MiB of L1's initramfs costs boot time.
    pub fn files(&self) -> Vec<PathBuf> {
        let k = &self.runtime;
        let peers = k.peers.iter().filter(|p| p.ends_with("podman") || p.ends_with("conmon"));
        [&k.husk, &k.vmm, &k.kernel, &k.initrd, &k.busybox, &self.probe, &self.udp_echo, &self.tcp_hello]
            .into_iter()
            .chain(peers)
            .chain(&self.net_files)
            .cloned()
            .collect()
    }
}

/// A program in one of the system directories, or why not (with the Debian package to install).
fn system_program(name: &str, pkg: &str) -> Result<PathBuf, String> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} is not installed (apt-get install {pkg})"))
}

/// The host tools the image tests use, with the Debian package of each: a registry to pull
/// from, skopeo to push to it (and to read it back as a reference client), libcap's tools for
/// file capabilities, and the compressors of the test layers (which the tests write entry by
/// entry, so that each layer holds exactly what a check needs).
pub const IMAGE_TOOLS: [(&str, &str); 6] = [
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("setcap", "libcap2-bin"),
    ("getcap", "libcap2-bin"),
    ("gzip", "gzip"),
    ("zstd", "zstd"),
];

/// What the image tests (pulls from a registry, the content store, images run in a sandbox)
/// use: the `husk` CLI, a static busybox for the images' root file systems, and the tools of
/// [`IMAGE_TOOLS`]. [`ImageTestKit::find`] needs no KVM (pulls and the store work on any host);
/// [`ImageTestKit::vm`] adds what running an image in the test host takes.
#[derive(Debug)]
pub struct ImageTestKit {
    pub husk: PathBuf,
    /// A static busybox (busybox-static): it runs in the images and in L1.
    pub busybox: PathBuf,
    pub registry: PathBuf,
    pub skopeo: PathBuf,
    pub setcap: PathBuf,
    pub getcap: PathBuf,
    pub gzip: PathBuf,
    pub zstd: PathBuf,
}

/// What [`ImageTestKit`] adds to run images in a sandbox (as [`RuntimeTestKit`] finds them:
/// husk finds the VMM, kernel and agent initramfs next to itself).
#[derive(Debug)]
pub struct ImageVmKit {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl ImageTestKit {
    /// The host side: no KVM needed.
    pub fn find() -> Result<Self, String> {
        let busybox = PathBuf::from("/bin/busybox");
        if !is_static_elf(&busybox) {
            return Err("/bin/busybox is missing or not static (apt-get install busybox-static)".into());
        }
        let tool = |i: usize| system_program(IMAGE_TOOLS[i].0, IMAGE_TOOLS[i].1);
        Ok(Self {
            husk: bin("husk")?,
            busybox,
            registry: tool(0)?,
            skopeo: tool(1)?,
            setcap: tool(2)?,
            getcap: tool(3)?,
            gzip: tool(4)?,
            zstd: tool(5)?,
        })
    }

    /// The VM side: a usable KVM (directly or through the nested test host), the VMM, the guest
    /// kernel and the agent initramfs.
    pub fn vm(&self) -> Result<ImageVmKit, String> {
        kvm_and_busybox()?;
        Ok(ImageVmKit {
            vmm: bin("husk-vmm")?,
            kernel: guest_artifact("vmlinux")?,
            initrd: guest_artifact("agent.cpio")?,
        })
    }
}

/// Whether `path` is an x86-64 ELF executable without an interpreter (`PT_INTERP`), i.e. one that
/// runs in an image with no libc.
pub fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(b) = std::fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (size, num) = (u16_at(0x36), u16_at(0x38));
    if size < 4 || phoff.saturating_add(size * num) > b.len() {
        return false;
    }
    !(0..num).any(|i| {
        let o = phoff + i * size;
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == PT_INTERP
    })
}
