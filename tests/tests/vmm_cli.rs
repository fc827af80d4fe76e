//! Bad input to husk-vmm: one clear line on stderr, exit status 1, never a panic. These fail
//! before any guest runs, so they need no KVM test host.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_tests::artifacts::{bin, guest_artifact};
use husk_tests::require;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn run(vmm: &Path, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let out = Command::new(vmm).args(args).envs(env.iter().copied()).output().expect("spawn husk-vmm");
    Outcome { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn assert_clean_error(o: &Outcome, needle: &str) {
    assert_eq!(o.code, Some(1), "exit status 1 expected, stderr: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line expected: {:?}", o.stderr);
    assert!(lines[0].starts_with("husk-vmm: error: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} should mention {needle:?}", lines[0]);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("husk-vmm-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn file(&self, name: &str, data: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 64-bit ELF whose one segment (at 16 MiB, 100 MiB long) cannot fit a small VM.
fn big_elf() -> Vec<u8> {
    let mut elf = vec![0u8; 64 + 56];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    elf[64..68].copy_from_slice(&1u32.to_le_bytes());
    elf[64 + 0x18..64 + 0x20].copy_from_slice(&(16u64 << 20).to_le_bytes());
    elf[64 + 0x28..64 + 0x30].copy_from_slice(&(100u64 << 20).to_le_bytes());
    elf
}

#[test]
fn bad_input_gets_one_line_errors() {
    let vmm = require!(bin("husk-vmm"));
    let s = Scratch::new("bad");
    let text = s.file("text", b"this is not a kernel\n");
    let big = s.file("big.elf", &big_elf());
    let dir = s.0.display().to_string();
    let k = |p: &str| vec!["--kernel".to_string(), p.to_string()];
    let with = |mut v: Vec<String>, extra: &[&str]| {
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let long_cmdline = "x".repeat(5000);
    // Snapshot directories that are refused before KVM is opened (the test host restores
    // real ones, see vmm_boot.rs).
    let snap = |name: &str, state: &[u8]| {
        let d = s.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), state).unwrap();
        std::fs::write(d.join("memory"), b"").unwrap();
        d.display().to_string()
    };
    let garbage = snap("snap-garbage", &[0x5a; 200]);
    let short = snap("snap-short", b"HUSKSNAP");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (k("/nonexistent/vmlinux"), "No such file"),
        (k(&text), "neither an ELF vmlinux nor a bzImage"),
        (k(&s.file("empty", b"")), "empty"),
        (k(&dir), "not a regular file"),
        (k(&s.file("short.elf", b"\x7fELF\x02\x01\x01\x00")), "corrupt or truncated"),
        (with(k(&big), &["--memory", "64"]), "too small for the kernel"),
        (with(k(&text), &["--memory", "4"]), "memory_mib 4 is out of range"),
        (with(k(&text), &["--memory", "99999999999"]), "out of range"),
        (with(k(&text), &["--vcpus", "100000"]), "vcpus 100000 is out of range"),
        (with(k(&text), &["--vcpus", "0"]), "vcpus 0"),
        (with(k(&text), &["--vcpus", "-3"]), "-3"),
        (with(k(&text), &["--memory", "lots"]), "invalid value 'lots'"),
        (with(k(&text), &["--serial", "tcp:1"]), "expected stdio, none or file:PATH"),
        (with(k(&text), &["--cmdline", &long_cmdline]), "at most 2048"),
        (with(k(&text), &["--initramfs", "/nonexistent/initrd"]), "initramfs"),
        (with(k(&text), &["--restore", "/nonexistent/snap"]), "snapshot read state file"),
        (with(k(&text), &["--restore", &garbage]), "not a husk-vmm snapshot (bad magic)"),
        (with(k(&text), &["--restore", &short]), "snapshot is truncated: 8 of 32 bytes"),
        (with(k(&text), &["--snapshot-dir", &dir]), "--control"),
        (vec!["--bogus".into()], "unexpected argument '--bogus'"),
        (vec![], "required arguments were not provided"),
        (vec!["--config".into(), s.file("bad.json", b"{\"kernel\": ")], "config file"),
        (
            vec!["--config".into(), s.file("unknown.json", b"{\"kernel\": \"/k\", \"mem\": 1}")],
            "unknown field `mem`",
        ),
        (
            vec!["--config".into(), s.file("types.json", b"{\"kernel\": \"/k\", \"vcpus\": \"two\"}")],
            "invalid type",
        ),
        (vec!["--config".into(), "/nonexistent.json".into()], "cannot read config file"),
        (vec!["--config".into(), text.clone(), "--vcpus".into(), "2".into()], "cannot be used with"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&run(&vmm, &args, &[]), needle);
    }
}

#[test]
fn kvm_device_missing_or_forbidden() {
    let vmm = require!(bin("husk-vmm"));
    // A real kernel image gets past the input checks to the point where KVM is opened.
    let kernel = require!(guest_artifact("vmlinux"));
    let k = kernel.display().to_string();
    let o = run(&vmm, &["--kernel", &k], &[("HUSK_KVM_DEVICE", "/nonexistent/kvm")]);
    assert_clean_error(&o, "does not exist: KVM is not available");

    // Permission denied, as an unprivileged user meets it: a kvm device node with mode 000.
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped permission case: needs root to create a device node");
        return;
    }
    let s = Scratch::new("perm");
    let node = s.0.join("kvm");
    let c = std::ffi::CString::new(node.display().to_string()).unwrap();
    // SAFETY: valid NUL-terminated path; creates a char device (10:232, like /dev/kvm).
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(10, 232)) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        require!(Err::<(), String>(format!("permission case: cannot mknod here: {err}")));
    }
    // Root bypasses file modes, so the check runs as `nobody` with a kernel it can read.
    let setpriv = Path::new("/usr/bin/setpriv");
    require!(if setpriv.exists() { Ok(()) } else { Err("permission case: setpriv (util-linux) is missing") });
    let pub_kernel = s.file("vmlinux", &std::fs::read(&kernel).unwrap());
    for p in [&s.0, Path::new(&pub_kernel)] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&vmm)
        .args(["--kernel", &pub_kernel])
        .env("HUSK_KVM_DEVICE", &node)
        .output()
        .expect("spawn setpriv");
    let o = Outcome { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() };
    assert_clean_error(&o, "permission denied opening");
}
