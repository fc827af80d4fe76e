//! How big a sandbox's VM is, from its first container's limits.

use husk_vmm::config::MAX_VCPUS;

use super::CreateOpts;
use crate::bundle::Bundle;
use crate::config::Config;
use crate::vm::VmShape;

/// Room for the memory limit plus the guest's own needs, and as many vCPUs as the CPU quota
/// allows, never more than the host has.
pub(super) fn vm_shape(cfg: &Config, b: &Bundle, opts: &CreateOpts) -> VmShape {
    let res = b.spec.linux().as_ref().and_then(|l| l.resources().clone());
    let mem_limit = res.as_ref().and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()).filter(|l| *l > 0);
    let mut memory_mib = opts.memory_mib.unwrap_or(cfg.memory_mib);
    if let Some(l) = mem_limit {
        // A limit beyond the host's RAM (a spec's "unlimited" in bytes, say) must not make a VM
        // larger than the host.
        let want = (l as u64 >> 20) + 128;
        memory_mib = memory_mib.max(want.min(host_memory_mib()).min(u32::MAX as u64) as u32);
    }
    let cpu = res.as_ref().and_then(|r| r.cpu().clone());
    let quota_cpus = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            Some((q as u64).div_ceil(p).clamp(1, MAX_VCPUS.into()) as u32)
        }
        _ => None,
    });
    let host_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let vcpus = opts.vcpus.or(quota_cpus).unwrap_or(cfg.vcpus).clamp(1, host_cpus.clamp(1, MAX_VCPUS));
    let hostname = b.spec.hostname().clone().unwrap_or_else(|| "husk".into());
    VmShape { memory_mib, vcpus, hostname, extra_shares: opts.extra_shares.clone() }
}

/// The host's RAM in MiB (no cap if sysinfo fails).
pub(super) fn host_memory_mib() -> u64 {
    // SAFETY: sysinfo only writes the struct it is given, which is a zeroed local that lives
    // for the call; all-zero is a valid `sysinfo`.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `si` is a valid, exclusively borrowed out-pointer.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(si.mem_unit as u64) >> 20
}
