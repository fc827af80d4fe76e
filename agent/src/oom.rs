//! OOM-kill events: watches each container's `memory.events` with inotify and reports when its
//! `oom_kill` count rises.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::error::AgentError;
use crate::fdio::RawFdOwner;

struct Watched {
    container_id: String,
    events_file: PathBuf,
    last: u64,
}

pub struct OomWatcher {
    inotify: AsyncFd<RawFdOwner<Inotify>>,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    events: broadcast::Sender<husk_proto::Event>,
}

impl OomWatcher {
    pub fn new(events: broadcast::Sender<husk_proto::Event>) -> Result<Self, AgentError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(AgentError::errno("inotify_init"))?;
        let inotify = crate::fdio::register(RawFdOwner(inotify)).map_err(AgentError::io("inotify fd"))?;
        Ok(Self { inotify, watched: Mutex::default(), events })
    }

    pub fn watch(&self, container_id: &str, events_file: PathBuf) -> Result<(), AgentError> {
        let wd = self
            .inotify
            .get_ref()
            .0
            .add_watch(&events_file, AddWatchFlags::IN_MODIFY)
            .map_err(AgentError::errno(format!("watching {}", events_file.display())))?;
        let last = oom_kill_count(&events_file);
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.insert(wd, Watched { container_id: container_id.to_string(), events_file, last });
        Ok(())
    }

    pub fn unwatch(&self, container_id: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let wds: Vec<_> =
            watched.iter().filter(|(_, w)| w.container_id == container_id).map(|(wd, _)| *wd).collect();
        for wd in wds {
            watched.remove(&wd);
            // Fails when the cgroup is already gone, which removed the watch anyway.
            let _ = self.inotify.get_ref().0.rm_watch(wd);
        }
    }

    fn check(&self, w: &mut Watched) {
        let now = oom_kill_count(&w.events_file);
        if now > w.last {
            tracing::info!("container {}: OOM kill (count {now})", w.container_id);
            let oom = husk_proto::OomEvent { container_id: w.container_id.clone(), oom_kills: now };
            let _ = self.events.send(husk_proto::Event { kind: Some(husk_proto::event::Kind::Oom(oom)) });
        }
        w.last = now;
    }

    /// Reports OOM kills for ever.
    pub async fn run(&self) {
        loop {
            let mut guard = match self.inotify.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("inotify: {e}; OOM events stop");
                    return;
                }
            };
            let batch = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::warn!("inotify read: {e}");
                    continue;
                }
                Err(_would_block) => continue,
            };
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            for ev in batch {
                if let Some(w) = watched.get_mut(&ev.wd) {
                    self.check(w);
                }
            }
        }
    }
}

fn oom_kill_count(events_file: &std::path::Path) -> u64 {
    std::fs::read_to_string(events_file)
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}
