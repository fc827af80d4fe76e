//! `husk-vmm`: boots one microVM from CLI flags or a JSON config and exits with a status that
//! says how the guest ended (see `ExitReason::exit_code`); 1 means the VM could not be started.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use husk_vmm::config::{
    JailConfig, SerialConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_JAIL_NOFILE, DEFAULT_MEMORY_MIB,
};
use husk_vmm::confine::SeccompMode;
use husk_vmm::snapshot::SnapshotOptions;
use husk_vmm::{build_vmm_with, ExitReason};

const EXIT_SETUP_FAILED: u8 = 1;

#[derive(Parser, Debug, PartialEq)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's KVM microVM monitor",
    after_help = "Exit status: 0 guest powered off, 1 bad configuration or setup failure, 2 guest \
                  kernel panic, 3 triple fault, 4 guest reset, 5 KVM/vCPU error.\n\
                  Environment: HUSK_LOG sets the log filter (default: warn); HUSK_KVM_DEVICE \
                  overrides /dev/kvm."
)]
struct Cli {
    /// JSON VM config (same field names as the flags below); excludes the other flags.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline", "memory", "vcpus", "serial", "no_rng", "vsock", "fs", "net", "jail"])]
    config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux with a PVH entry, or bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs to hand the kernel.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line (husk appends its device parameters).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Console: stdio, none, or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// virtio-vsock with its host side on this Unix socket: PATH[,cid=N] (guest CID default 3).
    #[arg(long, value_name = "PATH[,cid=N]")]
    vsock: Option<String>,
    /// Share a host directory over virtio-fs (repeatable); the guest mounts it with
    /// `mount -t virtiofs TAG DIR`.
    #[arg(long, value_name = "tag=TAG,path=DIR[,ro][,cache=never|auto|always]")]
    fs: Vec<String>,
    /// A virtio-net device on a tap in this process's network namespace (repeatable; created
    /// when no such interface exists), or detached from any (a snapshot template's).
    #[arg(long, value_name = "tap=NAME|detached[,mac=MAC][,mtu=N]")]
    net: Vec<String>,
    /// Confine the VMM in its own mount, IPC and UTS namespaces with this empty directory as
    /// its root (holding only the shares and the vsock socket's directory).
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// What the per-thread seccomp filters do with a syscall outside them: enforce (SIGSYS,
    /// the VMM stops), log (kernel audit log only) or off.
    #[arg(long, value_name = "MODE", default_value = "enforce", value_parser = parse_seccomp)]
    seccomp: SeccompMode,
    /// Same as `--seccomp off`: for debugging only.
    #[arg(long, conflicts_with = "seccomp")]
    no_seccomp: bool,
    /// Take control commands (`snapshot`, `working-set`, `ping`) on this Unix socket, one line
    /// each.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Existing directory the `snapshot` command writes `state` and `memory` into (with
    /// `--restore`, where `working-set` writes the VM's working set).
    #[arg(long, value_name = "DIR", requires = "control")]
    snapshot_dir: Option<PathBuf>,
    /// Start the VM from the snapshot in DIR instead of booting (same VM configuration).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// The caller's id of kernel, initramfs and command line, kept in snapshots and checked
    /// on restore.
    #[arg(long, value_name = "ID")]
    image_id: Option<String>,
    /// With `--restore`: copy at most N of the 2 MiB chunks of guest memory the snapshot's
    /// working set shows busiest into private 2 MiB pages before the guest runs (0: none;
    /// default 6, at most 32). Each costs 2 MiB of memory and saves the guest's faults there.
    #[arg(long, value_name = "N")]
    private_chunks: Option<usize>,
    /// An inherited Unix socket (descriptor FD) to send a duplicate of the KVM VM descriptor
    /// over once the VM is made, so that the VM's kernel teardown waits on the holder's close
    /// rather than on this process's exit.
    #[arg(long, value_name = "FD")]
    vm_handover: Option<i32>,
    /// Report when this process started, had the VM built and first entered the guest, as
    /// `husk-vmm-timing: NAME NS` lines on stderr (NS: CLOCK_MONOTONIC).
    #[arg(long)]
    timings: bool,
}

fn parse_seccomp(s: &str) -> Result<SeccompMode, String> {
    match s {
        "enforce" => Ok(SeccompMode::Enforce),
        "log" => Ok(SeccompMode::Log),
        "off" => Ok(SeccompMode::Off),
        _ => Err(format!("{s:?}: expected enforce, log or off")),
    }
}

