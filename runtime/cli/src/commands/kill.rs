//! `husk kill ID [SIGNAL]`.

use husk_core::{signals, RuntimeError};

use super::{ExitCode, Rt};

pub async fn run(rt: &Rt, id: &str, signal: &str, all: bool) -> Result<ExitCode, RuntimeError> {
    rt.kill(id, signals::parse(signal)?, all).await?;
    Ok(0)
}
