//! ADD and DEL over a config list: each plugin gets its config object with the list's `name`
//! and `cniVersion`, the previous result as `prevResult`, and the port mappings in
//! `runtimeConfig` if it declares that capability. ADD goes in order and undoes itself with a
//! DEL when a plugin fails; DEL goes in reverse order with ADD's result.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{json, Value};

use super::conf::{NetConfList, PluginConf};
use super::plugin::{CallEnv, Plugins};
use super::{CniError, Command, PortMapping};

/// What husk reads of a result: the interfaces and addresses (the whole JSON is kept as well,
/// to be the next plugin's and DEL's `prevResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The namespace it is in; empty for a host-side interface (a bridge, a veth's host end).
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

impl CniResult {
    /// Checks a plugin's result (what is read of it; other fields pass through untouched).
    pub fn parse(raw: Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Ip {
            address: String,
            #[serde(default)]
            gateway: Option<IpAddr>,
            #[serde(default)]
            interface: Option<usize>,
        }
        #[derive(Deserialize)]
        struct Shape {
            #[serde(default)]
            interfaces: Vec<Interface>,
            #[serde(default)]
            ips: Vec<Ip>,
        }
        let shape = Shape::deserialize(&raw).map_err(|e| e.to_string())?;
        let mut ips = Vec::with_capacity(shape.ips.len());
        for ip in shape.ips {
            let (addr, prefix) = ip
                .address
                .split_once('/')
                .ok_or_else(|| format!("address {:?} has no prefix", ip.address))?;
            let address: IpAddr = addr.parse().map_err(|_| format!("bad address {:?}", ip.address))?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let prefix_len = prefix.parse::<u8>().ok().filter(|p| *p <= max);
            let prefix_len = prefix_len.ok_or_else(|| format!("bad prefix in {:?}", ip.address))?;
            if ip.interface.is_some_and(|i| i >= shape.interfaces.len()) {
                return Err(format!("address {:?} names an interface that is not listed", ip.address));
            }
            ips.push(IpConfig { address, prefix_len, gateway: ip.gateway, interface: ip.interface });
        }
        Ok(Self { interfaces: shape.interfaces, ips, raw })
    }

    /// The addresses of the interface named `ifname` in the container's namespace.
    pub fn addresses_of(&self, ifname: &str) -> Vec<(IpAddr, u8)> {
        self.ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .and_then(|i| self.interfaces.get(i))
                    .is_some_and(|i| i.name == ifname && !i.sandbox.is_empty())
            })
            .map(|ip| (ip.address, ip.prefix_len))
            .collect()
    }
}

/// One ADD or DEL of a container on a network.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub env: CallEnv<'a>,
    pub port_mappings: &'a [PortMapping],
}

/// A plugin's stdin: its config with the list's name and version, `prevResult`, and
/// `runtimeConfig` holding only what its capabilities ask for.
pub fn plugin_stdin(
    list: &NetConfList,
    p: &PluginConf,
    prev: Option<&Value>,
    ports: &[PortMapping],
) -> Vec<u8> {
    let mut conf = p.conf.clone();
    conf.insert("name".into(), json!(list.name));
    conf.insert("cniVersion".into(), json!(list.cni_version));
    conf.remove("prevResult");
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    conf.remove("runtimeConfig");
    if p.port_mappings {
        conf.insert("runtimeConfig".into(), json!({ "portMappings": ports }));
    }
    serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
}

