//! The husk agent API (`agent.proto`): generated tonic clients and servers (feature `grpc`, on by
//! default), the vsock ports, and the hybrid-vsock [`handshake`] codec the streams start with.

pub mod handshake;

#[cfg(feature = "grpc")]
#[allow(clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("husk.agent.v1");
}

#[cfg(feature = "grpc")]
pub use generated::*;

/// Bumped on incompatible changes; the agent reports it in `Health.Check`.
/// 2: `ContainerInfo.status` is the `ContainerStatus` enum (was a string).
pub const API_VERSION: u32 = 2;

/// Guest vsock port of the gRPC server.
pub const AGENT_PORT: u32 = 1024;

/// Guest vsock port for process stdio streams. A client opens a stream, writes
/// `STDIO <name>\n` ([`handshake::Request::Stdio`]), and reads `OK\n` back; the name is then
/// usable once in a `Stdio` message. Unclaimed streams are dropped after [`STDIO_CLAIM_TIMEOUT_SECS`].
pub const STDIO_PORT: u32 = 1025;

pub const STDIO_CLAIM_TIMEOUT_SECS: u64 = 60;

/// Host vsock port the agent dials once it serves, closing the connection at once (the VMM
/// forwards it to the listener at `<vsock socket>_<port>`): a booting VM's readiness reaches
/// the host as an event instead of being polled for.
pub const READY_PORT: u32 = 1026;

/// Where the agent mounts share `<tag>` in the guest.
pub const SHARES_DIR: &str = "/run/husk/shares";
