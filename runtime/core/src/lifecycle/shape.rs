//! How big a sandbox's VM is, and whether a container fits in the VM it joins.
//!
//! A VM is sized once, when it boots: husk has no memory or vCPU hotplug yet, so a pod's later
//! containers must fit in what its first one was given. Sources, the first present wins:
//! 1. the caller's (`husk run --memory/--cpus`);
//! 2. husk's annotations on the pod, [`ANN_MEMORY_MIB`] and [`ANN_VCPUS`] (containerd passes
//!    pod annotations through when its runtime's `pod_annotations` lists them);
//! 3. the pod's declared resources as containerd's CRI puts them on the sandbox container (the
//!    sum of its containers' limits, which kubelet sends since Kubernetes 1.23);
//! 4. the first container's own limits (a container without a pod: `ctr run`, `husk run`).
//!
//! A size derived from limits (3, 4) has room for the guest on top and is never below the
//! configured default; an explicit one (1, 2) is taken as given.

use std::collections::HashMap;

use husk_vmm::config::MAX_VCPUS;
use oci_spec::runtime::LinuxResources;

use super::CreateOpts;
use crate::bundle::Bundle;
use crate::config::{Config, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::error::RuntimeError;
use crate::state::SandboxRecord;
use crate::vm::VmShape;

/// The VM's memory beyond its containers' limits: the guest kernel, the agent, page cache.
pub const GUEST_OVERHEAD_MIB: u32 = 128;

/// Pod annotation: the VM's memory in MiB.
pub const ANN_MEMORY_MIB: &str = "io.husk.vm.memory-mib";
/// Pod annotation: the VM's vCPUs.
pub const ANN_VCPUS: &str = "io.husk.vm.vcpus";

/// What containerd's CRI plugin (1.6.7 and later) puts on a sandbox from the pod's resources.
const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Limits as a VM sees them: bytes of memory and whole CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Limits {
    memory: Option<u64>,
    cpus: Option<u64>,
}

fn limits(res: Option<&LinuxResources>) -> Limits {
    let memory = res.and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()).filter(|l| *l > 0);
    let cpu = res.and_then(|r| r.cpu().as_ref());
    let cpus = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p)),
        _ => None,
    });
    Limits { memory: memory.map(|l| l as u64), cpus }
}

fn number(ann: &HashMap<String, String>, key: &str) -> Result<Option<u64>, RuntimeError> {
    match ann.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| RuntimeError::InvalidArgument(format!("annotation {key}={v:?} is not a number"))),
    }
}

/// The pod's resources from containerd's sandbox annotations ("0" is containerd's "none").
fn cri_sandbox_limits(ann: &HashMap<String, String>) -> Result<Limits, RuntimeError> {
    let memory = number(ann, CRI_SANDBOX_MEMORY)?.filter(|m| *m > 0);
    let quota = number(ann, CRI_SANDBOX_CPU_QUOTA)?.filter(|q| *q > 0);
    let period = number(ann, CRI_SANDBOX_CPU_PERIOD)?.filter(|p| *p > 0);
    let cpus = quota.zip(period).map(|(q, p)| q.div_ceil(p));
    Ok(Limits { memory, cpus })
}

/// husk's own size annotations, checked against what a VM can be.
fn husk_annotations(ann: &HashMap<String, String>) -> Result<(Option<u32>, Option<u32>), RuntimeError> {
    let bad = |key: &str, v: u64, lo: u64, hi: u64| {
        RuntimeError::InvalidArgument(format!("annotation {key}={v} is outside {lo}..={hi}"))
    };
    let memory = match number(ann, ANN_MEMORY_MIB)? {
        Some(m) if m < MIN_MEMORY_MIB.into() || m > MAX_MEMORY_MIB => {
            return Err(bad(ANN_MEMORY_MIB, m, MIN_MEMORY_MIB.into(), MAX_MEMORY_MIB))
        }
        m => m.map(|m| m as u32),
    };
    let vcpus = match number(ann, ANN_VCPUS)? {
        Some(v) if v < 1 || v > MAX_VCPUS.into() => return Err(bad(ANN_VCPUS, v, 1, MAX_VCPUS.into())),
        v => v.map(|v| v as u32),
    };
    Ok((memory, vcpus))
}

fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// The VM for the container of `b` that starts it.
pub fn vm_shape(cfg: &Config, b: &Bundle, opts: &CreateOpts) -> Result<VmShape, RuntimeError> {
    let ann = b.annotations();
    let (ann_memory, ann_vcpus) = husk_annotations(&ann)?;
    let pod = cri_sandbox_limits(&ann)?;
    let own = limits(b.spec.linux().as_ref().and_then(|l| l.resources().as_ref()));
    let memory_mib = match opts.memory_mib.or(ann_memory) {
        Some(m) => m,
        None => match pod.memory.or(own.memory) {
            // A limit beyond the host's RAM (a spec's "unlimited" in bytes, say) must not make
            // a VM larger than the host.
            Some(l) => {
                let want = (mib_ceil(l) + u64::from(GUEST_OVERHEAD_MIB)).min(host_memory_mib());
                cfg.memory_mib.max(want.min(MAX_MEMORY_MIB) as u32)
            }
            None => cfg.memory_mib,
        },
    };
    let derived = pod.cpus.or(own.cpus).map(|c| c.clamp(1, MAX_VCPUS.into()) as u32);
    let vcpus =
        opts.vcpus.or(ann_vcpus).or(derived).unwrap_or(cfg.vcpus).clamp(1, host_cpus().clamp(1, MAX_VCPUS));
    let hostname = b.spec.hostname().clone().unwrap_or_else(|| "husk".into());
    Ok(VmShape { memory_mib, vcpus, hostname, extra_shares: opts.extra_shares.clone(), network: None })
}

