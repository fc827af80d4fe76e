//! The few /proc facts the agent reports.

pub fn mem_total_bytes() -> Option<u64> {
    meminfo_kib("/proc/meminfo", "MemTotal:").map(|k| k * 1024)
}

pub fn self_rss_bytes() -> Option<u64> {
    meminfo_kib("/proc/self/status", "VmRSS:").map(|k| k * 1024)
}

fn meminfo_kib(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// ps-style facts about `pid`, or None if it is gone.
pub fn process_info(pid: i32) -> Option<husk_proto::ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields start after the last ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(').map(|(_, c)| c.to_string()).unwrap_or_default();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_string();
    let ppid = fields.next()?.parse().ok()?;
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let command = if cmdline.is_empty() {
        format!("[{comm}]")
    } else {
        cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    };
    Some(husk_proto::ProcessInfo { pid: pid as u32, ppid, uid, state, command })
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process() {
        let me = super::process_info(std::process::id() as i32).expect("self");
        assert_eq!(me.pid, std::process::id());
        assert!(!me.command.is_empty());
        assert!(super::self_rss_bytes().unwrap_or(0) > 0);
    }
}
