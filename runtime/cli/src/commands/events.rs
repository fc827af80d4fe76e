//! `husk events`: stats and OOM events as JSON lines. A failed stream or stats call is a
//! failure (non-zero exit), not the end of the events.

use std::time::Duration;

use husk_core::RuntimeError;
use husk_proto as pb;
use serde_json::{json, Value};

use super::{out, ExitCode, Rt};

/// Go-style durations: `500ms`, `5s`, `1m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("invalid duration {s:?}"));
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
        let n: f64 = rest[..n_end].parse().map_err(|_| bad())?;
        let unit_end =
            rest[n_end..].find(|c: char| c.is_ascii_digit()).map(|i| n_end + i).unwrap_or(rest.len());
        let secs = match &rest[n_end..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(n * secs).map_err(|_| bad())?;
        rest = &rest[unit_end..];
    }
    Ok(total)
}

fn stats_event(id: &str, s: &pb::ContainerStatsResponse) -> Value {
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {"total": s.cpu_usage_usec.saturating_mul(1000)}},
            "memory": {"usage": {"usage": s.memory_usage_bytes, "limit": s.memory_limit_bytes}, "oom_kills": s.oom_kills},
            "pids": {"current": s.pids_current},
        }
    })
}

pub async fn run(rt: &Rt, id: &str, interval: &str, once: bool) -> Result<ExitCode, RuntimeError> {
    let interval = parse_duration(interval)?;
    if interval.is_zero() {
        return Err(RuntimeError::InvalidArgument("duration interval must be greater than 0".into()));
    }
    let s = rt.stats(id).await?;
    out!("{}", stats_event(id, &s));
    if once {
        return Ok(0);
    }
    let mut events = rt.events(id).await?;
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Ok(pb::Event { kind: Some(pb::event::Kind::Oom(o)) })) if o.container_id == id => {
                    out!("{}", json!({"type": "oom", "id": id}));
                }
                // The container's end ends its events.
                Some(Ok(pb::Event { kind: Some(pb::event::Kind::Exit(e)) })) if e.container_id == id && e.exec_id.is_empty() => {
                    return Ok(0);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(RuntimeError::Vm(format!("the event stream of container {id} ended"))),
            },
            _ = tick.tick() => {
                let s = rt.stats(id).await?;
                out!("{}", stats_event(id, &s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").ok(), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s").ok(), Some(Duration::from_secs(90)));
        for bad in ["", "5", "s", "5x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
