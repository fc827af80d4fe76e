//! The command line: runc 1.1's global flags and commands, plus `husk run` sandboxes (of a
//! rootfs, an OCI layout or a registry image) and the image commands (`pull`, `images`, `rmi`,
//! `image ...`, `login`, `logout`). One verb `run` serves both runc's run and sandboxes;
//! [`Run::mode`] splits it into the two commands' own structs and refuses flags that do not
//! belong to the mode.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::runlog::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "husk",
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.0.2-dev"),
    about = "husk: a runc-compatible OCI runtime that runs every sandbox in its own KVM microVM"
)]
pub struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = husk_core::state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for compatibility; cgroups live inside the guest.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Boot every VM cold instead of starting it from a snapshot (also `HUSK_SNAPSHOTS=0`).
    #[arg(long, global = true)]
    pub no_snapshot: bool,
    /// Accepted for compatibility (checkpointing is not supported).
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
// Each subcommand's arguments are built only when it is the one invoked.
#[command(defer = true)]
pub enum Command {
    /// Create a container (its process waits for `start`).
    Create(Create),
    /// Start a created container's process.
    Start { id: String },
    /// Create and start a container; or, with --rootfs/--image, run a command in a new sandbox.
    Run(Run),
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal to a container's init process (or, with --all, every process).
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container and whatever it holds.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Run another process in a running container.
    Exec(Exec),
    /// List the processes running in a container (inside its VM).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        /// ps options (ignored: the list comes from the guest).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a running container's resource limits.
    Update(Update),
    /// Stream a container's stats and OOM events as JSON lines.
    Events {
        /// Interval between stats (Go duration: 5s, 500ms, 1m).
        #[arg(long, default_value = "5s")]
        interval: String,
        /// Print stats once and exit.
        #[arg(long)]
        stats: bool,
        id: String,
    },
    /// Print what this runtime supports (JSON).
    Features,
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pull an image from a registry into husk's image store.
    Pull(PullArgs),
    /// List the images in husk's image store.
    Images(ImagesArgs),
    /// Remove images by name or ID (and whatever only they used).
    Rmi {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Image commands: inspect, prune, ls, rm, pull.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Store credentials for a registry (checked against it first).
    Login {
        #[arg(short, long)]
        username: Option<String>,
        #[arg(short, long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        registry: String,
    },
    /// Remove stored credentials for a registry.
    Logout { registry: String },
    /// VM snapshots that sandboxes start from: prepare, ls, rm.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Write a default config.json into the bundle directory.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[arg(long)]
        rootless: bool,
    },
}

#[derive(Subcommand, Debug)]
// Each subcommand's arguments are built only when it is the one invoked.
#[command(defer = true)]
pub enum SnapshotCommand {
    /// Make the snapshots that `husk run` and OCI containers of this size start from (they
    /// are otherwise made on first use).
    Prepare {
        /// Guest memory in MiB (default: the configured size).
        #[arg(long)]
        memory: Option<u32>,
        /// vCPUs (default: the configured count).
        #[arg(long)]
        cpus: Option<u32>,
        /// Pod network interfaces (CNI, `-p`, Kubernetes pods have one each); 0: none.
        #[arg(long, default_value_t = 0)]
        nics: usize,
    },
    /// List the snapshots kept.
    Ls,
    /// Remove every snapshot (they are made again on next use).
    Rm,
}

#[derive(Subcommand, Debug)]
// Each subcommand's arguments are built only when it is the one invoked.
#[command(defer = true)]
pub enum ImageCommand {
    /// Print an image's record, layers and config as JSON.
    Inspect { name: String },
    /// Remove every blob, unpacked snapshot and partial download no image needs.
    Prune,
    /// List images (as `husk images`).
    Ls(ImagesArgs),
    /// Remove images (as `husk rmi`).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Pull an image (as `husk pull`).
    Pull(PullArgs),
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Which image of a multi-platform image (OS/ARCH[/VARIANT]).
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Print only the manifest digest.
    #[arg(short, long)]
    pub quiet: bool,
    /// NAME[:TAG|@DIGEST], with Docker's defaults (`alpine` is docker.io/library/alpine:latest).
    pub name: String,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Print only image IDs.
    #[arg(short, long)]
    pub quiet: bool,
}

