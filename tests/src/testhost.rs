//! Runs a shell script where a real KVM is available: on the host when its `/dev/kvm` is a
//! real one, otherwise inside an "L1" Linux VM under QEMU TCG whose emulated AMD CPU has SVM,
//! so that `kvm-amd` loads there and provides a real `/dev/kvm`.
//!
//! The local `/dev/kvm` on the development machines is nested PVM (`kvm_pvm`), which runs guest
//! ring-0 code through an instruction emulator and cannot boot Linux in useful time; see
//! `shared/kvm-on-this-machine.md`. The same script runs in both modes: files it needs are
//! copied into L1 at their host paths.
//!
//! L1 protocol: ttyS0 is L1's console (kept for error reports); ttyS1, in raw mode, carries
//! a ready line, then the script's stdout+stderr, then an exit trailer.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::TestHostError;
use crate::initramfs::{which, Initramfs};
use crate::l1_assets::{l1_assets, tail, EXTRA_MODULES, KVM_MODULES};
use crate::l1_kick;

/// How tests get a real KVM on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmMode {
    /// The host's `/dev/kvm` is real hardware virtualization (`kvm_intel` / `kvm_amd`).
    Direct,
    /// Jobs run inside an L1 VM under QEMU TCG that provides a real `/dev/kvm`.
    Nested,
    /// Neither works; the reason is meant to be printed by skipping tests.
    Unavailable(String),
}

/// Decides how jobs run. `HUSK_TESTHOST=direct|nested` forces a mode (for debugging).
pub fn kvm_mode() -> KvmMode {
    match std::env::var("HUSK_TESTHOST").as_deref() {
        Ok("direct") => return KvmMode::Direct,
        Ok("nested") => return KvmMode::Nested,
        Ok("") | Ok("auto") | Err(_) => {}
        Ok(other) => {
            return KvmMode::Unavailable(format!("HUSK_TESTHOST={other:?} is not direct|nested|auto"))
        }
    }
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let pvm = module("kvm_pvm");
    let real = module("kvm_intel") || module("kvm_amd");
    if real && !pvm && dev_kvm_usable() {
        return KvmMode::Direct;
    }
    if which("qemu-system-x86_64").is_ok() {
        return KvmMode::Nested;
    }
    let local = if pvm {
        "the local /dev/kvm is nested PVM (kvm_pvm), too slow to boot Linux"
    } else if !Path::new("/dev/kvm").exists() {
        "/dev/kvm is absent"
    } else {
        "/dev/kvm is not usable"
    };
    KvmMode::Unavailable(format!("{local}, and qemu-system-x86_64 (for the nested test host) is not in PATH"))
}

/// Whether `/dev/kvm` opens and speaks the stable KVM API (version 12).
fn dev_kvm_usable() -> bool {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let Ok(f) = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") else { return false };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    v == 12
}

/// Why jobs cannot run here, or `None` when they can. In nested mode this prepares the L1
/// assets (first use may download the kernel package).
pub fn unavailable_reason() -> Option<String> {
    match kvm_mode() {
        KvmMode::Direct => None,
        KvmMode::Nested => l1_assets().err().map(|e| e.to_string()),
        KvmMode::Unavailable(reason) => Some(reason),
    }
}

/// Returns from the calling test, printing why, when no KVM test host is available (panics
/// instead in strict mode, like [`crate::require!`]).
#[macro_export]
macro_rules! require_testhost {
    () => {
        $crate::require!(match $crate::unavailable_reason() {
            Some(reason) => Err(reason),
            None => Ok(()),
        })
    };
}

