//! A container's stats in containerd's `io.containerd.cgroups.v2.Metrics` shape, so `ctr task
//! metrics` and CRI stats show the guest cgroup's numbers.

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use husk_proto as pb;

const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_any(s: &pb::ContainerStatsResponse) -> Result<Any, String> {
    let m = Metrics {
        pids: MessageField::some(PidsStat { current: s.pids_current, ..Default::default() }),
        cpu: MessageField::some(CPUStat { usage_usec: s.cpu_usage_usec, ..Default::default() }),
        memory: MessageField::some(MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents { oom_kill: s.oom_kills, ..Default::default() }),
        ..Default::default()
    };
    let value = m.write_to_bytes().map_err(|e| e.to_string())?;
    Ok(Any { type_url: TYPE_URL.into(), value, ..Default::default() })
}