/// Whether container `id` with resources `res` fits in the VM of `vm`: a VM does not grow, so
/// a limit it cannot give is refused rather than silently capped.
pub fn check_fits(id: &str, res: Option<&LinuxResources>, vm: &SandboxRecord) -> Result<(), RuntimeError> {
    let want = limits(res);
    let hint = "size the pod's VM for it: declare the pod's resources (limits), or set the pod annotation";
    if let Some(bytes) = want.memory.filter(|_| vm.memory_mib > 0) {
        let room = vm.memory_mib.saturating_sub(GUEST_OVERHEAD_MIB);
        if mib_ceil(bytes) > room.into() {
            return Err(RuntimeError::InvalidArgument(format!(
                "container {id} asks for {} MiB of memory, more than its VM can give ({room} MiB: \
                 {} MiB less {GUEST_OVERHEAD_MIB} for the guest); {hint} {ANN_MEMORY_MIB}",
                mib_ceil(bytes),
                vm.memory_mib
            )));
        }
    }
    // More CPUs than the host has is what runc gives too: only the VM's own count matters.
    if let Some(cpus) = want.cpus.map(|c| c.min(host_cpus().into())).filter(|_| vm.vcpus > 0) {
        if cpus > vm.vcpus.into() {
            return Err(RuntimeError::InvalidArgument(format!(
                "container {id} asks for {cpus} CPUs, more than its VM's {} vCPUs; {hint} {ANN_VCPUS}",
                vm.vcpus
            )));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(annotations: serde_json::Value, resources: serde_json::Value) -> Bundle {
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "/"},
            "annotations": annotations,
            "linux": {"resources": resources},
        });
        Bundle::from_spec("/nonexistent".into(), serde_json::from_value(spec).expect("spec")).expect("bundle")
    }

    fn cfg() -> Config {
        let mut c = Config::load().expect("config");
        c.memory_mib = 256;
        c.vcpus = 1;
        c
    }

    fn opts() -> CreateOpts {
        CreateOpts::new(crate::stdio::StdioStrategy::Held { size: None })
    }

    fn record(memory_mib: u32, vcpus: u32) -> SandboxRecord {
        SandboxRecord {
            id: "p".into(),
            vmm_pid: 0,
            vmm_start: 0,
            vsock: "/nonexistent".into(),
            containers: Vec::new(),
            memory_mib,
            vcpus,
            network: None,
            working_set: None,
        }
    }

    #[test]
    fn sizes_come_from_the_first_source_present() {
        let none = bundle(json!({}), json!({}));
        assert_eq!(vm_shape(&cfg(), &none, &opts()).expect("shape").memory_mib, 256);
        // The pod's resources from containerd's sandbox annotations, with room for the guest.
        let pod = bundle(
            json!({CRI_SANDBOX_MEMORY: (600u64 << 20).to_string(), CRI_SANDBOX_CPU_QUOTA: "0",
                   CRI_SANDBOX_CPU_PERIOD: "100000"}),
            json!({"memory": {"limit": 64 << 20}}),
        );
        let s = vm_shape(&cfg(), &pod, &opts()).expect("shape");
        assert_eq!((s.memory_mib, s.vcpus), (728, 1));
        // husk's annotation beats them; the caller's beats everything.
        let ann =
            bundle(json!({ANN_MEMORY_MIB: "300", CRI_SANDBOX_MEMORY: (600u64 << 20).to_string()}), json!({}));
        assert_eq!(vm_shape(&cfg(), &ann, &opts()).expect("shape").memory_mib, 300);
        let mut o = opts();
        o.memory_mib = Some(1024);
        assert_eq!(vm_shape(&cfg(), &ann, &o).expect("shape").memory_mib, 1024);
        // A small limit does not shrink the VM below the default.
        let small = bundle(json!({}), json!({"memory": {"limit": 16 << 20}}));
        assert_eq!(vm_shape(&cfg(), &small, &opts()).expect("shape").memory_mib, 256);
    }

    #[test]
    fn bad_size_annotations_are_errors_that_name_them() {
        for (k, v) in
            [(ANN_MEMORY_MIB, "lots"), (ANN_MEMORY_MIB, "1"), (ANN_VCPUS, "0"), (ANN_VCPUS, "100000")]
        {
            let b = bundle(json!({k: v}), json!({}));
            let e = vm_shape(&cfg(), &b, &opts()).expect_err(v).to_string();
            assert!(e.contains(k), "{e}");
        }
        let b = bundle(json!({CRI_SANDBOX_MEMORY: "-5"}), json!({}));
        assert!(vm_shape(&cfg(), &b, &opts()).is_err());
    }

    #[test]
    fn a_container_bigger_than_its_vm_is_refused() {
        let res = |v: serde_json::Value| -> LinuxResources { serde_json::from_value(v).expect("resources") };
        let vm = record(256, 1);
        assert!(check_fits("c", Some(&res(json!({"memory": {"limit": 96 << 20}}))), &vm).is_ok());
        assert!(check_fits("c", Some(&res(json!({"memory": {"limit": 128 << 20}}))), &vm).is_ok());
        let e =
            check_fits("c", Some(&res(json!({"memory": {"limit": 129 << 20}}))), &vm).expect_err("memory");
        assert!(e.to_string().contains("129 MiB") && e.to_string().contains(ANN_MEMORY_MIB), "{e}");
        if host_cpus() >= 2 {
            let two = res(json!({"cpu": {"quota": 200000, "period": 100000}}));
            let e = check_fits("c", Some(&two), &vm).expect_err("cpus");
            assert!(e.to_string().contains("2 CPUs"), "{e}");
            assert!(check_fits("c", Some(&two), &record(256, 2)).is_ok());
        }
        // A VM whose size was not recorded (an older state) takes anything.
        assert!(check_fits("c", Some(&res(json!({"memory": {"limit": 1i64 << 40}}))), &record(0, 0)).is_ok());
        assert!(check_fits("c", None, &vm).is_ok());
    }
}
