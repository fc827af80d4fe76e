//! husk-core's errors as ttrpc statuses, with the codes containerd acts on.

use containerd_shim::protos::ttrpc::{self, Code};
use husk_core::RuntimeError;

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// The code containerd expects for each kind of failure.
pub fn to_ttrpc(e: RuntimeError) -> ttrpc::Error {
    let code = match &e {
        RuntimeError::NotFound(_) => Code::NOT_FOUND,
        RuntimeError::Exists(_) => Code::ALREADY_EXISTS,
        RuntimeError::InvalidId(_)
        | RuntimeError::InvalidArgument(_)
        | RuntimeError::Bundle(_)
        | RuntimeError::BundleFile { .. }
        | RuntimeError::BundleSpec { .. }
        | RuntimeError::Namespace { .. }
        | RuntimeError::Hook { .. } => Code::INVALID_ARGUMENT,
        RuntimeError::WrongState(_) | RuntimeError::Missing { .. } => Code::FAILED_PRECONDITION,
        RuntimeError::Agent(a) => match a.code() {
            Some(tonic::Code::NotFound) => Code::NOT_FOUND,
            Some(tonic::Code::InvalidArgument) => Code::INVALID_ARGUMENT,
            Some(tonic::Code::FailedPrecondition) => Code::FAILED_PRECONDITION,
            Some(tonic::Code::AlreadyExists) => Code::ALREADY_EXISTS,
            Some(tonic::Code::DeadlineExceeded) => Code::DEADLINE_EXCEEDED,
            _ => Code::INTERNAL,
        },
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}
