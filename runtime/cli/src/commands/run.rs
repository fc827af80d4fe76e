//! OCI `husk run ID`: create + start; in the foreground it relays, then removes the container.

use husk_core::bundle::Bundle;
use husk_core::stdio::StdioStrategy;
use husk_core::{CreateOpts, RuntimeError};

use super::{refuse_preserve_fds, ExitCode, Rt};
use crate::args::OciRun;
use crate::foreground;

pub async fn run(rt: &Rt, a: OciRun) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let bundle = Bundle::load(&a.bundle)?;
    let terminal = bundle.terminal();
    let stdio = if a.detach {
        StdioStrategy::Relay { console_socket: a.console_socket.clone(), pid_file: a.pid_file.clone() }
    } else {
        if terminal && !foreground::stdin_is_tty() {
            return Err(RuntimeError::InvalidArgument(
                "process.terminal is set but stdin is not a terminal".into(),
            ));
        }
        StdioStrategy::Held { size: foreground::own_terminal_size() }
    };
    let mut opts = CreateOpts::new(stdio);
    opts.start = true;
    let held = rt.create(&a.id, &bundle, opts).await?;
    if !a.detach {
        // runc writes its own PID when it stays in the foreground.
        if let Some(p) = &a.pid_file {
            husk_core::state::write_atomic(p, &std::process::id().to_string())?;
        }
    }
    let started = match &held {
        Some(h) if h.started => rt.started(&a.id).await,
        _ => rt.start(&a.id).await,
    };
    if let Err(e) = started {
        let vm = held.map(|h| h.vm).unwrap_or_default();
        let _ = rt.delete(&a.id, true, vm).await;
        return Err(e);
    }
    let Some(held) = held else { return Ok(0) };
    let (outcome, vm) = foreground::relay(rt, held, terminal).await?;
    if !a.keep {
        foreground::delete_after(rt, &a.id, outcome, vm).await?;
        husk_core::timeline::mark("teardown done");
    }
    Ok(outcome.code())
}
