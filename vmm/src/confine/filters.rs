//! The seccomp filter of each thread kind: the syscalls that thread makes, found by reading the
//! code paths and checked by running the end-to-end suites under `SeccompMode::Log`. `mmap` and
//! `mprotect` never get PROT_EXEC (no new code in a running VMM); `ioctl` is limited to the
//! requests each kind issues; `tgkill` only reaches this process's own threads.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

use super::{SeccompMode, ThreadKind};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

// ioctl requests (asm-generic/ioctls.h, linux/kvm.h, linux/if_tun.h).
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TCSETSW: u64 = 0x5403;
const TIOCGWINSZ: u64 = 0x5413;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
const KVM_RUN: u64 = 0xae80;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

// State reads for snapshots: a vCPU saves its own, the control thread the VM's.
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
const KVMIO: u32 = 0xae;
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// glibc's pthread_create flags for clone(2): a thread, never a process or a namespace.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, Len::Qword, op, value)
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    debug_assert!(!syscalls.contains(&libc::SYS_mmap) && !syscalls.contains(&libc::SYS_mprotect));
    for nr in syscalls {
        rules.insert(*nr, Vec::new());
    }
}

/// `syscall` allowed only when argument `arg` is one of `values`.
fn allow_arg(rules: &mut Rules, syscall: i64, arg: u8, values: &[u64]) -> Result<(), BackendError> {
    let mut chain = Vec::new();
    for v in values {
        chain.push(SeccompRule::new(vec![cond(arg, Op::Eq, *v)?])?);
    }
    rules.entry(syscall).or_default().extend(chain);
    Ok(())
}

/// What every thread needs: memory, futexes, signals, time, its own exit, and logging.
fn base(pid: i32) -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_sched_yield,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_getrandom,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_fcntl,
            libc::SYS_rseq,
        ],
    );
    // No executable mappings: mmap/mprotect with PROT_EXEC clear.
    let no_exec = || -> Result<Vec<SeccompRule>, BackendError> {
        Ok(vec![SeccompRule::new(vec![cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?])?])
    };
    r.insert(libc::SYS_mmap, no_exec()?);
    r.insert(libc::SYS_mprotect, no_exec()?);
    // Signals only to our own threads (vCPU kicks, the SIGSYS re-raise).
    r.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![cond(0, Op::Eq, pid as u64)?])?]);
    Ok(r)
}

/// Starting threads: `clone` with exactly pthread's flags; clone3 cannot be inspected (its
/// flags are behind a pointer), so [`compile`] makes it fail with ENOSYS and glibc falls back.
fn threads(r: &mut Rules) -> Result<(), BackendError> {
    r.insert(libc::SYS_clone, vec![SeccompRule::new(vec![cond(0, Op::Eq, THREAD_CLONE_FLAGS)?])?]);
    allow(r, &[libc::SYS_set_robust_list, libc::SYS_sched_getaffinity]);
    // A new thread names itself; no other prctl (dumpable, seccomp, capabilities).
    allow_arg(r, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64])
}

fn sockets(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ],
    );
}

