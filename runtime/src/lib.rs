//! husk host runtime. For now: the client that talks to husk-agent in a sandbox VM.

pub mod agent_client;
