//! A sandbox on a CNI network: a namespace husk owns (`<root>/netns/<sid>`), CNI ADD in it,
//! and the record of it all (`<root>/sandboxes/<sid>/cni.json`), written before anything is
//! made so that DEL runs however the sandbox ends: its delete, a failed create's rollback, or
//! `husk delete --force` after the caller was killed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chain::Invocation;
use super::conf::{self, NetConfList, Network};
use super::plugin::{CallEnv, Plugins};
use super::{ports, CniError, CniResult, PortMapping};
use crate::config::Config;
use crate::error::RuntimeError;
use crate::netns;
use crate::state::StateDir;

/// The sandbox's interface name in its namespace (what the guest's interface is named too).
pub const IFNAME: &str = "eth0";

/// What a sandbox asks of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRequest {
    pub network: Network,
    pub port_mappings: Vec<PortMapping>,
}

/// Everything DEL needs, as ADD was given it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub netns: PathBuf,
    /// The config list as used (a later edit of the file must not change what DEL undoes).
    pub conflist: Value,
    pub container_id: String,
    pub ifname: String,
    pub port_mappings: Vec<PortMapping>,
    pub bin_dirs: Vec<PathBuf>,
    /// ADD's result once it succeeded; DEL's `prevResult`.
    #[serde(default)]
    pub result: Option<Value>,
}

/// A sandbox that ADD put on a network.
#[derive(Debug, Clone)]
pub struct Attached {
    /// For the spec's `network` namespace entry.
    pub netns: PathBuf,
    pub network: String,
    pub result: CniResult,
}

/// Puts sandbox `sid` (which must not exist yet) on the network `req` names: the config list
/// from `cfg`'s conf dir (husk's default one written first if the dir has none), a new
/// namespace, and ADD with the port mappings. On error nothing is left.
pub async fn attach(
    state: &StateDir,
    cfg: &Config,
    sid: &str,
    req: &NetRequest,
) -> Result<Attached, RuntimeError> {
    ports::check_unique(&req.port_mappings)?;
    let (dir, network) = (cfg.cni_conf_dir.clone(), req.network.clone());
    let (path, list) = tokio::task::spawn_blocking(move || {
        conf::ensure_default(&dir)?;
        conf::select(&dir, &network)
    })
    .await
    .map_err(|e| RuntimeError::Internal(format!("reading network configs: {e}")))??;
    let plugins = Plugins::new(cfg.cni_bin_dirs.clone());
    // Every plugin must be there before anything is made.
    for p in &list.plugins {
        plugins.find(&p.kind)?;
    }
    tracing::debug!("sandbox {sid}: network {} from {}", list.name, path.display());

    let (lock, existing) = state.lock_sandbox_async(sid).await?;
    if existing.is_some() || state.read_cni(sid)?.is_some() {
        drop(lock);
        return Err(RuntimeError::WrongState(format!("sandbox {sid} already exists")));
    }
    let mut att = Attachment {
        netns: state.netns_path(sid),
        conflist: list.raw.clone(),
        container_id: sid.into(),
        ifname: IFNAME.into(),
        port_mappings: req.port_mappings.clone(),
        bin_dirs: plugins.bin_dirs.clone(),
        result: None,
    };
    // Whether something of ADD may be left that its own undo did not remove.
    let mut needs_del = false;
    let added = async {
        state.write_cni(sid, &att)?;
        let ns = att.netns.clone();
        tokio::task::spawn_blocking(move || netns::create(&ns))
            .await
            .map_err(|e| RuntimeError::Internal(format!("creating a network namespace: {e}")))??;
        let result = plugins.add(&list, &invocation(&att, true)).await;
        needs_del = matches!(result, Ok(_) | Err(CniError::AddNotUndone { .. }));
        let result = result?;
        att.result = Some(result.raw.clone());
        state.write_cni(sid, &att)?;
        Ok::<_, RuntimeError>(result)
    }
    .await;
    let e = match added {
        Ok(result) => return Ok(Attached { netns: att.netns, network: list.name, result }),
        Err(e) => e,
    };
    if needs_del {
        // DEL once more (plugins make it idempotent); if it fails too the record stays, so
        // `husk delete --force` tries again and `husk list` shows the sandbox meanwhile.
        if let Err(d) = detach(state, sid).await {
            tracing::warn!("sandbox {sid}: its network is left for a later delete: {d}");
            drop(lock);
            return Err(e);
        }
    } else if let Err(r) = netns::remove(&att.netns) {
        tracing::warn!("sandbox {sid}: {r}");
    }
    let _ = std::fs::remove_dir_all(state.sandbox_dir(sid));
    drop(lock);
    Err(e)
}

