//! Runs one test-host job by hand, for debugging and timing:
//! `cargo run -p husk-tests --example testhost-run -- [--cpus N] [--mem MIB] [--timeout SECS]
//! [--qemu] [--net] [--runtime-kit] SCRIPT [FILE...]` (`--net`: load the networking modules in L1;
//! `--runtime-kit`: bring husk, its VMM, guest kernel, initramfs, busybox and the agent probe, and
//! replace `@HUSK@`, `@BUSYBOX@` and `@PROBE@` in the script with their paths). Prints the
//! script's output, timings and the exit code.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use husk_tests::artifacts::{bin, RuntimeTestKit};
use husk_tests::{kvm_mode, run_job, Job};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut job = Job::default();
    let mut qemu = false;
    let mut kit = false;
    let mut script = None;
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--cpus" => job.cpus = value("--cpus")?.parse()?,
            "--mem" => job.mem_mib = value("--mem")?.parse()?,
            "--timeout" => job.timeout = Duration::from_secs(value("--timeout")?.parse()?),
            "--qemu" => qemu = true,
            "--net" => job.net = true,
            "--runtime-kit" => kit = true,
            _ if script.is_none() => script = Some(a),
            _ => job.files.push(PathBuf::from(a)),
        }
    }
    let Some(script) = script else { bail!("usage: testhost-run [options] SCRIPT [FILE...]") };
    job.script = script;
    if kit {
        let k = RuntimeTestKit::find().map_err(anyhow::Error::msg)?;
        let probe = bin("husk-agent-probe").map_err(anyhow::Error::msg)?;
        job.script = job
            .script
            .replace("@HUSK@", &k.husk.display().to_string())
            .replace("@BUSYBOX@", &k.busybox.display().to_string())
            .replace("@PROBE@", &probe.display().to_string());
        job.files.extend(k.files().map(|p| p.to_path_buf()));
        job.files.push(probe);
    }
    if qemu {
        job = job.with_qemu()?;
    }
    eprintln!("mode: {:?}", kvm_mode());
    let out = run_job(&job)?;
    print!("{}", out.output);
    eprintln!("exit {} after {:?}; L1: {:?}", out.exit_code, out.elapsed, out.l1);
    if std::env::var_os("SHOW_CONSOLE").is_some() {
        eprintln!("--- console ---\n{}", out.console);
    }
    Ok(())
}
