//! Boots one VMM command line several times and measures each run: time from spawn to a marker
//! line on the VMM's stdout, the VMM's memory when the marker appears (total RSS and the RSS of
//! the guest-RAM mapping, i.e. guest memory touched), and peak RSS at exit. Prints one JSON
//! object per run. Runs wherever KVM is real (inside the test host here).
//!
//! usage: husk-bootbench --name NAME --runs N --marker TEXT --guest-mem-mib M -- CMD ARGS...

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

struct Args {
    name: String,
    runs: u32,
    marker: String,
    guest_mem_kib: u64,
    cmd: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut name, mut runs, mut marker, mut mem) = (None, 5, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--name" => name = it.next(),
            "--runs" => runs = it.next().context("--runs needs a value")?.parse()?,
            "--marker" => marker = it.next(),
            "--guest-mem-mib" => {
                mem = Some(it.next().context("--guest-mem-mib needs a value")?.parse::<u64>()?)
            }
            "--" => break,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let cmd: Vec<String> = it.collect();
    if cmd.is_empty() {
        bail!("no command given after --");
    }
    Ok(Args {
        name: name.context("--name is required")?,
        runs,
        marker: marker.context("--marker is required")?,
        guest_mem_kib: mem.context("--guest-mem-mib is required")? * 1024,
        cmd,
    })
}

/// (total RSS, RSS of the guest RAM mapping) in KiB, from /proc/PID/smaps. Guest RAM is the
/// anonymous mapping whose size matches the configured memory (within 4 MiB of alignment slack).
fn rss_split(pid: u32, guest_kib: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total += rss;
                if size >= guest_kib && size <= guest_kib + 4096 {
                    guest = guest.max(rss);
                }
            }
            _ => {}
        }
    }
    Some((total, guest))
}

fn one_run(a: &Args, run: u32) -> Result<String> {
    let start = Instant::now();
    let mut child = Command::new(&a.cmd[0])
        .args(&a.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", a.cmd[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout")?;
    let mut marker_ms = None;
    let mut at_marker = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if marker_ms.is_none() && line.contains(&a.marker) {
            marker_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            at_marker = rss_split(pid, a.guest_mem_kib);
        }
    }
    // Peak RSS of the child from wait4's rusage.
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unreaped child; pointers are valid.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let exit = std::process::ExitStatus::from_raw(status);
    let (rss, guest) = at_marker.unwrap_or((0, 0));
    Ok(format!(
        "{{\"vmm\":\"{}\",\"run\":{run},\"marker_ms\":{},\"total_ms\":{:.1},\"exit\":{},\"rss_kib\":{rss},\"guest_rss_kib\":{guest},\"peak_rss_kib\":{}}}",
        a.name,
        marker_ms.map_or("null".to_string(), |m| format!("{m:.1}")),
        start.elapsed().as_secs_f64() * 1000.0,
        exit.code().unwrap_or(-1),
        ru.ru_maxrss
    ))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    for run in 0..a.runs {
        println!("{}", one_run(&a, run)?);
    }
    Ok(())
}
