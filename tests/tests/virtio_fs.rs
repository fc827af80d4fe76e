//! virtio-fs end to end: two host directories shared into the guest (one read-only), the test
//! init's `fs` mode doing file operations inside, and the host checking the results.

use std::path::Path;
use std::time::Duration;

use husk_tests::artifacts::DeviceTestKit;
use husk_tests::{require, run_job, Job};

#[test]
fn virtio_fs_shares_work_and_contain_the_guest() {
    let kit = require!(DeviceTestKit::find());
    let (v, p, k, i) = (kit.vmm.display(), kit.probe.display(), kit.kernel.display(), kit.initrd.display());
    let script = format!(
        r#"
R=/var/share-rw; O=/var/share-ro; mkdir -p $R $O
echo "host file" > $O/hello.txt
echo "HOST-SECRET" > /husk-host-secret
ln -s /husk-host-secret $O/abs-escape
ln -s ../../../../../../husk-host-secret $O/rel-escape
head -c 268435456 /dev/urandom > $O/big
{v} --kernel {k} --initramfs {i} --memory 256 --fs tag=rw,path=$R --fs tag=ro,path=$O,ro \
    --cmdline "console=ttyS0 reboot=k panic=-1 pci=off quiet husk.test=fs" </dev/null 2>&1
echo "@@VM-RC $?"
echo "b.txt=$(cat $R/b.txt) mode=$(stat -c %a $R/b.txt) sym=$(readlink $R/sym) links=$(stat -c %h $R/hard)"
test -d $R/dir && echo "HOST dir ok"
test -e $R/gone || echo "HOST unlink ok"
test -e $R/a.txt || echo "HOST rename ok"
echo "synced=$(cat $R/synced)"
cmp $O/big $R/big-copy && echo "HOST big identical"
{p} getxattr $R/b.txt user.husk 2>&1 | sed 's/^/xattr=/'
test -e $O/new && echo "RO-LEAK"
"#
    );
    let mut job = Job::new(script).timeout(Duration::from_secs(1200));
    job.files.extend(kit.files().map(Path::to_path_buf));
    job.mem_mib = 3072;
    let out = run_job(&job).unwrap_or_else(|e| panic!("test host failed: {e}"));
    let o = &out.output;
    eprintln!("test host: {:?}\n{o}", out.elapsed);
    for check in ["mount", "rw-ops", "ro-refuses-writes", "no-escape", "copy-big", "xattr-security-refused"] {
        assert!(o.contains(&format!("GUEST-CHECK {check} ok")), "guest check {check} failed:\n{o}");
    }
    assert!(!o.contains("FAIL"), "{o}");
    assert!(o.contains("@@VM-RC 0"), "{o}");
    assert!(
        o.contains("b.txt=hello from guest mode=640 sym=b.txt links=2"),
        "guest changes visible on the host:\n{o}"
    );
    for line in ["HOST dir ok", "HOST unlink ok", "HOST rename ok", "synced=durable", "HOST big identical"] {
        assert!(o.contains(line), "{line}:\n{o}");
    }
    // user xattrs: where the host filesystem has them (not tmpfs before Linux 6.6, which is what
    // the nested test host's rootfs is), the guest's value must be visible on the host.
    if o.contains("GUEST-CHECK xattr unsupported") {
        assert!(o.contains("xattr=getxattr") && o.contains("Operation not supported"), "{o}");
        eprintln!("note: host filesystem has no user xattrs; checked that the guest sees EOPNOTSUPP");
    } else {
        assert!(o.contains("GUEST-CHECK xattr ok") && o.contains("xattr=xattr-value"), "{o}");
    }
    assert!(!o.contains("RO-LEAK"), "the read-only share stayed unchanged:\n{o}");
}
