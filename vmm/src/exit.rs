//! Why a VM stopped, and the one-shot channel devices and vCPUs use to say so.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How the guest ended. Each maps to a distinct process exit status so callers can tell a clean
/// shutdown from a crash without parsing the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 through the sleep control register (`poweroff`).
    PowerOff,
    /// The guest kernel panicked (pvpanic, or KVM's crash system event).
    GuestPanic,
    /// The guest asked for a reset (`reboot`, keyboard-controller reset). husk VMs do not reboot;
    /// a sandbox guest that resets has gone wrong.
    GuestReset,
    /// Triple fault: the vCPU shut down with no handler left.
    TripleFault,
    /// KVM could not run the guest (internal error, emulation failure, failed entry) or a vCPU
    /// thread failed.
    VcpuError(String),
    /// A snapshot was written on request (see `snapshot::control`); the VM stays paused.
    Snapshotted,
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::GuestPanic => 2,
            ExitReason::TripleFault => 3,
            ExitReason::GuestReset => 4,
            ExitReason::VcpuError(_) => 5,
            ExitReason::Snapshotted => 0,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::GuestPanic => "guest kernel panicked".into(),
            ExitReason::GuestReset => "guest requested a reset".into(),
            ExitReason::TripleFault => "guest triple-faulted (vCPU shutdown)".into(),
            ExitReason::VcpuError(e) => format!("vCPU error: {e}"),
            ExitReason::Snapshotted => "VM snapshotted".into(),
        }
    }
}

/// First reported reason wins; the eventfd wakes the main loop.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { reason: Mutex::new(None), evt: EventFd::new(EFD_NONBLOCK)? })
    }

    pub fn notify(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *slot = Some(reason);
        }
        drop(slot);
        // A full counter still leaves the fd readable, which is all the loop needs.
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_are_distinct() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        n.notify(ExitReason::GuestPanic);
        n.notify(ExitReason::PowerOff);
        assert_eq!(n.reason(), Some(ExitReason::GuestPanic));
        let codes: std::collections::BTreeSet<i32> = [
            ExitReason::PowerOff,
            ExitReason::GuestPanic,
            ExitReason::GuestReset,
            ExitReason::TripleFault,
            ExitReason::VcpuError(String::new()),
        ]
        .iter()
        .map(ExitReason::exit_code)
        .collect();
        assert_eq!(codes.len(), 5);
        assert_eq!(ExitReason::Snapshotted.exit_code(), 0);
    }
}
