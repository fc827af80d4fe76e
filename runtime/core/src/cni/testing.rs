//! Fake CNI plugins for unit tests: shell scripts that log each call's environment and stdin.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::Plugins;

/// A temp dir of fake plugins that log each call (`<kind> <command> <env...>` and stdin)
/// to `calls.log`.
pub(crate) struct FakePlugins {
    pub dir: PathBuf,
}

impl FakePlugins {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self { dir }
    }

    /// A plugin that logs its call and runs `body` (which prints its answer).
    pub fn plugin(&self, kind: &str, body: &str) {
        let log = self.dir.join("calls.log");
        let script = format!(
            "#!/bin/sh\nin=$(cat)\nprintf '%s %s id=%s netns=%s if=%s path=%s\\n%s\\n' {kind} \"$CNI_COMMAND\" \
             \"$CNI_CONTAINERID\" \"${{CNI_NETNS-unset}}\" \"$CNI_IFNAME\" \"$CNI_PATH\" \"$in\" >> {log}\n{body}\n",
            log = log.display()
        );
        let p = self.dir.join(kind);
        std::fs::write(&p, script).expect("write plugin");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Each call as its log line (`<kind> <command> id=.. netns=.. if=.. path=..`) and stdin JSON.
    pub fn calls(&self) -> Vec<(String, Value)> {
        let log = std::fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines
            .chunks(2)
            .map(|c| {
                (
                    c[0].to_string(),
                    serde_json::from_str(c.get(1).copied().unwrap_or("")).unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    pub fn plugins(&self) -> Plugins {
        Plugins {
            bin_dirs: vec![self.dir.join("none"), self.dir.clone()],
            timeout: Duration::from_secs(10),
            output_limit: 4096,
        }
    }
}

impl Drop for FakePlugins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A result with one container interface, as bridge would print it.
pub(crate) const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"husk0"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","sandbox":"/ns"}],"ips":[{"address":"10.77.0.5/16","gateway":"10.77.0.1","interface":1}]}"#;