fn rules(kind: ThreadKind, pid: i32) -> Result<Rules, BackendError> {
    let mut r = base(pid)?;
    match kind {
        ThreadKind::Main => {
            // Console: the terminal's mode while raw, and the VM's teardown.
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[TCGETS, TCSETS, TCSETSW, TIOCGWINSZ])?;
        }
        ThreadKind::Vcpu => {
            let gets = [
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_GET_MP_STATE(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_TSC_KHZ(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
            ];
            let mut ioctls = vec![KVM_RUN];
            ioctls.extend(gets);
            allow_arg(&mut r, libc::SYS_ioctl, 1, &ioctls)?;
        }
        ThreadKind::Control => {
            sockets(&mut r);
            let gets = [KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()];
            allow_arg(&mut r, libc::SYS_ioctl, 1, &gets)?;
            // Snapshot files, all under the directory fd opened before the jail.
            allow(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_pwrite64,
                    // The working set: this process's pagemap, opened before the jail.
                    libc::SYS_pread64,
                    libc::SYS_ftruncate,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_renameat,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_lseek,
                    libc::SYS_dup,
                ],
            );
        }
        ThreadKind::VirtioRng => {}
        ThreadKind::VirtioNet => {
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[TUNSETOFFLOAD, TUNSETVNETHDRSZ])?;
            allow(&mut r, &[libc::SYS_dup]);
        }
        ThreadKind::VirtioVsock => {
            sockets(&mut r);
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX])?;
            allow(
                &mut r,
                &[
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                    libc::SYS_dup,
                ],
            );
        }
        ThreadKind::LoopbackForward => {
            threads(&mut r)?;
            sockets(&mut r);
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX])?;
            allow(&mut r, &[libc::SYS_dup]);
        }
        ThreadKind::VirtioFs => {
            allow(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_open,
                    libc::SYS_newfstatat,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_fstatfs,
                    libc::SYS_statfs,
                    libc::SYS_getdents64,
                    libc::SYS_lseek,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_preadv2,
                    libc::SYS_pwritev2,
                    libc::SYS_copy_file_range,
                    libc::SYS_fallocate,
                    libc::SYS_ftruncate,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_fchown,
                    libc::SYS_fchownat,
                    libc::SYS_fchmod,
                    libc::SYS_fchmodat,
                    libc::SYS_utimensat,
                    libc::SYS_mkdirat,
                    libc::SYS_mknodat,
                    libc::SYS_symlinkat,
                    libc::SYS_readlinkat,
                    libc::SYS_linkat,
                    libc::SYS_unlinkat,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_getxattr,
                    libc::SYS_lgetxattr,
                    libc::SYS_fgetxattr,
                    libc::SYS_setxattr,
                    libc::SYS_lsetxattr,
                    libc::SYS_fsetxattr,
                    libc::SYS_listxattr,
                    libc::SYS_llistxattr,
                    libc::SYS_flistxattr,
                    libc::SYS_removexattr,
                    libc::SYS_lremovexattr,
                    libc::SYS_fremovexattr,
                    libc::SYS_dup,
                    libc::SYS_flock,
                    // The passthrough sets umask 0 at FUSE_INIT; the umask is this thread's own.
                    libc::SYS_umask,
                    // Requests run with the guest caller's ids, on this thread only.
                    libc::SYS_setresuid,
                    libc::SYS_setresgid,
                    libc::SYS_getuid,
                    libc::SYS_getgid,
                    libc::SYS_geteuid,
                    libc::SYS_getegid,
                    // CAP_FSETID is dropped around writes that must clear setuid bits.
                    libc::SYS_capget,
                    libc::SYS_capset,
                ],
            );
        }
    }
    Ok(r)
}

/// The filters of `kind` in `mode` for process `pid`: its rules, and for kinds that start
/// threads a second program answering clone3 with ENOSYS (the kernel runs every installed
/// program and the stricter answer wins, so clone3 is allowed by the first).
pub fn compile(kind: ThreadKind, mode: SeccompMode, pid: i32) -> Result<Vec<BpfProgram>, BackendError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let arch = std::env::consts::ARCH.try_into()?;
    let mut rules = rules(kind, pid)?;
    let starts_threads = rules.contains_key(&libc::SYS_clone);
    if starts_threads {
        allow(&mut rules, &[libc::SYS_clone3]);
    }
    let mut progs = Vec::new();
    // The ENOSYS program goes in first: installing a program takes prctl(NO_NEW_PRIVS) and
    // seccomp(), which the kind's own program then forbids.
    if starts_threads {
        let mut clone3 = Rules::new();
        allow(&mut clone3, &[libc::SYS_clone3]);
        let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
        progs.push(SeccompFilter::new(clone3, SeccompAction::Allow, enosys, arch)?.try_into()?);
    }
    progs.push(SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?.try_into()?);
    Ok(progs)
}
