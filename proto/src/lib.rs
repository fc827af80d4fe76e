//! The husk agent API (`agent.proto`): generated tonic clients and servers, and the vsock ports
//! and stream header the API relies on.

#[allow(clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("husk.agent.v1");
}

pub use generated::*;

/// Bumped on incompatible changes; the agent reports it in `Health.Check`.
pub const API_VERSION: u32 = 1;

/// Guest vsock port of the gRPC server.
pub const AGENT_PORT: u32 = 1024;

/// Guest vsock port for process stdio streams. A client opens a stream, writes
/// `STDIO <name>\n` (name: 1–64 of `[A-Za-z0-9_.-]`), and reads `OK\n` back; the name is then
/// usable once in a `Stdio` message. Unclaimed streams are dropped after [`STDIO_CLAIM_TIMEOUT_SECS`].
pub const STDIO_PORT: u32 = 1025;

pub const STDIO_CLAIM_TIMEOUT_SECS: u64 = 60;

/// Where the agent mounts share `<tag>` in the guest.
pub const SHARES_DIR: &str = "/run/husk/shares";
