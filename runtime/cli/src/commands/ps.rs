//! `husk ps ID`: the container's processes, as the guest lists them.

use husk_core::RuntimeError;
use serde_json::json;

use super::{check_format, out, ExitCode, Rt};

pub async fn run(rt: &Rt, id: &str, format: &str) -> Result<ExitCode, RuntimeError> {
    check_format(format)?;
    let procs = rt.processes(id).await?;
    if format == "json" {
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        out!("{}", json!(pids));
    } else {
        out!("{:<8} {:>7} {:>7} {:<5} CMD", "UID", "PID", "PPID", "STAT");
        for p in procs {
            out!("{:<8} {:>7} {:>7} {:<5} {}", p.uid, p.pid, p.ppid, p.state, p.command);
        }
    }
    Ok(0)
}
