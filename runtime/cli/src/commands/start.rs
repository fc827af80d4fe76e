//! `husk start`: the created container's process runs.

use husk_core::RuntimeError;

use super::{ExitCode, Rt};

pub async fn run(rt: &Rt, id: &str) -> Result<ExitCode, RuntimeError> {
    rt.start(id).await?;
    Ok(0)
}
