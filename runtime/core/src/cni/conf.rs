//! Network config lists (`*.conflist`): parsing and checking, choosing one from the conf dir,
//! and the default network husk writes when the dir has none.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::CniError;

/// The spec versions whose results husk reads (their `interfaces`/`ips` are the same shape).
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// A config list is a small file; anything bigger is not one.
const MAX_CONF_BYTES: u64 = 1 << 20;
const MAX_PLUGINS: usize = 32;
/// The file husk writes when the conf dir has no config list.
pub const DEFAULT_CONFLIST: &str = "10-husk.conflist";
pub const DEFAULT_NETWORK: &str = "husk";
pub const DEFAULT_BRIDGE: &str = "husk0";
pub const DEFAULT_SUBNET: &str = "10.77.0.0/16";
pub const DEFAULT_GATEWAY: &str = "10.77.0.1";

/// Which network a sandbox joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// The first `*.conflist` of the conf dir, in lexical order.
    Default,
    /// The config list whose `name` this is.
    Named(String),
}

/// One plugin of a list: its config object as given, and what husk reads of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    /// The executable's name (`type`).
    pub kind: String,
    /// `capabilities.portMappings`: it gets the port mappings in `runtimeConfig`.
    pub port_mappings: bool,
    pub conf: Map<String, Value>,
}

/// A checked network config list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<PluginConf>,
    /// The whole JSON as given (what the sandbox records).
    pub raw: Value,
}

/// CNI's network name rule; the name also names host-local's lease directory.
pub fn check_name(name: &str) -> Result<(), CniError> {
    let mut b = name.bytes();
    let ok = b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && name.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(CniError::BadName(name.into()))
    }
}

impl NetConfList {
    /// Checks `raw` (read from `origin`, which errors name).
    pub fn from_value(raw: Value, origin: &Path) -> Result<Self, CniError> {
        let bad = |reason: String| CniError::Config { path: origin.into(), reason };
        let obj = raw.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let text = |k: &str| -> Result<String, CniError> {
            obj.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("no string {k:?}")))
        };
        let name = text("name")?;
        check_name(&name).map_err(|e| bad(e.to_string()))?;
        let cni_version = text("cniVersion")?;
        if !VERSIONS.contains(&cni_version.as_str()) {
            return Err(bad(format!("cniVersion {cni_version:?} is not one of {}", VERSIONS.join(", "))));
        }
        let list =
            obj.get("plugins").and_then(Value::as_array).ok_or_else(|| bad("no \"plugins\" list".into()))?;
        if list.is_empty() || list.len() > MAX_PLUGINS {
            return Err(bad(format!("\"plugins\" must hold 1-{MAX_PLUGINS} plugins")));
        }
        let mut plugins = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            let conf = p.as_object().ok_or_else(|| bad(format!("plugin {i} is not an object")))?;
            let kind = conf
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("plugin {i} has no string \"type\"")))?;
            // It is looked up as a file name in the bin dirs: nothing that leaves them.
            let plain = !kind.is_empty()
                && !kind.starts_with('.')
                && kind.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
            if !plain {
                return Err(bad(format!("plugin {i}: type {kind:?} is not a plugin file name")));
            }
            let port_mappings = match conf.get("capabilities") {
                None => false,
                Some(Value::Object(c)) => match c.get("portMappings") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(bad(format!("plugin {i}: capabilities.portMappings is not a boolean")))
                    }
                },
                Some(_) => return Err(bad(format!("plugin {i}: \"capabilities\" is not an object"))),
            };
            plugins.push(PluginConf { kind: kind.into(), port_mappings, conf: conf.clone() });
        }
        Ok(Self { name, cni_version, plugins, raw })
    }

    /// Reads and checks the config list at `path` (bounded: it is a small file).
    pub fn load(path: &Path) -> Result<Self, CniError> {
        let read_err = |source| CniError::ConfigRead { path: path.into(), source };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONF_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONF_BYTES {
            return Err(CniError::Config {
                path: path.into(),
                reason: format!("bigger than {MAX_CONF_BYTES} bytes"),
            });
        }
        let raw: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CniError::Config { path: path.into(), reason: e.to_string() })?;
        Self::from_value(raw, path)
    }
}

/// The `*.conflist` files of `dir`, in lexical order (none if the dir does not exist).
pub fn conflists(dir: &Path) -> Result<Vec<PathBuf>, CniError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CniError::Io { what: format!("reading {}", dir.display()), source }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The config list for `net` from `dir`: the first one for [`Network::Default`], else the one
/// whose `name` matches (config lists that do not parse are skipped with a warning then).
pub fn select(dir: &Path, net: &Network) -> Result<(PathBuf, NetConfList), CniError> {
    let files = conflists(dir)?;
    match net {
        Network::Default => {
            let first = files.into_iter().next().ok_or_else(|| CniError::NoConfig { dir: dir.into() })?;
            let list = NetConfList::load(&first)?;
            Ok((first, list))
        }
        Network::Named(name) => {
            check_name(name)?;
            let mut found = Vec::new();
            for f in files {
                match NetConfList::load(&f) {
                    Ok(l) if l.name == *name => return Ok((f, l)),
                    Ok(l) => found.push(l.name),
                    Err(e) => tracing::warn!("skipping {e}"),
                }
            }
            let found = if found.is_empty() { "none".to_string() } else { found.join(", ") };
            Err(CniError::NoSuchNetwork { name: name.clone(), dir: dir.into(), found })
        }
    }
}

