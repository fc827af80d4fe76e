//! `husk update`: a running container's resource limits, from flags or a resources JSON.

use std::io::Read;
use std::path::Path;

use husk_core::RuntimeError;
use serde_json::{json, Value};

use super::{ExitCode, Rt};
use crate::args::Update;

pub async fn run(rt: &Rt, a: Update) -> Result<ExitCode, RuntimeError> {
    let resources = update_resources(&a)?;
    rt.update(&a.id, resources).await?;
    Ok(0)
}

/// Sizes as runc's flags take them: plain bytes or with a k/m/g/t suffix (binary units).
pub fn parse_bytes(s: &str) -> Result<i64, RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("invalid size {s:?}"));
    if s == "-1" {
        return Ok(-1);
    }
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > i64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as i64)
}

pub fn update_resources(a: &Update) -> Result<Vec<u8>, RuntimeError> {
    let mut r: Value = match &a.resources {
        Some(p) => {
            let mut bytes = Vec::new();
            let read = if p == Path::new("-") {
                std::io::stdin().take(1 << 20).read_to_end(&mut bytes)
            } else {
                std::fs::File::open(p).and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
            };
            read.map_err(|e| RuntimeError::InvalidArgument(format!("resources {}: {e}", p.display())))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| RuntimeError::InvalidArgument(format!("resources: {e}")))?
        }
        None => json!({}),
    };
    let set = |r: &mut Value, group: &str, key: &str, v: Value| {
        if !r[group].is_object() {
            r[group] = json!({});
        }
        r[group][key] = v;
    };
    for (key, v) in [("limit", &a.memory), ("swap", &a.memory_swap), ("reservation", &a.memory_reservation)] {
        if let Some(v) = v {
            set(&mut r, "memory", key, json!(parse_bytes(v)?));
        }
    }
    if let Some(v) = a.cpu_period {
        set(&mut r, "cpu", "period", json!(v));
    }
    if let Some(v) = a.cpu_quota {
        set(&mut r, "cpu", "quota", json!(v));
    }
    if let Some(v) = a.cpu_share {
        set(&mut r, "cpu", "shares", json!(v));
    }
    if let Some(v) = &a.cpuset_cpus {
        set(&mut r, "cpu", "cpus", json!(v));
    }
    if let Some(v) = &a.cpuset_mems {
        set(&mut r, "cpu", "mems", json!(v));
    }
    if let Some(v) = a.pids_limit {
        set(&mut r, "pids", "limit", json!(v));
    }
    // Typed check here, for a clear error before anything is sent.
    serde_json::from_value::<oci_spec::runtime::LinuxResources>(r.clone())
        .map_err(|e| RuntimeError::InvalidArgument(format!("resources: {e}")))?;
    serde_json::to_vec(&r).map_err(|e| RuntimeError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("100").ok(), Some(100));
        assert_eq!(parse_bytes("64m").ok(), Some(64 << 20));
        assert_eq!(parse_bytes("1G").ok(), Some(1 << 30));
        assert_eq!(parse_bytes("-1").ok(), Some(-1));
        for bad in ["", "x", "-5", "12q", "1e400"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn update_builds_resources() {
        let u = Update {
            resources: None,
            memory: Some("64m".into()),
            memory_swap: None,
            memory_reservation: None,
            cpu_period: Some(100000),
            cpu_quota: Some(50000),
            cpu_share: None,
            cpuset_cpus: None,
            cpuset_mems: None,
            pids_limit: Some(10),
            id: "c".into(),
        };
        let v: Value = serde_json::from_slice(&update_resources(&u).expect("valid")).expect("json");
        assert_eq!(v["memory"]["limit"], 64 << 20);
        assert_eq!(v["cpu"]["quota"], 50000);
        assert_eq!(v["pids"]["limit"], 10);
    }
}
