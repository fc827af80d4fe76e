//! Sandbox VMs behind a trait: the lifecycle boots, reaches and destroys them through [`Vms`],
//! which is husk-vmm processes ([`husk_vmm::HuskVmm`]) in use and a fake in unit tests.

pub mod husk_vmm;

use std::future::Future;
use std::path::PathBuf;
use std::process::Child;

use crate::agent::Agent;
use crate::error::RuntimeError;
use crate::state::{SandboxRecord, StateDir};

/// An extra virtio-fs share, fixed when the VM boots.
#[derive(Debug, Clone)]
pub struct ExtraShare {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a new VM looks like.
#[derive(Debug, Clone)]
pub struct VmShape {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub hostname: String,
    pub extra_shares: Vec<ExtraShare>,
    /// The pod's network namespace, wired to taps the VMM opens there.
    pub network: Option<crate::network::Wired>,
}

/// The VMM process this process started, while it lives (so a long-lived caller such as
/// `husk run` reaps it). Reaping happens off the async runtime threads.
#[derive(Debug, Default)]
pub struct VmProcess(Option<Child>);

impl VmProcess {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Whether it has exited (false when there is no child to ask).
    pub fn exited(&mut self) -> bool {
        self.0.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
        }
    }

    /// Waits for the child to exit, on a blocking thread.
    pub async fn reap(self) {
        if let Some(mut c) = self.0 {
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
    }
}

/// A VM that has booted and whose agent answered.
#[derive(Debug)]
pub struct Booted<A> {
    pub record: SandboxRecord,
    pub process: VmProcess,
    pub agent: A,
}

/// How long the calls on a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Every call is bounded: a stalled guest gives an error, never a hung command.
    Bounded,
    /// Calls that last as long as a process (waits, event streams).
    Long,
}

/// Booting, reaching and destroying sandbox VMs.
pub trait Vms: Send + Sync + 'static {
    type Agent: Agent;

    /// Boots a VM for sandbox `sid` (whose directory the caller holds locked), waits for its
    /// agent and prepares the guest. On error nothing is left running.
    fn boot(
        &self,
        state: &StateDir,
        sid: &str,
        shape: &VmShape,
    ) -> impl Future<Output = Result<Booted<Self::Agent>, RuntimeError>> + Send;

    /// Whether the sandbox's VM still runs.
    fn alive(&self, rec: &SandboxRecord) -> bool;

    /// Connects to a running sandbox's agent.
    fn connect(
        &self,
        rec: &SandboxRecord,
        calls: Calls,
    ) -> impl Future<Output = Result<Self::Agent, RuntimeError>> + Send;

    /// Powers the VM off (or kills it) and waits for it to go. The caller holds the sandbox
    /// lock; the sandbox's files are the caller's to remove.
    fn power_off(&self, rec: &SandboxRecord, process: VmProcess) -> impl Future<Output = ()> + Send;
}
