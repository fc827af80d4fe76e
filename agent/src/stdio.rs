//! Stdio streams the host opened on the stdio port, parked by name until a create or exec
//! request claims them.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_proto::STDIO_CLAIM_TIMEOUT_SECS;

use crate::error::AgentError;

/// Most streams parked at once; more are refused so a client cannot exhaust the agent's fds.
const MAX_PENDING: usize = 1024;

#[derive(Default)]
pub struct StdioRegistry {
    pending: Mutex<HashMap<String, (OwnedFd, Instant)>>,
}

impl StdioRegistry {
    pub fn insert(&self, name: &str, fd: OwnedFd) -> Result<(), AgentError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = Duration::from_secs(STDIO_CLAIM_TIMEOUT_SECS);
        pending.retain(|_, (_, at)| at.elapsed() < ttl);
        if pending.contains_key(name) {
            return Err(AgentError::AlreadyExists(format!("stdio stream {name:?} is already open")));
        }
        if pending.len() >= MAX_PENDING {
            return Err(AgentError::FailedPrecondition("too many unclaimed stdio streams".into()));
        }
        pending.insert(name.to_string(), (fd, Instant::now()));
        Ok(())
    }

    /// The stream named `name`; empty names are for the caller to map to /dev/null.
    pub fn take(&self, name: &str) -> Result<OwnedFd, AgentError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .remove(name)
            .map(|(fd, _)| fd)
            .ok_or_else(|| AgentError::NotFound(format!("no stdio stream named {name:?} is open")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_take_once() {
        let r = StdioRegistry::default();
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        r.insert("s1", a.into()).expect("insert");
        assert!(matches!(r.insert("s1", b.into()), Err(AgentError::AlreadyExists(_))));
        assert!(r.take("s1").is_ok());
        assert!(matches!(r.take("s1"), Err(AgentError::NotFound(_))));
    }
}