/// When `husk run IMAGE` pulls.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    Missing,
    Never,
}

#[derive(Args, Debug)]
pub struct Create {
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for compatibility (the guest decides how to enter the rootfs).
    #[arg(long)]
    pub no_pivot: bool,
    #[arg(long)]
    pub no_new_keyring: bool,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

// `run` as clap parses it: both modes' flags. Commands take `OciRun` or `SandboxRun`. (No doc
// comment: with deferred subcommands it would replace the variant's `about`.)
#[derive(Args, Debug)]
pub struct Run {
    #[arg(short, long)]
    pub bundle: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub no_pivot: bool,
    #[arg(long)]
    pub no_new_keyring: bool,
    #[arg(long)]
    pub keep: bool,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Sandbox mode: run a command in this root file system (no bundle needed).
    #[arg(long, conflicts_with_all = ["image", "bundle"])]
    pub rootfs: Option<PathBuf>,
    /// Sandbox mode: run a command in an image: a registry name, or `oci:DIR[:TAG]` for an OCI
    /// layout (an existing `DIR[:TAG]` also names a layout). `husk run IMAGE -- CMD` does too.
    #[arg(long, conflicts_with = "bundle")]
    pub image: Option<String>,
    /// When to pull a registry image (sandbox mode).
    #[arg(long, value_enum)]
    pub pull: Option<PullPolicy>,
    /// Which image of a multi-platform image (sandbox mode).
    #[arg(long)]
    pub platform: Option<String>,
    /// Keep stdin open (sandbox mode).
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal (sandbox mode).
    #[arg(short, long)]
    pub tty: bool,
    /// VM memory in MiB (sandbox mode).
    #[arg(long)]
    pub memory: Option<u32>,
    /// VM vCPUs (sandbox mode).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// KEY=VALUE environment (sandbox mode; repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// HOST:GUEST[:ro] bind mount (sandbox mode; repeatable).
    #[arg(short, long)]
    pub volume: Vec<String>,
    /// Working directory (sandbox mode).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Hostname (sandbox mode).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Network (sandbox mode): `default` (the first *.conflist of husk's CNI conf dir), `none`
    /// (loopback only), or the name of a CNI network.
    #[arg(long, value_name = "default|none|NAME")]
    pub net: Option<String>,
    /// Publish a port (sandbox mode; repeatable): [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp].
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:CONTAINER[/PROTO]")]
    pub publish: Vec<String>,
    /// Print how long each phase of the run took (a breakdown on stderr at the end).
    #[arg(long)]
    pub timings: bool,
    /// Accepted for Docker habits: sandbox runs are always removed.
    #[arg(long, hide = true, default_value_t = true)]
    pub rm: bool,
    /// The container id (OCI mode); or, in sandbox mode, the command (after `--`), preceded by
    /// the image when neither --rootfs nor --image names one.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct Exec {
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub cwd: Option<String>,
    #[arg(short, long)]
    pub env: Vec<String>,
    #[arg(short, long)]
    pub tty: bool,
    /// UID[:GID]
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(short = 'g', long)]
    pub additional_gids: Vec<u32>,
    /// A process.json (the OCI process object).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub process_label: Option<String>,
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long)]
    pub no_new_privs: bool,
    #[arg(short, long)]
    pub cap: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    #[arg(long)]
    pub ignore_paused: bool,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct Update {
    /// linux.resources JSON from a file, or `-` for stdin.
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub memory_swap: Option<String>,
    #[arg(long)]
    pub memory_reservation: Option<String>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_share: Option<u64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    pub id: String,
}

/// OCI `run ID`: create and start a bundle's container.
#[derive(Debug)]
pub struct OciRun {
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub detach: bool,
    pub keep: bool,
    pub preserve_fds: u32,
}

/// Where a sandbox run's root file system comes from.
#[derive(Debug)]
pub enum RootfsSource {
    Dir(PathBuf),
    /// An OCI layout, `DIR[:TAG]`.
    Layout(String),
    /// A registry image, through husk's image store.
    Image(String),
}