/// husk's own invocation: `--config FILE` with the snapshot and timing options, each once.
/// Read without clap, whose command building (every flag's definition, help and checks) takes
/// 17 ms of each VM start in the test host. Anything else (a person's flags, `--help`, a
/// repeated or malformed option) returns `None` and goes through clap, which gives the same
/// `Cli` for what this accepts (tested) and the messages for what it does not.
fn parse_config_form(args: &[OsString]) -> Option<Cli> {
    let mut cli = Cli {
        config: None,
        kernel: None,
        initramfs: None,
        cmdline: DEFAULT_CMDLINE.to_string(),
        memory: DEFAULT_MEMORY_MIB,
        vcpus: 1,
        serial: "stdio".into(),
        no_rng: false,
        vsock: None,
        fs: Vec::new(),
        net: Vec::new(),
        jail: None,
        seccomp: SeccompMode::Enforce,
        no_seccomp: false,
        control: None,
        snapshot_dir: None,
        restore: None,
        image_id: None,
        private_chunks: None,
        vm_handover: None,
        timings: false,
    };
    let mut seccomp_given = false;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_str()?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg, None),
        };
        if flag == "--timings" || flag == "--no-seccomp" {
            let seen = if flag == "--timings" { &mut cli.timings } else { &mut cli.no_seccomp };
            if inline.is_some() || *seen {
                return None;
            }
            *seen = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next()?.to_str()?,
        };
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        let slot = match flag {
            "--config" => &mut cli.config,
            "--control" => &mut cli.control,
            "--snapshot-dir" => &mut cli.snapshot_dir,
            "--restore" => &mut cli.restore,
            "--image-id" => {
                if cli.image_id.replace(value.to_string()).is_some() {
                    return None;
                }
                continue;
            }
            "--vm-handover" => {
                if cli.vm_handover.replace(value.parse().ok()?).is_some() {
                    return None;
                }
                continue;
            }
            "--private-chunks" => {
                if cli.private_chunks.replace(value.parse().ok()?).is_some() {
                    return None;
                }
                continue;
            }
            "--seccomp" => {
                if std::mem::replace(&mut seccomp_given, true) {
                    return None;
                }
                cli.seccomp = parse_seccomp(value).ok()?;
                continue;
            }
            _ => return None,
        };
        if slot.replace(PathBuf::from(value)).is_some() {
            return None;
        }
    }
    let consistent = cli.config.is_some()
        && (cli.snapshot_dir.is_none() || cli.control.is_some())
        && !(seccomp_given && cli.no_seccomp);
    consistent.then_some(cli)
}

fn snapshot_options(cli: &mut Cli) -> SnapshotOptions {
    SnapshotOptions {
        control: cli.control.take(),
        snapshot_dir: cli.snapshot_dir.take(),
        restore: cli.restore.take(),
        image_id: cli.image_id.take(),
        private_chunks: cli.private_chunks.take(),
        vm_handover: cli.vm_handover.take(),
    }
}

fn config_from(cli: Cli) -> anyhow::Result<VmConfig> {
    let seccomp = if cli.no_seccomp { SeccompMode::Off } else { cli.seccomp };
    if let Some(path) = cli.config {
        let mut cfg = VmConfig::from_json_file(&path)?;
        // The flags win over the file only when given (they default to enforce).
        if seccomp != SeccompMode::Enforce {
            cfg.seccomp = seccomp;
        }
        return Ok(cfg);
    }
    let kernel = cli.kernel.ok_or_else(|| anyhow::anyhow!("--kernel or --config is required"))?;
    Ok(VmConfig {
        kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        memory_mib: cli.memory,
        vcpus: cli.vcpus,
        serial: cli.serial.parse::<SerialConfig>()?,
        rng: !cli.no_rng,
        vsock: cli.vsock.as_deref().map(str::parse).transpose()?,
        fs: cli.fs.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
        net: cli.net.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
        loopback_forward: None,
        jail: cli.jail.map(|root| JailConfig { root, nofile: DEFAULT_JAIL_NOFILE }),
        seccomp,
    })
}

/// Errors are one line on stderr: callers (and people) should not have to parse a usage page.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("husk-vmm: error: {msg}");
    ExitCode::from(EXIT_SETUP_FAILED)
}

/// Descriptor table slots made up front (the fs server holds one descriptor per inode the
/// guest has looked up).
const FD_TABLE_PRESIZE: u64 = 1024;

