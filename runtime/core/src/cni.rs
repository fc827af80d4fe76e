//! A small CNI client (spec 1.0) for `husk run`: network config lists ([`conf`]), port
//! mappings ([`ports`]), plugin calls ([`plugin`]), ADD and DEL over a list ([`chain`]), and a
//! sandbox's attachment, recorded before its VM boots so DEL runs however the sandbox ends
//! ([`sandbox`]).

pub mod chain;
pub mod conf;
pub mod plugin;
pub mod ports;
pub mod sandbox;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt;
use std::path::PathBuf;

pub use chain::CniResult;
pub use conf::{NetConfList, Network};
pub use plugin::Plugins;
pub use ports::{PortMapping, Protocol};
pub use sandbox::{attach, detach, Attached, Attachment, NetRequest};

/// The two CNI commands husk runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("network config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("network config {}: {source}", path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no network config in {} (no *.conflist)", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("no network named {name:?} in {} (networks there: {found})", dir.display())]
    NoSuchNetwork { name: String, dir: PathBuf, found: String },
    #[error(
        "invalid network name {0:?}: letters, digits, '_', '.' and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("port mapping {spec:?}: {reason}")]
    BadPortMapping { spec: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "CNI plugin {plugin:?} not found in {dirs} (install the CNI plugins, e.g. Debian's \
         containernetworking-plugins, or set cni_bin_dirs in husk's config)"
    )]
    PluginNotFound { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} ({command}): running {}: {source}", path.display())]
    Exec {
        plugin: String,
        command: Command,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The plugin's own error object (`code`, `msg`, `details`).
    #[error("CNI plugin {plugin} ({command}) failed with code {code}: {msg}{}", details_suffix(details))]
    Plugin { plugin: String, command: Command, code: u64, msg: String, details: String },
    /// A plugin that failed without an error object.
    #[error("CNI plugin {plugin} ({command}) failed ({status}){}", details_suffix(stderr))]
    Failed { plugin: String, command: Command, status: String, stderr: String },
    #[error("CNI plugin {plugin} ({command}) did not finish within {secs} s and was killed")]
    Timeout { plugin: String, command: Command, secs: u64 },
    #[error("CNI plugin {plugin} ({command}) wrote more than {limit} bytes of output")]
    OutputTooLarge { plugin: String, command: Command, limit: usize },
    #[error("CNI plugin {plugin} ({command}) returned a bad result: {reason}")]
    BadResult { plugin: String, command: Command, reason: String },
    /// ADD failed and the DEL that was to undo it failed too: something may be left.
    #[error("{add}; undoing it failed too: {del}")]
    AddNotUndone {
        #[source]
        add: Box<CniError>,
        del: Box<CniError>,
    },
}

fn details_suffix(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}
