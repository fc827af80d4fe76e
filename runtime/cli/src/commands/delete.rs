//! `husk delete [--force] ID`.

use husk_core::vm::VmProcess;
use husk_core::RuntimeError;

use super::{ExitCode, Rt};

pub async fn run(rt: &Rt, id: &str, force: bool) -> Result<ExitCode, RuntimeError> {
    rt.delete(id, force, VmProcess::default()).await?;
    Ok(0)
}