/// Takes sandbox `sid` off its network, if it is on one: DEL (in reverse, with ADD's result),
/// then the namespace, then the record. The caller holds the sandbox's lock and has powered its
/// VM off. On error the record stays, so a later delete tries again.
pub async fn detach(state: &StateDir, sid: &str) -> Result<(), RuntimeError> {
    let Some(att) = state.read_cni(sid)? else { return Ok(()) };
    let list = NetConfList::from_value(att.conflist.clone(), &state.cni_record_path(sid))?;
    let plugins = Plugins::new(att.bin_dirs.clone());
    // A namespace that is gone (or was never made) is left out, as the spec allows for DEL.
    let present = netns::is_netns(&att.netns);
    plugins.del(&list, &invocation(&att, present), att.result.as_ref()).await?;
    netns::remove(&att.netns)?;
    state.remove_cni(sid)?;
    tracing::debug!("sandbox {sid}: off network {}", list.name);
    Ok(())
}

fn invocation(att: &Attachment, with_netns: bool) -> Invocation<'_> {
    Invocation {
        env: CallEnv {
            container_id: &att.container_id,
            netns: with_netns.then_some(att.netns.as_path()),
            ifname: &att.ifname,
        },
        port_mappings: &att.port_mappings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(cmd: &str) -> String {
        let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The real plugins (Debian's containernetworking-plugins) through attach and detach:
    /// root only, and meant to run in a network namespace of its own so the host's bridges and
    /// iptables are untouched: `unshare -n <test binary> --ignored real_plugins`.
    #[tokio::test]
    #[ignore]
    async fn real_plugins_attach_and_detach() {
        let dir = std::env::temp_dir().join(format!("husk-cni-real-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(dir.join("state")).expect("state");
        let mut cfg = Config::load().expect("config");
        cfg.cni_conf_dir = dir.join("net.d");
        let mut list = conf::default_conflist();
        list["name"] = "husk-real-test".into();
        list["plugins"][0]["bridge"] = "husk-rt0".into();
        list["plugins"][0]["ipam"]["ranges"] =
            serde_json::json!([[{"subnet": "10.199.77.0/24", "gateway": "10.199.77.1"}]]);
        std::fs::create_dir_all(&cfg.cni_conf_dir).expect("mkdir");
        std::fs::write(cfg.cni_conf_dir.join("50-real.conflist"), list.to_string()).expect("write");
        let req = NetRequest {
            network: Network::Named("husk-real-test".into()),
            port_mappings: vec!["18080:80".parse().expect("port")],
        };
        let sid = "run-realtest";
        let att = attach(&state, &cfg, sid, &req).await.expect("attach");
        let addrs = att.result.addresses_of(IFNAME);
        assert_eq!(addrs.len(), 1, "{:?}", att.result);
        let ip = addrs[0].0.to_string();
        assert!(ip.starts_with("10.199.77."), "{ip}");
        let inside = sh(&format!("nsenter --net={} ip -o addr show eth0", att.netns.display()));
        assert!(inside.contains(&ip), "{inside}");
        let routes = sh(&format!("nsenter --net={} ip route", att.netns.display()));
        assert!(routes.contains("default via 10.199.77.1"), "{routes}");
        let lease = std::path::Path::new("/var/lib/cni/networks/husk-real-test").join(&ip);
        assert!(lease.exists());
        let nat = sh("iptables -t nat -S");
        assert!(nat.contains(sid) && nat.contains("18080"), "{nat}");
        assert!(state.read_cni(sid).expect("read").and_then(|a| a.result).is_some());
        // A second attach of the same sandbox is refused and leaves the first alone.
        assert!(attach(&state, &cfg, sid, &req).await.is_err());
        assert!(netns::is_netns(&att.netns));

        detach(&state, sid).await.expect("detach");
        assert!(!lease.exists());
        assert!(!att.netns.exists());
        let nat = sh("iptables -t nat -S");
        assert!(!nat.contains(sid), "{nat}");
        assert!(state.read_cni(sid).expect("read").is_none());
        detach(&state, sid).await.expect("detach again");

        // A plugin that fails ADD: what the ones before it did is undone, nothing is left.
        let mut bad = list.clone();
        bad["plugins"][1] = serde_json::json!({"type": "tuning", "sysctl": {"net.husk.no-such-key": "1"}});
        std::fs::write(cfg.cni_conf_dir.join("50-real.conflist"), bad.to_string()).expect("write");
        let e = attach(&state, &cfg, sid, &req).await.expect_err("tuning fails").to_string();
        assert!(e.contains("CNI plugin tuning (ADD) failed"), "{e}");
        let leases = sh("ls /var/lib/cni/networks/husk-real-test");
        assert!(!leases.contains("10.199.77."), "{leases}");
        assert!(!state.netns_path(sid).exists());
        assert!(!state.sandbox_dir(sid).exists());
        let _ = std::fs::remove_dir_all("/var/lib/cni/networks/husk-real-test");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