impl RootfsSource {
    /// `--image` or a positional image: `oci:DIR[:TAG]` and existing layout directories are
    /// layouts, anything else a registry name.
    pub fn image(s: &str) -> Self {
        if let Some(layout) = s.strip_prefix("oci:") {
            return Self::Layout(layout.to_string());
        }
        let is_layout = husk_image::parse_reference(s).is_ok_and(|(dir, _)| dir.join("oci-layout").is_file());
        if is_layout {
            Self::Layout(s.to_string())
        } else {
            Self::Image(s.to_string())
        }
    }
}

/// `husk run --rootfs DIR | --image LAYOUT[:TAG] [-- CMD...]`: a command in a fresh sandbox.
#[derive(Debug)]
pub struct SandboxRun {
    pub rootfs: RootfsSource,
    pub interactive: bool,
    pub tty: bool,
    pub memory: Option<u32>,
    pub cpus: Option<u32>,
    pub env: Vec<String>,
    pub volume: Vec<String>,
    pub workdir: Option<String>,
    pub hostname: Option<String>,
    /// `--net`, as given (None: the default network).
    pub net: Option<String>,
    /// `-p`, as given.
    pub publish: Vec<String>,
    pub pull: PullPolicy,
    pub platform: Option<String>,
    pub command: Vec<String>,
}

/// Which of the two commands a `run` is.
#[derive(Debug)]
pub enum RunMode {
    Oci(OciRun),
    Sandbox(SandboxRun),
}

impl Run {
    pub fn is_sandbox(&self) -> bool {
        self.rootfs.is_some() || self.image.is_some() || self.positional_image()
    }

    /// `husk run IMAGE [CMD...]`: runc's `run ID` takes one id and a bundle (default: the current
    /// directory, which then holds config.json), so two or more words, or one word with no
    /// bundle to run, are an image and its command.
    fn positional_image(&self) -> bool {
        if self.rootfs.is_some() || self.image.is_some() || self.bundle.is_some() {
            return false;
        }
        match self.args.len() {
            0 => false,
            1 => !std::path::Path::new("config.json").exists(),
            _ => true,
        }
    }

