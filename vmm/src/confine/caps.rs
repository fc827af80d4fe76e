//! Capabilities per thread kind. Only the virtio-fs server keeps any: it acts on the share for
//! guest processes of every uid, as virtiofsd does. Each one and why:
//! - CAP_CHOWN: files the guest creates or chowns get the guest's owner;
//! - CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: the guest kernel already checked permissions
//!   against its own users, and the server must reach files its uid does not own;
//! - CAP_FOWNER: chmod, utimes and xattrs on files owned by other uids;
//! - CAP_FSETID: keeps setuid/setgid bits the guest sets (it is dropped around writes that must
//!   clear them, the KILLPRIV_V2 contract);
//! - CAP_SETUID, CAP_SETGID: creates run with the requesting guest's uid/gid (setresuid on the
//!   server thread only);
//! - CAP_MKNOD: device nodes in container root filesystems;
//! - CAP_SETFCAP: `security.capability` xattrs (file capabilities in images).
//!
//! Everything else, CAP_SYS_ADMIN included, is gone from every thread's permitted, effective,
//! inheritable, ambient and bounding sets.

use caps::{CapSet, Capability, CapsHashSet};

use super::ThreadKind;

const FS_SERVER: [Capability; 10] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
    // Lets the thread drop its bounding set; it is itself dropped last.
    Capability::CAP_SETPCAP,
];

/// The capabilities a thread of `kind` keeps.
pub fn needed(kind: ThreadKind) -> CapsHashSet {
    match kind {
        ThreadKind::VirtioFs => FS_SERVER.iter().copied().filter(|c| *c != Capability::CAP_SETPCAP).collect(),
        _ => CapsHashSet::new(),
    }
}

fn io(e: caps::errors::CapsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Drops from the calling thread's bounding set every capability that no thread kind keeps.
/// Called on the main thread before it starts any other, so that every thread it starts
/// inherits the narrow set and has only a few capabilities left to drop itself (each one
/// read and dropped is a syscall, and there are about forty, per thread).
pub fn narrow_bounding() -> std::io::Result<()> {
    drop_bounding(|cap| FS_SERVER.contains(&cap))
}

/// Drops from the calling thread's bounding set each capability it holds that `keep` refuses.
/// A capability this kernel does not know reads as an error and is passed by.
fn drop_bounding(keep: impl Fn(Capability) -> bool) -> std::io::Result<()> {
    if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(io)? {
        return Ok(());
    }
    for cap in caps::all() {
        if !keep(cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(io)?;
        }
    }
    Ok(())
}

/// Narrows the calling thread to `keep`. Without CAP_SETPCAP (an unprivileged husk-vmm) the
/// bounding set cannot change; the other sets still shrink.
pub fn restrict_thread(keep: CapsHashSet) -> std::io::Result<()> {
    drop_bounding(|cap| keep.contains(&cap))?;
    caps::clear(None, CapSet::Ambient).map_err(io)?;
    caps::clear(None, CapSet::Inheritable).map_err(io)?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(io)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(io)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_started_after_the_narrowing_inherit_it_and_drop_the_rest_themselves() {
        // On a thread of its own: the bounding set is per thread, and the harness's stays.
        std::thread::spawn(|| {
            if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
                eprintln!("skipped: no CAP_SETPCAP, so the bounding set cannot change");
                return;
            }
            narrow_bounding().expect("narrow");
            let allowed: CapsHashSet = FS_SERVER.iter().copied().collect();
            let narrowed = caps::read(None, CapSet::Bounding).expect("read");
            assert!(narrowed.is_subset(&allowed), "left after narrowing: {narrowed:?}");
            let (inherited, own) = std::thread::spawn(|| {
                let inherited = caps::read(None, CapSet::Bounding).expect("read");
                restrict_thread(CapsHashSet::new()).expect("restrict");
                (inherited, caps::read(None, CapSet::Bounding).expect("read"))
            })
            .join()
            .expect("thread");
            assert_eq!(inherited, narrowed, "a thread starts with its creator's bounding set");
            assert!(own.is_empty(), "a thread that keeps nothing holds nothing: {own:?}");
        })
        .join()
        .expect("test thread");
    }
}