/// vCPUs of L1. One measured best on the 2-core development machine (with other builds
/// running): a whole nested job took 10.0 s on average with 1 vCPU and 11.0 s with 2 (MTTCG),
/// L1 boot was slower with 2 and L2 boot the same. L2 may still have more vCPUs than L1 (a
/// 2-vCPU L2 boots fine on 1 L1 vCPU; QEMU only warns). Set `cpus: 2` for real parallelism.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u32 = 2048;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A POSIX sh script to run with real KVM, and the host files it needs.
#[derive(Debug, Clone)]
pub struct Job {
    pub script: String,
    /// Absolute host paths; in nested mode copied into L1 at the same path (directories
    /// recursively, dynamically linked ELF files with their libraries).
    pub files: Vec<PathBuf>,
    /// Wall-clock limit for the whole run, L1 boot included.
    pub timeout: Duration,
    /// L1 memory (nested mode only); L2 guests come out of it.
    pub mem_mib: u32,
    /// L1 vCPUs (nested mode only).
    pub cpus: u32,
    /// Nested mode: a job that prints nothing for this long (jobs with a watchdog print every
    /// 120 s) is taken as a stalled L1 (nested TCG now and then stops with its vCPU idle) and
    /// run again from a fresh boot, as is any job whose QEMU uses no CPU at all even after a
    /// kick (see [`KICK_AFTER`]); up to [`STALL_RERUNS`] times, and each run must pass whole.
    pub stall_after: Option<Duration>,
    /// Nested mode: load the networking modules (bridge, veth, tun, tc, netfilter; see
    /// `prepare-l1.sh`) before the script runs. A direct host is expected to autoload them.
    pub net: bool,
}

impl Default for Job {
    fn default() -> Self {
        Self {
            script: String::new(),
            files: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            mem_mib: DEFAULT_MEM_MIB,
            cpus: DEFAULT_CPUS,
            stall_after: None,
            net: false,
        }
    }
}

impl Job {
    pub fn new(script: impl Into<String>) -> Self {
        Self { script: script.into(), ..Self::default() }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A host file or directory the script uses.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    /// A program from `PATH` (its libraries come along in nested mode).
    pub fn binary(mut self, name: &str) -> Result<Self, TestHostError> {
        self.files.push(which(name)?);
        Ok(self)
    }

    /// `qemu-system-x86_64` and the firmware it loads (`-M microvm` needs
    /// `/usr/share/qemu/bios-microvm.bin`, `-M pc` SeaBIOS from `/usr/share/seabios`).
    pub fn with_qemu(self) -> Result<Self, TestHostError> {
        let mut job = self.binary("qemu-system-x86_64")?;
        for dir in ["/usr/share/qemu", "/usr/share/seabios"] {
            if Path::new(dir).is_dir() {
                job.files.push(dir.into());
            }
        }
        Ok(job)
    }
}

/// Times inside L1, from its kernel's uptime (TCG guest clocks follow the host's wall clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct L1Timings {
    /// Kernel start to `/init`.
    pub init: Duration,
    /// Kernel start to `/dev/kvm` ready, i.e. to the script's start.
    pub kvm_ready: Duration,
}

#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The script's exit status (128 + signal if it was killed by one).
    pub exit_code: i32,
    /// The script's stdout and stderr, interleaved.
    pub output: String,
    /// L1's console log; empty in direct mode.
    pub console: String,
    /// Wall-clock time of the whole run (initramfs build and L1 boot included).
    pub elapsed: Duration,
    /// Nested mode only.
    pub l1: Option<L1Timings>,
}

/// Runs `job` with real KVM: directly or in an L1 VM, see [`kvm_mode`].
pub fn run_job(job: &Job) -> Result<JobOutput, TestHostError> {
    // Checked in both modes so that a job that works directly also works nested.
    for f in &job.files {
        if !f.is_absolute() {
            return Err(TestHostError::NotAbsolute(f.clone()));
        }
        fs::symlink_metadata(f).map_err(TestHostError::io(format!("job file {}", f.display())))?;
    }
    match kvm_mode() {
        KvmMode::Direct => run_direct(job),
        KvmMode::Nested => {
            let mut reruns = 0;
            loop {
                match run_nested(job) {
                    Err(TestHostError::Stalled { how, output_tail, .. }) if reruns < STALL_RERUNS => {
                        reruns += 1;
                        eprintln!(
                            "test host: L1 stalled ({how}; a nested-TCG fault); running the job again \
                             from a fresh boot (#{reruns}). Output so far:\n{output_tail}"
                        );
                    }
                    r => return r,
                }
            }
        }
        KvmMode::Unavailable(reason) => Err(TestHostError::Unavailable(reason)),
    }
}

