//! `husk create`: a container whose process waits for `start`, behind a detached relay.

use husk_core::bundle::Bundle;
use husk_core::stdio::StdioStrategy;
use husk_core::{CreateOpts, RuntimeError};

use super::{refuse_preserve_fds, ExitCode, Rt};
use crate::args::Create;

pub async fn run(rt: &Rt, a: Create) -> Result<ExitCode, RuntimeError> {
    refuse_preserve_fds(a.preserve_fds)?;
    let bundle = Bundle::load(&a.bundle)?;
    let opts =
        CreateOpts::new(StdioStrategy::Relay { console_socket: a.console_socket, pid_file: a.pid_file });
    rt.create(&a.id, &bundle, opts).await?;
    Ok(0)
}
