//! Task events published to containerd (over `TTRPC_ADDRESS`).

use std::time::SystemTime;

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

/// Where events go.
enum Sink {
    Remote(RemotePublisher),
    /// Unit tests: what would have been published, as (topic, container id, exit status).
    #[cfg(test)]
    Recorded(std::sync::Mutex<Vec<(String, String, Option<u32>)>>),
}

/// Events of one shim, in one containerd namespace.
pub struct Events {
    sink: Sink,
    namespace: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Self { sink: Sink::Remote(publisher), namespace }
    }

    #[cfg(test)]
    pub fn recorded() -> Self {
        Self { sink: Sink::Recorded(Default::default()), namespace: "test".into() }
    }

    /// What was published (tests).
    #[cfg(test)]
    pub fn seen(&self) -> Vec<(String, String, Option<u32>)> {
        match &self.sink {
            Sink::Recorded(v) => v.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            Sink::Remote(_) => Vec::new(),
        }
    }

    async fn publish(&self, topic: &str, id: &str, code: Option<u32>, ev: Box<dyn MessageDyn>) {
        match &self.sink {
            Sink::Remote(p) => {
                if let Err(e) = p.publish(Context::default(), topic, &self.namespace, ev).await {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
            #[cfg(test)]
            Sink::Recorded(v) => {
                // An exec's exit is recorded as `container/exec`.
                let key = match ev.downcast_ref::<TaskExit>() {
                    Some(e) if e.id != e.container_id => format!("{}/{}", e.container_id, e.id),
                    _ => id.to_string(),
                };
                v.lock().unwrap_or_else(|p| p.into_inner()).push((topic.into(), key, code));
            }
        }
        #[cfg(not(test))]
        let _ = (id, code);
    }

    pub async fn created(&self, id: &str, bundle: &str, pid: u32) {
        let ev = TaskCreate { container_id: id.into(), bundle: bundle.into(), pid, ..Default::default() };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn started(&self, id: &str, pid: u32) {
        let ev = TaskStart { container_id: id.into(), pid, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn exited(&self, id: &str, exec_id: &str, pid: u32, code: u32, at: SystemTime) {
        let ev = TaskExit {
            container_id: id.into(),
            id: if exec_id.is_empty() { id.into() } else { exec_id.into() },
            pid,
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, id, Some(code), Box::new(ev)).await;
    }

    pub async fn oom(&self, id: &str) {
        let ev = TaskOOM { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_OOM_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn exec_added(&self, id: &str, exec_id: &str) {
        let ev = TaskExecAdded { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn exec_started(&self, id: &str, exec_id: &str, pid: u32) {
        let ev =
            TaskExecStarted { container_id: id.into(), exec_id: exec_id.into(), pid, ..Default::default() };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn paused(&self, id: &str) {
        let ev = TaskPaused { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn resumed(&self, id: &str) {
        let ev = TaskResumed { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, id, None, Box::new(ev)).await;
    }

    pub async fn deleted(&self, id: &str, pid: u32, code: u32, at: SystemTime) {
        let ev = TaskDelete {
            container_id: id.into(),
            id: id.into(),
            pid,
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, id, Some(code), Box::new(ev)).await;
    }
}