fn run_direct(job: &Job) -> Result<JobOutput, TestHostError> {
    let start = Instant::now();
    let tmp = TempDir::new("direct")?;
    let out_path = tmp.path().join("output");
    let out = File::create(&out_path).map_err(TestHostError::io("creating the output file"))?;
    let err = out.try_clone().map_err(TestHostError::io("duplicating the output file"))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&job.script)
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(TestHostError::io("spawning sh"))?;
    let status = wait_with_timeout(&mut child, job.timeout, |_| false)?;
    let output = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
    let Some(status) = status else {
        return Err(TestHostError::Timeout {
            after: job.timeout,
            console_tail: String::new(),
            output_tail: tail(&output, 30),
        });
    };
    Ok(JobOutput {
        exit_code: exit_code(status),
        output,
        console: String::new(),
        elapsed: start.elapsed(),
        l1: None,
    })
}

/// TCG with a vCPU thread each, and the largest translation buffer QEMU allows on x86-64 hosts
/// (2 GiB; the default is 1 GiB). TCG keeps the code it translated until the buffer is full,
/// then drops all of it at once, and every program then runs slowly until its code is
/// translated again. Each new VM's guest runs from pages of its own, so test-host jobs fill the
/// buffer quickly: the default one filled in about two minutes of `bench/runtime.sh`, and the
/// bench's rounds that were slow for every runtime came about that far apart.
const L1_ACCEL: &str = "tcg,thread=multi,tb-size=2048";

/// The L1's CPU: every feature TCG emulates (SVM for KVM among them) except ERMS and FSRM.
/// QEMU 7.2's TCG runs `rep movsb` / `rep stosb` one byte per loop iteration, so software that
/// picks them because those flags say they are fast (Linux's page clearing and user copies,
/// Go's memmove, glibc's large copies) pays many times what real hardware charges: with them,
/// `runc run` took 1.09 s in L1, without them 0.51 s, and L1 booted in 3.2 s, not 2.1 s.
/// Without the flags every program uses word-sized loops, and relative costs in the test
/// host are closer to a real host's.
const L1_CPU: &str = "max,erms=off,fsrm=off";

/// L1's kernel command line. `quiet` because every console byte costs emulated I/O;
/// `mitigations=off` since nothing untrusted runs in L1 and TCG pays dearly for them.
/// `nohz=off highres=off` keep L1's LAPIC timer periodic: QEMU re-arms a periodic timer in its
/// own timer callback, while a one-shot one is armed by the guest from the vCPU thread, and a
/// lost arming or wake-up of that kind left stalled L1s halted with no timer due (see
/// `l1_kick`); a periodic tick retries at the next one.
/// `norandmaps` (no address-space randomisation in L1's processes): TCG keeps the code it has
/// translated keyed by physical page and virtual address, and with randomised mappings every
/// exec puts the same code at new addresses, so each new process translated all the code it ran
/// afresh. That made process start-up cost in proportion to code size, which no real CPU
/// charges: `husk-vmm --version` took 48 ms, 8 ms without; `runc --version` 43 ms, 23 ms
/// without; `runc run` 575 ms, 465 ms without. L2 guests keep their own randomisation.
const L1_CMDLINE: &str = "console=ttyS0 panic=-1 quiet mitigations=off nohz=off highres=off norandmaps";

