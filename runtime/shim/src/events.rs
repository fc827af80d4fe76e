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

/// Events of one shim, in one containerd namespace.
pub struct Events {
    publisher: RemotePublisher,
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
        Self { publisher, namespace }
    }

    async fn publish(&self, topic: &str, ev: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(Context::default(), topic, &self.namespace, ev).await {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    pub async fn created(&self, id: &str, bundle: &str, pid: u32) {
        let ev = TaskCreate { container_id: id.into(), bundle: bundle.into(), pid, ..Default::default() };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn started(&self, id: &str, pid: u32) {
        let ev = TaskStart { container_id: id.into(), pid, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev)).await;
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
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn oom(&self, id: &str) {
        let ev = TaskOOM { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn exec_added(&self, id: &str, exec_id: &str) {
        let ev = TaskExecAdded { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn exec_started(&self, id: &str, exec_id: &str, pid: u32) {
        let ev =
            TaskExecStarted { container_id: id.into(), exec_id: exec_id.into(), pid, ..Default::default() };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn paused(&self, id: &str) {
        let ev = TaskPaused { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn resumed(&self, id: &str) {
        let ev = TaskResumed { container_id: id.into(), ..Default::default() };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev)).await;
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
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
    }
}