/// husk's default network: bridge `husk0` as the gateway of 10.77.0.0/16, outbound NAT, and
/// published ports through `portmap`.
pub fn default_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": DEFAULT_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": DEFAULT_BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": DEFAULT_SUBNET, "gateway": DEFAULT_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
}

/// Writes [`default_conflist`] as `dir/10-husk.conflist` (atomically, the dir made if needed)
/// when `dir` has no config list.
pub fn ensure_default(dir: &Path) -> Result<(), CniError> {
    if !conflists(dir)?.is_empty() {
        return Ok(());
    }
    let io = |what: String| move |source| CniError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join(DEFAULT_CONFLIST);
    let text = serde_json::to_string_pretty(&default_conflist()).unwrap_or_default() + "\n";
    // A temporary name that is no `*.conflist`, renamed over: no reader sees half a file.
    let tmp = dir.join(format!(".{DEFAULT_CONFLIST}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("renaming {} to {}", tmp.display(), path.display())))?;
    tracing::info!("wrote the default network config {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-cni-conf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write(dir: &Path, file: &str, name: &str) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let v = json!({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": "bridge"}]});
        std::fs::write(dir.join(file), v.to_string()).expect("write");
    }

    #[test]
    fn the_default_is_the_first_conflist_and_a_name_picks_its_own() {
        let d = tmp("select");
        write(&d, "20-b.conflist", "beta");
        write(&d, "10-a.conflist", "alpha");
        write(&d, "05-x.conf", "ignored");
        std::fs::write(d.join("15-broken.conflist"), "{").expect("write");
        let (p, l) = select(&d, &Network::Default).expect("default");
        assert_eq!(
            (p.file_name().and_then(|n| n.to_str()), l.name.as_str()),
            (Some("10-a.conflist"), "alpha")
        );
        let (_, l) = select(&d, &Network::Named("beta".into())).expect("by name");
        assert_eq!(l.name, "beta");
        let e = select(&d, &Network::Named("gamma".into())).expect_err("missing").to_string();
        assert!(e.contains("\"gamma\"") && e.contains("alpha, beta"), "{e}");
        assert!(matches!(select(&d, &Network::Named("../x".into())), Err(CniError::BadName(_))));
        // A broken first config list is an error, not skipped.
        std::fs::write(d.join("01-broken.conflist"), "{").expect("write");
        assert!(matches!(select(&d, &Network::Default), Err(CniError::Config { .. })));
        let _ = std::fs::remove_dir_all(&d);
        assert!(matches!(select(&d, &Network::Default), Err(CniError::NoConfig { .. })));
    }

    #[test]
    fn config_lists_are_checked() {
        let ok = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": true}}
        ]});
        let l = NetConfList::from_value(ok.clone(), Path::new("x")).expect("valid");
        assert_eq!(
            l.plugins.iter().map(|p| (p.kind.as_str(), p.port_mappings)).collect::<Vec<_>>(),
            [("bridge", false), ("portmap", true)]
        );
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            NetConfList::from_value(o, Path::new("x"))
        };
        assert!(with("cniVersion", json!("9.9.9")).is_err());
        assert!(with("name", json!("")).is_err());
        assert!(with("name", json!("a/b")).is_err());
        assert!(with("plugins", json!([])).is_err());
        assert!(with("plugins", json!([{"type": "../../bin/sh"}])).is_err());
        assert!(with("plugins", json!([{"type": ".hidden"}])).is_err());
        assert!(with("plugins", json!([{"bridge": "x"}])).is_err());
        assert!(with("plugins", json!(["bridge"])).is_err());
        assert!(with("plugins", json!([{"type": "p", "capabilities": {"portMappings": "yes"}}])).is_err());
        assert!(NetConfList::from_value(json!([]), Path::new("x")).is_err());
    }

    #[test]
    fn the_default_network_is_written_once_and_is_what_husk_run_documents() {
        let d = tmp("default").join("net.d");
        ensure_default(&d).expect("write");
        let l = NetConfList::load(&d.join(DEFAULT_CONFLIST)).expect("valid");
        assert_eq!((l.name.as_str(), l.cni_version.as_str()), ("husk", "1.0.0"));
        let kinds: Vec<&str> = l.plugins.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["bridge", "portmap"]);
        let bridge = &l.plugins[0].conf;
        assert_eq!(bridge["bridge"], "husk0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], true);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0], json!({"subnet": "10.77.0.0/16", "gateway": "10.77.0.1"}));
        assert_eq!(bridge["ipam"]["routes"], json!([{"dst": "0.0.0.0/0"}]));
        assert!(l.plugins[1].port_mappings);
        assert_eq!(l.plugins[1].conf["snat"], true);
        // Only the config list is left, and an existing one is not replaced.
        let names: Vec<_> =
            std::fs::read_dir(&d).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from(DEFAULT_CONFLIST)]);
        std::fs::write(d.join(DEFAULT_CONFLIST), "{}").expect("write");
        ensure_default(&d).expect("kept");
        assert_eq!(std::fs::read_to_string(d.join(DEFAULT_CONFLIST)).expect("read"), "{}");
        let _ = std::fs::remove_dir_all(d.parent().expect("parent"));
    }
}