const READY: &str = "@@HUSK-TESTHOST-READY ";
const SETUP_FAILED: &str = "@@HUSK-TESTHOST-SETUP-FAILED ";
const EXIT: &str = "\n@@HUSK-TESTHOST-EXIT ";
const END: &str = "@@\n";
/// How long QEMU may take to power off after the trailer before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// How long QEMU may use no CPU at all before its vCPU is kicked: a working L1 under TCG always
/// uses some (its timers alone), and a kick of a healthy one is harmless.
const KICK_AFTER: Duration = Duration::from_secs(30);
/// How many times a stalled job is run again from a fresh boot.
pub const STALL_RERUNS: u32 = 2;

fn init_script(busybox: &str, net: bool) -> String {
    let mut modules = String::new();
    for (m, args) in KVM_MODULES {
        modules.push_str(&format!(
            "insmod /husk/modules/{m}.ko {args} || fail \"insmod {m}.ko {args} failed\"\n"
        ));
    }
    for m in EXTRA_MODULES {
        modules.push_str(&format!("[ -f /husk/modules/{m}.ko ] && insmod /husk/modules/{m}.ko\n"));
    }
    if net {
        modules.push_str(
            "for m in $(cat /husk/modules/net/order); do insmod /husk/modules/net/$m.ko || fail \"insmod $m.ko failed\"; done\n",
        );
    }
    format!(
        r#"#!{busybox} sh
# /init of the husk L1 test host, generated by husk-tests (src/testhost.rs).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# /tmp stays on the (writable) rootfs: job files may live under /tmp on the host.
t_init=$(cut -d' ' -f1 /proc/uptime)
# The job channel. Held open throughout so its raw mode sticks; raw keeps bytes unmangled.
exec 3<>/dev/ttyS1
stty raw -echo <&3
fail() {{
    echo "husk-testhost: $*" >/dev/console
    dmesg | tail -n 20 >/dev/console
    printf '{SETUP_FAILED}%s@@\n' "$*" >&3
    stty raw -echo <&3
    poweroff -f
}}
{modules}[ -c /dev/kvm ] || fail "/dev/kvm did not appear after loading kvm-amd (no SVM in the L1 CPU?)"
ip link set lo up 2>/dev/null
t_kvm=$(cut -d' ' -f1 /proc/uptime)
printf '{READY}%s %s@@\n' "$t_init" "$t_kvm" >&3
cd /tmp
sh /husk/job.sh </dev/null >&3 2>&3
code=$?
printf '\n@@HUSK-TESTHOST-EXIT %d@@\n' "$code" >&3
# stty waits for the UART to drain (TCSADRAIN) so the trailer is out before power-off.
stty raw -echo <&3
sync
poweroff -f
"#
    )
}

