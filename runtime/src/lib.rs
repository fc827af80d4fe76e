//! husk host runtime: the sandbox manager (state directory, one detached VMM per sandbox), the
//! runc-compatible OCI commands, `husk run`, the relay processes that stand for container
//! processes on the host, and the client that talks to husk-agent in a sandbox VM.

pub mod agent_client;
pub mod bundle;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod foreground;
pub mod image;
pub mod launch;
pub mod mounts;
pub mod ops;
pub mod pod;
pub mod procinfo;
pub mod quick;
pub mod relay;
pub mod runlog;
pub mod sandbox;
pub mod signals;
pub mod state;
pub mod uds;
