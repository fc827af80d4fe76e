//! `husk pause ID` and `husk resume ID`.

use husk_core::RuntimeError;

use super::{ExitCode, Rt};

pub async fn pause(rt: &Rt, id: &str) -> Result<ExitCode, RuntimeError> {
    rt.pause(id).await?;
    Ok(0)
}

pub async fn resume(rt: &Rt, id: &str) -> Result<ExitCode, RuntimeError> {
    rt.resume(id).await?;
    Ok(0)
}