fn run_nested(job: &Job) -> Result<JobOutput, TestHostError> {
    let start = Instant::now();
    let assets = l1_assets()?;
    let qemu = which("qemu-system-x86_64")?;
    let tmp = TempDir::new("nested")?;

    let mut initramfs = Initramfs::with_base_layout()?;
    for f in &job.files {
        initramfs.add_host_path(f)?;
    }
    for (m, _) in KVM_MODULES {
        initramfs.host_file_at(&format!("husk/modules/{m}.ko"), &assets.module(m), 0o644)?;
    }
    for m in EXTRA_MODULES {
        if assets.module(m).is_file() {
            initramfs.host_file_at(&format!("husk/modules/{m}.ko"), &assets.module(m), 0o644)?;
        }
    }
    if job.net {
        let dir = assets.dir.join("modules/net");
        let order = fs::read_to_string(dir.join("order"))
            .map_err(TestHostError::io(format!("reading {}/order", dir.display())))?;
        initramfs.host_file_at("husk/modules/net/order", &dir.join("order"), 0o644)?;
        for m in order.split_whitespace() {
            initramfs.host_file_at(
                &format!("husk/modules/net/{m}.ko"),
                &dir.join(format!("{m}.ko")),
                0o644,
            )?;
        }
    }
    initramfs.data("husk/job.sh", 0o755, job.script.as_bytes())?;
    let busybox = initramfs.add_busybox()?;
    initramfs.data("init", 0o755, init_script(&busybox.to_string_lossy(), job.net))?;
    let initrd = tmp.path().join("initrd.cpio");
    initramfs.write(&initrd)?;

    let console_path = tmp.path().join("console.log");
    let out_path = tmp.path().join("output");
    let stderr_path = tmp.path().join("qemu.stderr");
    let qmp_path = tmp.path().join("qmp.sock");
    let qemu_stderr = File::create(&stderr_path).map_err(TestHostError::io("creating qemu.stderr"))?;

    // One L1 at a time: each is CPU-bound, and parallel ones only make all of them slower and
    // their timeouts flaky. The job's timeout starts once the VM does.
    let _lock = RunLock::acquire()?;
    let vm_start = Instant::now();
    let mut child = Command::new(&qemu)
        .args(["-M", "pc", "-nodefaults", "-no-user-config", "-vga", "none", "-display", "none"])
        .args(["-monitor", "none", "-no-reboot", "-accel", L1_ACCEL, "-cpu", L1_CPU])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(["-m", &job.mem_mib.to_string(), "-smp", &job.cpus.to_string()])
        .arg("-kernel")
        .arg(&assets.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", L1_CMDLINE])
        .arg("-serial")
        .arg(format!("file:{}", console_path.display()))
        .arg("-serial")
        .arg(format!("file:{}", out_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(qemu_stderr)
        .spawn()
        .map_err(TestHostError::io(format!("spawning {}", qemu.display())))?;

    let mut trailer_at: Option<Instant> = None;
    let qemu_pid = child.id();
    let mut watch = l1_kick::StallWatch::new(Instant::now(), KICK_AFTER, job.stall_after);
    let mut stall = None;
    let status = wait_with_timeout(&mut child, job.timeout, |now| {
        // A wedged power-off must not turn a finished job into a timeout.
        if trailer_at.is_none() && has_trailer(&out_path) {
            trailer_at = Some(now);
        }
        let out_len = fs::metadata(&out_path).map(|m| m.len()).unwrap_or(0);
        match watch.observe(now, l1_kick::cpu_ticks(qemu_pid), out_len, trailer_at.is_some()) {
            l1_kick::Verdict::Fine => {}
            l1_kick::Verdict::Kick => {
                let ok = l1_kick::kick(&qmp_path);
                eprintln!("test host: QEMU used no CPU for {KICK_AFTER:?}; vCPU kicked (accepted: {ok})");
            }
            l1_kick::Verdict::Revived => eprintln!("test host: QEMU runs again after the kick"),
            l1_kick::Verdict::Stalled(how) => {
                stall = Some(how);
                return true;
            }
        }
        trailer_at.is_some_and(|t| now.duration_since(t) > POWEROFF_GRACE)
    })?;
    if let Some(how) = stall {
        let output = String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned();
        return Err(TestHostError::Stalled {
            how,
            console_tail: tail(&fs::read_to_string(&console_path).unwrap_or_default(), 20),
            output_tail: tail(&output, 30),
        });
    }

    let console = String::from_utf8_lossy(&fs::read(&console_path).unwrap_or_default()).replace('\r', "");
    let raw = fs::read(&out_path).unwrap_or_default();
    let channel = Channel::parse(&raw);
    let console_tail = tail(&console, 40);
    if let Some(msg) = channel.setup_failed {
        return Err(TestHostError::L1Setup { msg, console_tail });
    }
    let Some(exit_code) = channel.exit_code else {
        let output_tail = tail(&channel.output, 30);
        return Err(match status {
            None => TestHostError::Timeout { after: vm_start.elapsed(), console_tail, output_tail },
            Some(status) => TestHostError::NoTrailer {
                status: status.to_string(),
                qemu_stderr: tail(&fs::read_to_string(&stderr_path).unwrap_or_default(), 20),
                console_tail,
                output_tail,
            },
        });
    };
    Ok(JobOutput { exit_code, output: channel.output, console, elapsed: start.elapsed(), l1: channel.ready })
}

/// What L1 sent on the job channel.
#[derive(Debug, Default, PartialEq)]
struct Channel {
    ready: Option<L1Timings>,
    setup_failed: Option<String>,
    exit_code: Option<i32>,
    output: String,
}

impl Channel {
    fn parse(raw: &[u8]) -> Self {
        let mut ch = Channel::default();
        let mut body = raw;
        if let Some(rest) = body.strip_prefix(SETUP_FAILED.as_bytes()) {
            let msg = String::from_utf8_lossy(rest);
            ch.setup_failed = Some(msg.split("@@").next().unwrap_or_default().to_string());
            return ch;
        }
        if let Some(rest) = body.strip_prefix(READY.as_bytes()) {
            if let Some(end) = find(rest, END.as_bytes()) {
                let text = String::from_utf8_lossy(&rest[..end]);
                let mut secs = text.split_whitespace().filter_map(|s| s.parse::<f64>().ok());
                if let (Some(init), Some(kvm)) = (secs.next(), secs.next()) {
                    ch.ready = Some(L1Timings {
                        init: Duration::from_secs_f64(init.max(0.0)),
                        kvm_ready: Duration::from_secs_f64(kvm.max(0.0)),
                    });
                }
                body = &rest[end + END.len()..];
            }
        }
        if let Some(pos) = rfind(body, EXIT.as_bytes()) {
            let rest = String::from_utf8_lossy(&body[pos + EXIT.len()..]);
            ch.exit_code = rest.split("@@").next().and_then(|c| c.trim().parse().ok());
            if ch.exit_code.is_some() {
                body = &body[..pos];
            }
        }
        ch.output = String::from_utf8_lossy(body).into_owned();
        ch
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// Whether the job channel ends with the exit trailer (or a setup failure); reads only the tail.
fn has_trailer(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else { return false };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(256))).is_err() || f.read_to_end(&mut buf).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&buf);
    text.ends_with(END) && (text.contains(EXIT.trim_start()) || starts_with_setup_failed(path))
}

fn starts_with_setup_failed(path: &Path) -> bool {
    let mut buf = [0u8; SETUP_FAILED.len()];
    File::open(path).and_then(|mut f| f.read_exact(&mut buf)).is_ok() && buf == SETUP_FAILED.as_bytes()
}

/// Waits for `child` until `timeout`; then kills it and returns `None`. `stop_early(now)` is
/// polled and, when true, ends the wait the same way but returns the status.
///
/// Whatever the child left running in its process group (direct mode makes one) is killed when
/// it exits, as powering off L1 does in nested mode. The child is reaped only after that, so its
/// pid cannot be reused as a process group id in between.
fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
    mut stop_early: impl FnMut(Instant) -> bool,
) -> Result<Option<ExitStatus>, TestHostError> {
    let start = Instant::now();
    loop {
        let now = Instant::now();
        let exited = has_exited(child).map_err(TestHostError::io("waiting for the job"))?;
        let early = !exited && stop_early(now);
        let timed_out = !exited && !early && now.duration_since(start) >= timeout;
        if exited || early || timed_out {
            kill_tree(child);
            let status = child.wait().map_err(TestHostError::io("reaping the job"))?;
            return Ok((!timed_out).then_some(status));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `child` has exited, leaving it unreaped (`WNOWAIT`).
fn has_exited(child: &Child) -> std::io::Result<bool> {
    let pid = libc::id_t::try_from(child.id()).map_err(std::io::Error::other)?;
    // SAFETY: siginfo_t is plain data, valid when zeroed; waitid only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid siginfo_t pointer.
    let r =
        unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled in the SIGCHLD fields, or left si_pid zero when nothing exited.
    Ok(unsafe { info.si_pid() } != 0)
}

/// SIGKILLs the child's process group (direct mode makes one) or else the child itself.
/// The child must not have been reaped yet.
fn kill_tree(child: &mut Child) {
    let Ok(pid) = i32::try_from(child.id()) else { return };
    // SAFETY: getpgid(2) takes no pointers; pid is our unreaped child, so it cannot name a
    // recycled process.
    let grouped = unsafe { libc::getpgid(pid) } == pid;
    if grouped {
        // SAFETY: kill(2) takes no pointers; the group is led by our unreaped child, so its id
        // cannot have been recycled to someone else's group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    child.kill().ok();
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

/// A scratch directory removed on drop (kept with `HUSK_TESTHOST_KEEP=1`, for debugging).
/// Initramfs images are tens of MB, so the first one per process also sweeps away those that
/// processes killed before their drop (a test binary under `timeout`, say) left behind.
struct TempDir(PathBuf);

const TEMP_PREFIX: &str = "husk-testhost-";
const KEEP_MARKER: &str = ".keep";

impl TempDir {
    fn new(tag: &str) -> Result<Self, TestHostError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale_temp_dirs);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{TEMP_PREFIX}{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).map_err(TestHostError::io(format!("creating {}", path.display())))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HUSK_TESTHOST_KEEP").is_some() {
            fs::write(self.0.join(KEEP_MARKER), b"").ok();
            eprintln!("husk-testhost: kept {}", self.0.display());
        } else {
            fs::remove_dir_all(&self.0).ok();
        }
    }
}

/// Removes `husk-testhost-<tag>-<pid>-<n>` dirs whose process is gone and that were not kept.
fn sweep_stale_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else { continue };
        let mut parts = rest.rsplit('-');
        let (Some(_n), Some(pid)) = (parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let path = entry.path();
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && path.is_dir() && !path.join(KEEP_MARKER).exists() {
            fs::remove_dir_all(&path).ok();
        }
    }
}

/// An exclusive `flock` shared by all processes on the machine (tests may run in several).
struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    fn acquire() -> Result<Self, TestHostError> {
        let path = std::env::temp_dir().join("husk-testhost-run.lock");
        let f = File::create(&path).map_err(TestHostError::io(format!("opening {}", path.display())))?;
        loop {
            // SAFETY: flock on a descriptor we own; released when the file is closed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(f));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(TestHostError::Io { what: format!("locking {}", path.display()), source: err });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel() {
        let raw = b"@@HUSK-TESTHOST-READY 4.50 5.25@@\nhello\n\n@@HUSK-TESTHOST-EXIT 3@@\n";
        let ch = Channel::parse(raw);
        assert_eq!(ch.exit_code, Some(3));
        assert_eq!(ch.output, "hello\n");
        let l1 = ch.ready.unwrap();
        assert_eq!(l1.init, Duration::from_millis(4500));
        assert_eq!(l1.kvm_ready, Duration::from_millis(5250));

        let cut = Channel::parse(b"@@HUSK-TESTHOST-READY 1 2@@\npartial");
        assert_eq!((cut.exit_code, cut.output.as_str()), (None, "partial"));

        let failed = Channel::parse(b"@@HUSK-TESTHOST-SETUP-FAILED insmod kvm.ko failed@@\n");
        assert_eq!(failed.setup_failed.as_deref(), Some("insmod kvm.ko failed"));
    }

    #[test]
    fn direct_mode_runs_sh() {
        let out = run_direct(&Job::new("echo out; echo err >&2; exit 7")).unwrap();
        assert_eq!(out.exit_code, 7);
        assert_eq!(out.output, "out\nerr\n");
    }

    #[test]
    fn direct_mode_ends_leftover_processes() {
        let marker = std::env::temp_dir().join(format!("husk-testhost-leftover-{}", std::process::id()));
        let script = format!("(sleep 1; touch {}) & exit 0", marker.display());
        assert_eq!(run_direct(&Job::new(script)).unwrap().exit_code, 0);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "the background process outlived the job");
    }

    #[test]
    fn direct_mode_times_out() {
        let t = Instant::now();
        let err = run_direct(&Job::new("sleep 100").timeout(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(err, TestHostError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
