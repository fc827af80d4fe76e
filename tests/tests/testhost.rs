//! Integration tests of the test host itself: a job's output and exit code come back, a
//! nested KVM guest really boots inside it, and a hung job is killed on time.
//!
//! They skip, printing why, where no KVM test host can run.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_tests::{l1_assets, require_testhost, run_job, Initramfs, Job, KvmMode, TestHostError};

/// The tests here report timings, and jobs queue for the host-wide run lock anyway: run them
/// one at a time so a test's wall-clock measurements do not include waiting for another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn report(name: &str, out: &husk_tests::JobOutput) {
    eprintln!("{name}: exit {} in {:.2?}, L1 {:?}", out.exit_code, out.elapsed, out.l1);
}

#[test]
fn returns_output_and_exit_code() {
    require_testhost!();
    let _serial = serial();
    let out = run_job(&Job::new("echo hello; exit 3")).expect("job runs");
    report("hello", &out);
    assert_eq!(out.output.trim(), "hello", "console:\n{}", out.console);
    assert_eq!(out.exit_code, 3);
}

#[test]
fn hung_job_times_out() {
    require_testhost!();
    let _serial = serial();
    let start = Instant::now();
    let err = run_job(&Job::new("echo started; sleep 1000").timeout(Duration::from_secs(30)))
        .expect_err("sleep 1000 must time out");
    let took = start.elapsed();
    eprintln!("timeout: returned after {took:.2?}");
    assert!(matches!(err, TestHostError::Timeout { .. }), "{err}");
    assert!(took < Duration::from_secs(35), "took {took:?}");
    if let TestHostError::Timeout { output_tail, .. } = &err {
        assert!(output_tail.contains("started"), "{err}");
    }
}

/// A scratch directory on the host for files a job brings along.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-tests-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

/// The L2 kernel: `HUSK_L2_KERNEL` if set, else the project's guest kernel (an ELF vmlinux
/// booting through PVH) when it has been built, else the L1 cloud kernel (boots too, slower).
fn l2_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("HUSK_L2_KERNEL") {
        return Some(k.into());
    }
    let cache = std::env::var_os("HUSK_CACHE_DIR").map(PathBuf::from).or_else(|| {
        let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from);
        xdg.or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache"))).map(|c| c.join("husk"))
    });
    let built = cache
        .and_then(|c| fs::read_dir(c.join("guest-kernel")).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("vmlinux")))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    built.or_else(|| l1_assets().ok().map(|a| a.vmlinuz.clone()))
}

/// An L2 initramfs whose init prints a marker with the vCPU count and powers off.
fn l2_initramfs(dir: &Path) -> PathBuf {
    let busybox = husk_tests::which("busybox").expect("busybox");
    let mut fs = Initramfs::with_base_layout().expect("layout");
    fs.host_file_at("bin/busybox", &busybox, 0o755).expect("busybox");
    let init = "#!/bin/busybox sh\n\
                /bin/busybox mount -t proc proc /proc\n\
                /bin/busybox echo \"HUSK-L2-BOOTED cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)\"\n\
                /bin/busybox poweroff -f\n";
    fs.data("init", 0o755, init).expect("init");
    let path = dir.join("l2-initrd.cpio");
    fs.write(&path).expect("write L2 initramfs");
    path
}

#[test]
fn nested_kvm_guest_boots() {
    require_testhost!();
    let _serial = serial();
    let Some(kernel) = l2_kernel() else {
        eprintln!("skipped: no L2 kernel (neither guest-kernel nor L1 assets)");
        return;
    };
    let scratch = Scratch::new("l2");
    let initrd = l2_initramfs(&scratch.0);
    let k = kernel.display();
    let i = initrd.display();
    // The L1 script waits for the marker rather than for QEMU to exit, so a guest that cannot
    // power itself off does not hang the test.
    let script = format!(
        r#"set -e
test -c /dev/kvm
t0=$(cut -d' ' -f1 /proc/uptime)
qemu-system-x86_64 -enable-kvm -M microvm -cpu host -m 256 -smp 2 -nodefaults -no-user-config \
  -display none -monitor none -no-reboot -serial file:/tmp/l2.log \
  -kernel {k} -initrd {i} -append 'console=ttyS0 quiet panic=-1 reboot=t' &
pid=$!
deadline=$(( ${{t0%.*}} + 150 ))
until grep -q HUSK-L2-BOOTED /tmp/l2.log 2>/dev/null; do
  kill -0 $pid 2>/dev/null || break
  now=$(cut -d. -f1 /proc/uptime)
  [ $now -lt $deadline ] || {{ echo "L2 did not boot in 150 s"; break; }}
  sleep 0.1
done
t1=$(cut -d' ' -f1 /proc/uptime)
kill $pid 2>/dev/null || true
wait $pid || true
cat /tmp/l2.log
awk "BEGIN {{ printf \"l2-boot-seconds %.2f\n\", $t1 - $t0 }}"
"#
    );
    let job = Job::new(script)
        .file(&kernel)
        .file(&initrd)
        .with_qemu()
        .expect("qemu-system-x86_64 in PATH")
        .timeout(Duration::from_secs(300));
    let out = run_job(&job).expect("job runs");
    report("nested", &out);
    eprintln!("L2 kernel {k}; output:\n{}", out.output);
    assert_eq!(out.exit_code, 0, "{}\nconsole:\n{}", out.output, out.console);
    assert!(out.output.contains("HUSK-L2-BOOTED cpus=2"), "{}\nconsole:\n{}", out.output, out.console);
    if husk_tests::kvm_mode() == KvmMode::Nested {
        assert!(out.l1.is_some());
    }
}