    /// Splits `run` into its mode's struct; a flag of the other mode is an error, not ignored.
    pub fn mode(self) -> Result<RunMode, String> {
        let refuse = |flags: &[(&str, bool)], mode: &str| -> Result<(), String> {
            match flags.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!("{name} is not an option of {mode}")),
                None => Ok(()),
            }
        };
        if self.is_sandbox() {
            refuse(
                &[
                    ("--detach", self.detach),
                    ("--pid-file", self.pid_file.is_some()),
                    ("--console-socket", self.console_socket.is_some()),
                    ("--keep", self.keep),
                    ("--no-pivot", self.no_pivot),
                    ("--no-new-keyring", self.no_new_keyring),
                    ("--preserve-fds", self.preserve_fds > 0),
                ],
                "husk run of a sandbox (they are for OCI bundles: husk run ID)",
            )?;
            let positional = self.positional_image();
            let mut command = self.args;
            let rootfs = match (self.rootfs, self.image) {
                (Some(r), None) => RootfsSource::Dir(r),
                (None, Some(i)) => RootfsSource::image(&i),
                (None, None) if positional => {
                    let image = command.remove(0);
                    // Past the first value, clap keeps a `--` among the trailing words.
                    if command.first().is_some_and(|w| w == "--") {
                        command.remove(0);
                    }
                    RootfsSource::image(&image)
                }
                _ => return Err("give one of --rootfs or --image".into()),
            };
            if self.pull.is_some() && !matches!(rootfs, RootfsSource::Image(_)) {
                return Err("--pull is for registry images".into());
            }
            return Ok(RunMode::Sandbox(SandboxRun {
                rootfs,
                interactive: self.interactive,
                tty: self.tty,
                memory: self.memory,
                cpus: self.cpus,
                env: self.env,
                volume: self.volume,
                workdir: self.workdir,
                hostname: self.hostname,
                net: self.net,
                publish: self.publish,
                pull: self.pull.unwrap_or_default(),
                platform: self.platform,
                command,
            }));
        }
        refuse(
            &[
                ("--interactive", self.interactive),
                ("--tty", self.tty),
                ("--memory", self.memory.is_some()),
                ("--cpus", self.cpus.is_some()),
                ("--env", !self.env.is_empty()),
                ("--volume", !self.volume.is_empty()),
                ("--workdir", self.workdir.is_some()),
                ("--hostname", self.hostname.is_some()),
                ("--net", self.net.is_some()),
                ("--publish", !self.publish.is_empty()),
                ("--pull", self.pull.is_some()),
                ("--platform", self.platform.is_some()),
            ],
            "OCI run (they are for husk run --rootfs/--image)",
        )?;
        let id = match self.args.as_slice() {
            [id] => id.clone(),
            _ => return Err("run needs exactly one container id (or --rootfs/--image and a command)".into()),
        };
        Ok(RunMode::Oci(OciRun {
            id,
            bundle: self.bundle.unwrap_or_else(|| PathBuf::from(".")),
            console_socket: self.console_socket,
            pid_file: self.pid_file,
            detach: self.detach,
            keep: self.keep,
            preserve_fds: self.preserve_fds,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> Result<RunMode, String> {
        let cli = Cli::try_parse_from(["husk", "run"].iter().chain(argv)).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(r) => r.mode(),
            other => Err(format!("not run: {other:?}")),
        }
    }

    #[test]
    fn run_of_an_image_by_name() {
        // Tests run in the crate directory, which has no config.json: one word is an image.
        let Ok(RunMode::Sandbox(s)) = run(&["alpine", "--", "sh", "-c", "echo hi"]) else {
            panic!("sandbox")
        };
        assert!(matches!(&s.rootfs, RootfsSource::Image(i) if i == "alpine"));
        assert_eq!(s.command, ["sh", "-c", "echo hi"]);
        assert_eq!(s.pull, PullPolicy::Missing);
        let Ok(RunMode::Sandbox(s)) = run(&["--pull", "never", "--net", "none", "reg:5000/a:1"]) else {
            panic!("sandbox")
        };
        assert!(matches!(&s.rootfs, RootfsSource::Image(i) if i == "reg:5000/a:1"));
        assert!(s.command.is_empty());
        assert_eq!(s.pull, PullPolicy::Never);
        let Ok(RunMode::Sandbox(s)) = run(&["--image", "oci:/srv/layout:v1", "--", "true"]) else {
            panic!("sandbox")
        };
        assert!(matches!(&s.rootfs, RootfsSource::Layout(l) if l == "/srv/layout:v1"));
        let Ok(RunMode::Sandbox(s)) = run(&["--image", "busybox:1.36", "--", "true"]) else {
            panic!("sandbox")
        };
        assert!(matches!(&s.rootfs, RootfsSource::Image(i) if i == "busybox:1.36"));
        // runc's run: an id with a bundle.
        let Ok(RunMode::Oci(o)) = run(&["--bundle", "/b", "ctr1"]) else { panic!("oci") };
        assert_eq!(o.id, "ctr1");
        assert!(run(&["--pull", "always", "--rootfs", "/", "--", "true"]).is_err(), "--pull needs an image");
        assert!(run(&["--bundle", "/b", "--pull", "always", "ctr1"]).is_err());
    }

    #[test]
    fn deferred_subcommands_keep_their_help_and_globals() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = |argv: &[&str]| match Cli::try_parse_from(argv) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("{argv:?} parsed as {c:?}"),
        };
        let run = help(&["husk", "run", "--help"]);
        assert!(run.starts_with("Create and start a container;"), "{run}");
        assert!(run.contains("--rootfs") && run.contains("--root"), "{run}");
        assert!(help(&["husk", "snapshot", "prepare", "--help"]).contains("--nics"));
        // A global flag after the subcommand, and a nested subcommand's own flag.
        let cli = Cli::try_parse_from(["husk", "delete", "--root", "/r", "-f", "c1"]).unwrap();
        assert_eq!(cli.root, std::path::Path::new("/r"));
        assert!(matches!(cli.command, Command::Delete { force: true, ref id } if id == "c1"));
        let cli = Cli::try_parse_from(["husk", "image", "pull", "--platform", "linux/arm64", "a"]).unwrap();
        assert!(
            matches!(cli.command, Command::Image(ImageCommand::Pull(ref p)) if p.platform == "linux/arm64")
        );
    }
}