/// Grows the descriptor table while the VMM has one thread: once threads share it, each
/// growth waits for an RCU grace period (milliseconds, in the middle of a guest's request).
fn presize_fd_table() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let top = lim.rlim_cur.min(FD_TABLE_PRESIZE).saturating_sub(1);
    if top <= 2 {
        return;
    }
    let top = top as libc::c_int;
    // SAFETY: fcntl(F_GETFD) only asks whether `top` is open; a free slot is borrowed by
    // dup2 of stderr and closed at once, so no descriptor of the process is replaced.
    unsafe {
        if libc::fcntl(top, libc::F_GETFD) == -1 && libc::dup2(2, top) == top {
            libc::close(top);
        }
    }
}

fn main() -> ExitCode {
    let started_ns = husk_vmm::vmm::monotonic_ns();
    presize_fd_table();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                // fuse-backend-rs logs guest-caused request errors at error level: a guest could
                // flood our stderr with them, so they are shown only when asked for.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuse_backend_rs=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<OsString> = std::env::args_os().collect();
    let parsed = match parse_config_form(&args) {
        Some(cli) => Ok(cli),
        None => Cli::try_parse_from(&args),
    };
    let mut cli = match parsed {
        Ok(c) => c,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            _ => {
                // clap's message up to its usage block, folded onto one line.
                let text = e.to_string();
                let msg: Vec<&str> =
                    text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
                return fail(msg.join(" ").trim_start_matches("error: "));
            }
        },
    };
    if cli.timings {
        husk_vmm::vmm::report_timings();
        husk_vmm::vmm::timing_point("process started", started_ns);
    }
    let snapshot = snapshot_options(&mut cli);
    let cfg = match config_from(cli) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let vmm = match build_vmm_with(&cfg, &snapshot) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    husk_vmm::vmm::timing_point("VM built", husk_vmm::vmm::monotonic_ns());
    let reason = vmm.run();
    if reason != ExitReason::PowerOff {
        eprintln!("husk-vmm: {}", reason.describe());
    }
    ExitCode::from(reason.exit_code() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(list: &[&str]) -> Vec<OsString> {
        std::iter::once("husk-vmm").chain(list.iter().copied()).map(OsString::from).collect()
    }

    #[test]
    fn the_config_form_reads_as_clap_reads_it() {
        let forms: &[&[&str]] = &[
            &["--config", "/s/vm.json"],
            &["--config=/s/vm.json", "--timings"],
            &["--config", "/s/vm.json", "--restore", "/snap/k", "--image-id", "abc", "--timings"],
            &["--timings", "--control", "/s/c.sock", "--snapshot-dir", "/s/snap", "--config", "/s/vm.json"],
            &["--config", "/s/vm.json", "--seccomp", "log"],
            &["--config", "/s/vm.json", "--seccomp=off", "--image-id=x y"],
            &["--config", "/s/vm.json", "--no-seccomp"],
            &["--config", "/s/vm.json", "--vm-handover", "4", "--restore", "/snap/k"],
            &["--vm-handover=7", "--config", "/s/vm.json"],
            &["--config", "/s/vm.json", "--restore", "/snap/k", "--private-chunks", "0"],
            &["--private-chunks=12", "--config", "/s/vm.json"],
        ];
        for f in forms {
            let a = argv(f);
            let fast = parse_config_form(&a).unwrap_or_else(|| panic!("{f:?} should be read without clap"));
            let slow = Cli::try_parse_from(&a).expect("clap accepts it");
            assert_eq!(fast, slow, "{f:?}");
        }
    }

    #[test]
    fn everything_else_goes_to_clap() {
        let others: &[&[&str]] = &[
            &[],
            &["--help"],
            &["--version"],
            &["--kernel", "/k"],
            &["--restore", "/snap"],
            &["--config", "/a", "--config", "/b"],
            &["--config", "/a", "--timings", "--timings"],
            &["--config", "/a", "--memory", "512"],
            &["--config"],
            &["--config", "--timings"],
            &["--config", ""],
            &["--config", "/a", "--snapshot-dir", "/s"],
            &["--config", "/a", "--seccomp", "strict"],
            &["--config", "/a", "--seccomp", "log", "--no-seccomp"],
            &["--config", "/a", "--timings=yes"],
            &["--config", "/a", "extra"],
            &["--config", "/a", "--vm-handover", "four"],
            &["--config", "/a", "--vm-handover", "4", "--vm-handover", "5"],
            &["--config", "/a", "--private-chunks", "many"],
            &["--config", "/a", "--private-chunks", "1", "--private-chunks", "2"],
        ];
        for f in others {
            assert!(parse_config_form(&argv(f)).is_none(), "{f:?} must go through clap");
        }
    }
}