impl Plugins {
    /// ADD: every plugin in order, each given the one before's result. When one fails, DEL
    /// undoes what the others did before the error is returned ([`CniError::AddNotUndone`]
    /// when that DEL fails too).
    pub async fn add(&self, list: &NetConfList, inv: &Invocation<'_>) -> Result<CniResult, CniError> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let stdin = plugin_stdin(list, p, prev.as_ref(), inv.port_mappings);
            let step = match self.call(&p.kind, Command::Add, &inv.env, &stdin).await {
                Ok(v) => CniResult::parse(v).map_err(|reason| CniError::BadResult {
                    plugin: p.kind.clone(),
                    command: Command::Add,
                    reason,
                }),
                Err(e) => Err(e),
            };
            match step {
                Ok(r) => prev = Some(r.raw),
                Err(e) => {
                    return match self.del(list, inv, prev.as_ref()).await {
                        Ok(()) => Err(e),
                        Err(d) => Err(CniError::AddNotUndone { add: Box::new(e), del: Box::new(d) }),
                    };
                }
            }
        }
        let raw = prev.unwrap_or(Value::Null);
        CniResult::parse(raw).map_err(|reason| CniError::BadResult {
            plugin: list.plugins.last().map(|p| p.kind.clone()).unwrap_or_default(),
            command: Command::Add,
            reason,
        })
    }

    /// DEL: every plugin in reverse order with ADD's result (`None` after an ADD that never
    /// finished). All of them run even when one fails, so one broken plugin does not keep the
    /// others' addresses and rules; the first failure is returned. Plugins make DEL idempotent,
    /// so running it again after a failure is safe.
    pub async fn del(
        &self,
        list: &NetConfList,
        inv: &Invocation<'_>,
        result: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first = None;
        for p in list.plugins.iter().rev() {
            let stdin = plugin_stdin(list, p, result, inv.port_mappings);
            if let Err(e) = self.call(&p.kind, Command::Del, &inv.env, &stdin).await {
                // The first failure is returned; later ones would otherwise go unseen.
                match first {
                    None => first = Some(e),
                    Some(_) => tracing::warn!("network {}: {e}", list.name),
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::cni::testing::{FakePlugins, RESULT};

    fn list(kinds: &[(&str, bool)]) -> NetConfList {
        let plugins: Vec<Value> = kinds
            .iter()
            .map(|(k, ports)| {
                if *ports {
                    json!({"type": k, "capabilities": {"portMappings": true}, "runtimeConfig": {"stale": 1}})
                } else {
                    json!({"type": k, "extra": k})
                }
            })
            .collect();
        NetConfList::from_value(
            json!({"cniVersion": "1.0.0", "name": "testnet", "plugins": plugins}),
            Path::new("t"),
        )
        .expect("list")
    }

    fn inv<'a>(ports: &'a [PortMapping]) -> Invocation<'a> {
        Invocation {
            env: CallEnv { container_id: "run-1", netns: Some(Path::new("/run/netns/x")), ifname: "eth0" },
            port_mappings: ports,
        }
    }

    #[tokio::test]
    async fn add_chains_results_and_del_goes_backwards_with_adds_result() {
        let f = FakePlugins::new("chain");
        f.plugin("first", &format!("echo '{RESULT}'"));
        // portmap-like: passes prevResult through.
        f.plugin("second", &format!("echo '{RESULT}'"));
        let ports: Vec<PortMapping> = vec!["8080:80".parse().expect("port")];
        let l = list(&[("first", false), ("second", true)]);
        let r = f.plugins().add(&l, &inv(&ports)).await.expect("add");
        assert_eq!(r.addresses_of("eth0"), vec![("10.77.0.5".parse().expect("ip"), 16)]);
        assert!(r.addresses_of("husk0").is_empty());
        let calls = f.calls();
        assert_eq!(calls.len(), 2);
        let path = format!("{}:{}", f.dir.join("none").display(), f.dir.display());
        assert_eq!(calls[0].0, format!("first ADD id=run-1 netns=/run/netns/x if=eth0 path={path}"));
        let first = &calls[0].1;
        assert_eq!((first["name"].as_str(), first["cniVersion"].as_str()), (Some("testnet"), Some("1.0.0")));
        assert_eq!(first["extra"], "first");
        assert!(first.get("prevResult").is_none() && first.get("runtimeConfig").is_none());
        let second = &calls[1].1;
        assert_eq!(second["prevResult"], serde_json::from_str::<Value>(RESULT).expect("json"));
        // Only the capability's key, with husk's values (not the file's stale ones).
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );

        std::fs::remove_file(f.dir.join("calls.log")).expect("rm log");
        f.plugins().del(&l, &inv(&ports), Some(&r.raw)).await.expect("del");
        let calls = f.calls();
        let order: Vec<&str> = calls.iter().map(|c| c.0.split(' ').take(2).last().unwrap_or("")).collect();
        assert_eq!(order, ["DEL", "DEL"]);
        assert!(calls[0].0.starts_with("second DEL") && calls[1].0.starts_with("first DEL"), "{calls:?}");
        for (_, stdin) in &calls {
            assert_eq!(stdin["prevResult"], r.raw);
        }
        assert_eq!(calls[0].1["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
    }

    #[tokio::test]
    async fn a_failed_add_is_undone_and_names_the_plugin() {
        let f = FakePlugins::new("fail");
        f.plugin("good", &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}'; exit 0"));
        f.plugin(
            "bad",
            "[ \"$CNI_COMMAND\" = DEL ] && exit 0\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"no more addresses\",\"details\":\"range full\"}'; exit 1",
        );
        let l = list(&[("good", false), ("bad", false)]);
        let e = f.plugins().add(&l, &inv(&[])).await.expect_err("add fails");
        match &e {
            CniError::Plugin { plugin, command, code, msg, details } => {
                assert_eq!((plugin.as_str(), *command, *code), ("bad", Command::Add, 11));
                assert_eq!((msg.as_str(), details.as_str()), ("no more addresses", "range full"));
            }
            e => panic!("wrong error {e:?}"),
        }
        assert!(
            e.to_string().contains("CNI plugin bad (ADD) failed with code 11: no more addresses: range full"),
            "{e}"
        );
        let calls = |f: &FakePlugins| -> Vec<String> {
            f.calls().into_iter().map(|c| c.0.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
        };
        // ADD good, ADD bad, then DEL of the whole list backwards.
        assert_eq!(calls(&f), ["good ADD", "bad ADD", "bad DEL", "good DEL"]);
        // The undo's prevResult is what ADD got to.
        assert_eq!(f.calls()[2].1["prevResult"], serde_json::from_str::<Value>(RESULT).expect("json"));

        // An undo that fails (a plugin is missing) says so; the other plugins' DEL still runs.
        std::fs::remove_file(f.dir.join("calls.log")).expect("rm log");
        let l = list(&[("good", false), ("bad", false), ("never", false)]);
        let e = f.plugins().add(&l, &inv(&[])).await.expect_err("add fails");
        match &e {
            CniError::AddNotUndone { add, del } => {
                assert!(matches!(**add, CniError::Plugin { code: 11, .. }), "{add}");
                assert!(matches!(**del, CniError::PluginNotFound { .. }), "{del}");
            }
            e => panic!("wrong error {e:?}"),
        }
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(calls(&f), ["good ADD", "bad ADD", "bad DEL", "good DEL"]);
    }

    #[tokio::test]
    async fn plugin_output_and_time_are_bounded_and_errors_are_typed() {
        let f = FakePlugins::new("bounds");
        let env = CallEnv { container_id: "c", netns: None, ifname: "eth0" };
        f.plugin("chatty", "head -c 100000 /dev/zero | tr '\\0' x");
        let e = f.plugins().call("chatty", Command::Add, &env, b"{}").await.expect_err("too big");
        assert!(matches!(e, CniError::OutputTooLarge { limit: 4096, .. }), "{e}");
        f.plugin("slow", "sleep 30");
        let mut p = f.plugins();
        p.timeout = Duration::from_millis(300);
        let t = std::time::Instant::now();
        let e = p.call("slow", Command::Del, &env, b"{}").await.expect_err("timeout");
        assert!(matches!(e, CniError::Timeout { .. }) && t.elapsed() < Duration::from_secs(5), "{e}");
        f.plugin("crash", "echo oops >&2; exit 3");
        let e = f.plugins().call("crash", Command::Add, &env, b"{}").await.expect_err("fails").to_string();
        assert!(e.contains("crash (ADD) failed") && e.contains("oops"), "{e}");
        f.plugin("garbage", "echo '[1]'");
        let e = f.plugins().call("garbage", Command::Add, &env, b"{}").await.expect_err("not an object");
        assert!(matches!(e, CniError::BadResult { .. }), "{e}");
        let e = f.plugins().call("absent", Command::Add, &env, b"{}").await.expect_err("missing").to_string();
        assert!(e.contains("\"absent\" not found in"), "{e}");
        // DEL without a namespace leaves CNI_NETNS unset.
        f.plugin("quiet", "exit 0");
        f.plugins().call("quiet", Command::Del, &env, b"{}").await.expect("del");
        assert!(f.calls().last().is_some_and(|c| c.0.contains("netns=unset")), "{:?}", f.calls());
    }

    #[test]
    fn results_are_checked() {
        let ok: Value = serde_json::from_str(RESULT).expect("json");
        assert!(CniResult::parse(ok).is_ok());
        for bad in [
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "nope/8"}]}),
            json!({"ips": [{"address": "10.0.0.1/8", "interface": 0}]}),
            json!({"interfaces": "x"}),
        ] {
            assert!(CniResult::parse(bad.clone()).is_err(), "{bad}");
        }
        assert!(CniResult::parse(json!({"cniVersion": "1.0.0"})).is_ok());
    }
}
