//! husk-agent: the guest's PID 1 and container manager, serving the agent API over vsock.
//!
//! - As PID 1 (in a husk VM): sets the guest up and serves on vsock ports 1024 (gRPC) and 1025
//!   (stdio streams); DestroySandbox powers the VM off.
//! - `husk-agent serve --unix PATH --shares DIR`: host mode for tests, the same API on a Unix
//!   socket that speaks the hybrid-vsock handshake, running containers on this host as root.
//! - `husk-agent __oci OP`: internal, one libcontainer operation in a fresh process;
//!   `husk-agent __oci-spare`: internal, the same, parked until the agent sends the op.

mod agent;
mod entropy;
mod fdio;
mod init;
mod lifeline;
mod listener;
mod oci;
mod oom;
mod page_cache;
mod pipes;
mod procfs;
mod reaper;
mod rootfs;
mod service;
mod spare;
mod stdio;
mod tty;

// In the library (src/lib.rs), so that the fuzz targets reach them too.
use husk_agent::{cgroup, confine, error, network, propagation, spec, validate};

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use husk_proto as pb;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::{Agent, Config};
use crate::listener::Endpoint;

/// How long the DestroySandbox reply gets to leave before power-off: written to the vsock
/// socket, the VMM forwards it while the guest kernel shuts down (which takes longer). The host
/// waits for the VMM's exit, not for this reply, so a lost reply costs nothing; the 300 ms this
/// was cost every sandbox's teardown as much.
const DESTROY_GRACE: Duration = Duration::from_millis(50);

#[derive(Parser)]
#[command(name = "husk-agent", version, about = "husk guest agent (PID 1 in a husk VM)")]
enum Cli {
    /// Host mode: serve the agent API on a Unix socket and run containers on this host.
    Serve {
        /// Unix socket to listen on (hybrid-vsock handshake: `CONNECT <port>\n`).
        #[arg(long)]
        unix: PathBuf,
        /// Directory whose subdirectories stand in for virtio-fs shares (by tag).
        #[arg(long)]
        shares: PathBuf,
        /// The agent's state directory.
        #[arg(long, default_value = "/run/husk-agent")]
        state: PathBuf,
    },
}

fn main() {
    let mut args = std::env::args();
    match args.nth(1).as_deref() {
        Some("__oci") => oci::helper_main(&args.next().unwrap_or_default()),
        Some("__oci-spare") => spare::park_main(),
        _ => {}
    }
    if std::process::id() == 1 {
        guest_main();
    }
    let Cli::Serve { unix, shares, state } = Cli::parse();
    init_logging(std::env::var("HUSK_AGENT_LOG").ok());
    if let Err(e) = host_main(unix, shares, state) {
        eprintln!("husk-agent: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(filter: Option<String>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// `husk.log=<filter>` from the kernel command line.
fn cmdline_log_filter() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|a| a.strip_prefix("husk.log=").map(str::to_string))
}

fn guest_main() -> ! {
    let started = init::boottime_ns();
    if let Err(e) = init::setup_guest() {
        eprintln!("husk-agent: guest setup failed: {e}");
        init::power_off();
    }
    init_logging(cmdline_log_filter());
    let cfg = Config {
        state_dir: "/run/husk-agent".into(),
        shares_dir: pb::SHARES_DIR.into(),
        guest: true,
        no_pivot: false,
    };
    if let Err(e) = serve(Endpoint::Vsock, cfg, started) {
        tracing::error!("{e:#}");
    }
    init::power_off();
}

fn host_main(unix: PathBuf, shares: PathBuf, state: PathBuf) -> anyhow::Result<()> {
    // Container processes outlive the helpers that create them; they must come back to us.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    let no_pivot = root_is_initramfs();
    if no_pivot {
        tracing::warn!("/ is the initramfs, where pivot_root is refused: containers use MS_MOVE + chroot");
    }
    let cfg = Config { state_dir: state, shares_dir: shares, guest: false, no_pivot };
    serve(Endpoint::Unix(unix), cfg, init::boottime_ns())
}

/// True when `/` is the kernel's initial rootfs (pivot_root(2) refuses to move it).
fn root_is_initramfs() -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root_fs = info.lines().rfind(|l| l.split(' ').nth(4) == Some("/")).and_then(|l| {
        let (_, after) = l.split_once(" - ")?;
        after.split(' ').next().map(str::to_string)
    });
    root_fs.as_deref() == Some("rootfs")
}

fn serve(endpoint: Endpoint, cfg: Config, started_ns: u64) -> anyhow::Result<()> {
    let guest = cfg.guest;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let reaper = Arc::new(reaper::Reaper::default());
        {
            let reaper = reaper.clone();
            tokio::spawn(async move {
                if let Err(e) = reaper.run().await {
                    tracing::error!("reaper: {e}");
                }
            });
        }
        if guest {
            network::loopback_up().await.context("guest loopback")?;
        }
        let agent = Arc::new(Agent::new(cfg, reaper)?);
        agent.init_started_ns.store(started_ns, Ordering::Relaxed);
        let oom = agent.oom();
        tokio::spawn(async move { oom.run().await });
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let listener = tokio::spawn(listener::serve(endpoint, tx, agent.stdio.clone()));
        let svc = service::Service(agent.clone());
        let server = tonic::transport::Server::builder()
            .add_service(pb::sandbox_server::SandboxServer::new(svc.clone()))
            .add_service(pb::containers_server::ContainersServer::new(svc.clone()))
            .add_service(pb::processes_server::ProcessesServer::new(svc.clone()))
            .add_service(pb::events_server::EventsServer::new(svc.clone()))
            .add_service(pb::health_server::HealthServer::new(svc))
            .serve_with_incoming(ReceiverStream::new(rx));
        agent.ready_ns.store(init::boottime_ns(), Ordering::Relaxed);
        if guest {
            tracing::info!("agent ready");
        }
        tokio::select! {
            r = server => r.context("gRPC server")?,
            r = listener => r.context("listener task")?.context("listener")?,
            () = async { agent.shutdown.notified().await; tokio::time::sleep(DESTROY_GRACE).await } => {}
        }
        anyhow::Ok(())
    })
}
