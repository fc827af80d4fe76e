//! `husk snapshot prepare|ls|rm`: the VM snapshots sandboxes start from (see
//! `husk_core::vm::snapshot`). They are made on first use anyway; `prepare` takes that cost
//! ahead of time, for the shapes `husk run` and OCI containers use (with `--nics N`, those of
//! sandboxes with N pod interfaces: CNI, `-p`, Kubernetes pods).

use std::path::PathBuf;
use std::time::Instant;

use husk_core::config::Config;
use husk_core::vm::snapshot;
use husk_core::vm::{ExtraShare, VmShape};
use husk_core::RuntimeError;

use super::{out, ExitCode};
use crate::args::SnapshotCommand;
use crate::error::CliError;

pub async fn run(c: &SnapshotCommand) -> Result<ExitCode, CliError> {
    let cfg = Config::load()?;
    let root = cfg.snapshot_root();
    match c {
        SnapshotCommand::Prepare { memory, cpus, nics } => {
            if *nics > snapshot::MAX_NICS {
                return Err(RuntimeError::InvalidArgument(format!(
                    "--nics {nics}: at most {}",
                    snapshot::MAX_NICS
                ))
                .into());
            }
            let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            let memory_mib = memory.unwrap_or(cfg.memory_mib);
            if !(husk_core::config::MIN_MEMORY_MIB..=husk_core::config::MAX_MEMORY_MIB as u32)
                .contains(&memory_mib)
            {
                return Err(
                    RuntimeError::InvalidArgument(format!("--memory {memory_mib}: out of range")).into()
                );
            }
            let vcpus = cpus.unwrap_or(cfg.vcpus).clamp(1, host_cpus.min(husk_core::config::MAX_VCPUS));
            // An OCI container's VM, then a `husk run` sandbox's (its rootfs is one more share).
            let oci = VmShape {
                memory_mib,
                vcpus,
                hostname: String::new(),
                extra_shares: Vec::new(),
                network: None,
            };
            let mut run = oci.clone();
            run.extra_shares = vec![ExtraShare {
                tag: super::sandbox_run::ROOTFS_TAG.into(),
                path: PathBuf::new(),
                read_only: true,
            }];
            for (what, shape) in [("OCI containers", oci), ("husk run", run)] {
                let started = Instant::now();
                let dir = snapshot::ensure_with_nics(&cfg, &shape, *nics)
                    .await
                    .map_err(|e| RuntimeError::Vm(format!("making the snapshot: {e}")))?;
                out!(
                    "{} ({what}, {memory_mib} MiB, {vcpus} vCPU, {nics} NIC): ready in {:.1} s",
                    dir.display(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        SnapshotCommand::Ls => {
            out!(
                "{:<34} {:>8} {:>5} {:>7} {:>5} {:<10} {:>8} CREATED",
                "KEY",
                "MEMORY",
                "CPUS",
                "SHARES",
                "NICS",
                "SIZE",
                "MADE IN"
            );
            for (dir, meta) in snapshot::list(&root) {
                let key = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let size = std::fs::metadata(dir.join("memory")).map_or(0, |m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                });
                match meta {
                    Some(m) => out!(
                        "{key:<34} {:>8} {:>5} {:>7} {:>5} {:<10} {:>8} {}",
                        format!("{}M", m.inputs.memory_mib),
                        m.inputs.vcpus,
                        m.inputs.shares.len() + 1,
                        m.inputs.nics,
                        format!("{}M", size >> 20),
                        format!("{:.1}s", m.prepare_ms as f64 / 1000.0),
                        m.created
                    ),
                    None => out!("{key:<34} (incomplete)"),
                }
            }
        }
        SnapshotCommand::Rm => {
            let n = snapshot::remove_all(&root);
            out!("removed {n} snapshot(s) from {}", root.display());
        }
    }
    Ok(0)
}
