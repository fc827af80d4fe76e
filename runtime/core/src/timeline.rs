//! A sandbox's start budget: named points of its life (CLI start, locks, VMM spawn, the VMM's
//! KVM setup and first vCPU entry, the guest's handover to init and agent readiness, each
//! agent request, container start, exit, teardown) on one host clock, for `husk run --timings`
//! and bench/runtime.sh.
//!
//! The clock is CLOCK_MONOTONIC: the one `std::time::Instant` and tokio read, so any instant the
//! runtime already keeps converts exactly, and one every process on the host shares (the VMM,
//! in namespaces of its own but not a time namespace, stamps its points with it too). It stops
//! during host suspend, which no start budget spans.
//!
//! Off (the default) a mark costs one relaxed atomic load: the collection is process-global so
//! no signature in the lifecycle changes for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Marks kept at most: a runaway loop cannot grow the list without bound.
pub const MAX_MARKS: usize = 256;

static ENABLED: AtomicBool = AtomicBool::new(false);
static START_NS: AtomicU64 = AtomicU64::new(0);
static MARKS: Mutex<Vec<Mark>> = Mutex::new(Vec::new());
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// One point: what had just happened, and when (CLOCK_MONOTONIC, ns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub at_ns: u64,
}

/// Now on CLOCK_MONOTONIC, in ns.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// A `std::time::Instant` on the same clock, in ns (Instant is CLOCK_MONOTONIC on Linux).
pub fn instant_ns(i: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let n = now_ns();
    match now.checked_duration_since(i) {
        Some(ago) => n.saturating_sub(ago.as_nanos() as u64),
        None => n.saturating_add(i.duration_since(now).as_nanos() as u64),
    }
}

/// Notes when the process started; the first thing `main` does, whether timings are on or not.
pub fn process_started() {
    START_NS.store(now_ns(), Ordering::Relaxed);
}

/// Turns collection on, with the process start as its first mark.
pub fn enable() {
    let start = match START_NS.load(Ordering::Relaxed) {
        0 => now_ns(),
        s => s,
    };
    let mut m = MARKS.lock().unwrap_or_else(|p| p.into_inner());
    m.clear();
    m.push(Mark { name: "cli start".into(), at_ns: start });
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records that `name` just happened.
pub fn mark(name: &str) {
    if enabled() {
        mark_at(name, now_ns());
    }
}

/// Records a point measured elsewhere (the VMM's, the guest's converted), on this clock.
pub fn mark_at(name: &str, at_ns: u64) {
    if !enabled() {
        return;
    }
    let mut m = MARKS.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() < MAX_MARKS {
        m.push(Mark { name: name.to_string(), at_ns });
    }
}

/// A line printed under the breakdown (what a clock other than the host's said).
pub fn note(line: String) {
    if enabled() {
        let mut n = NOTES.lock().unwrap_or_else(|p| p.into_inner());
        if n.len() < 16 {
            n.push(line);
        }
    }
}

/// The marks so far, in time order (points from other clocks arrive late).
pub fn marks() -> Vec<Mark> {
    let mut m = MARKS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    m.sort_by_key(|k| k.at_ns);
    m
}

/// The breakdown `husk run --timings` prints: each point's time since the first and since the
/// one before, in ms. Lines are `  <phase>  <at>  <delta>` so that a script can take the last
/// two words as numbers.
pub fn render(marks: &[Mark]) -> String {
    let mut out =
        String::from("husk timings (CLOCK_MONOTONIC; ms since CLI start, ms since the line before):\n");
    let Some(first) = marks.first() else { return out };
    let width = marks.iter().map(|m| m.name.chars().count()).max().unwrap_or(0);
    let mut prev = first.at_ns;
    for m in marks {
        let at = m.at_ns.saturating_sub(first.at_ns) as f64 / 1e6;
        let delta = m.at_ns.saturating_sub(prev) as f64 / 1e6;
        out.push_str(&format!("  {:<width$}  {at:>9.1}  {delta:>8.1}\n", m.name));
        prev = m.at_ns;
    }
    out
}

/// Parses [`render`]'s phase lines back: (phase, at ms, delta ms). Other lines are skipped.
pub fn parse(text: &str) -> Vec<(String, f64, f64)> {
    text.lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| {
            let mut words = l.split_whitespace().rev();
            let delta = words.next()?.parse().ok()?;
            let at = words.next()?.parse().ok()?;
            let name: Vec<&str> = words.collect();
            (!name.is_empty()).then(|| (name.into_iter().rev().collect::<Vec<_>>().join(" "), at, delta))
        })
        .collect()
}

/// A point the VMM reports on its log (`husk-vmm --timings`): `husk-vmm-timing: NAME NS`.
pub const VMM_PREFIX: &str = "husk-vmm-timing: ";

/// The VMM's points in its log, validated: at most twelve, names of a few plain words, times
/// within `[after_ns, before_ns]` (the VMM cannot have stamped anything outside its own run).
pub fn vmm_points(log: &str, after_ns: u64, before_ns: u64) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|l| l.strip_prefix(VMM_PREFIX))
        .filter_map(|rest| {
            let (name, ns) = rest.trim().rsplit_once(' ')?;
            let ns: u64 = ns.parse().ok()?;
            let plain = !name.is_empty()
                && name.len() <= 40
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-');
            (plain && (after_ns..=before_ns).contains(&ns)).then(|| (format!("vmm: {name}"), ns))
        })
        .take(12)
        .collect()
}

/// The guest's boot points as the agent reports them (guest CLOCK_BOOTTIME, ns), put on the
/// host clock. The guest's clock is not the host's: its zero is the guest kernel's own and its
/// rate is whatever the kernel calibrated, so the points are placed by their distance back from
/// one shared instant, the agent's answer (`guest_now_ns` then, received by the host at
/// `host_reply_ns`), which bounds the error by the reply's one-way latency and by the guest
/// clock's rate error over the interval, not over the whole boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestClock {
    /// CLOCK_BOOTTIME when the agent started as init: the kernel's boot as the guest counts it.
    pub init_started_ns: u64,
    pub agent_ready_ns: u64,
    pub guest_now_ns: u64,
    /// CLOCK_MONOTONIC on the host when the answer carrying `guest_now_ns` arrived.
    pub host_reply_ns: u64,
}

impl GuestClock {
    /// A guest time on the host clock; None for a time the guest says is after its answer
    /// (nothing to trust).
    pub fn to_host(&self, guest_ns: u64) -> Option<u64> {
        let back = self.guest_now_ns.checked_sub(guest_ns)?;
        self.host_reply_ns.checked_sub(back)
    }

    /// Marks the guest's points: its kernel's handover to init and its agent's readiness. A
    /// point placed before `not_before_ns` (the first vCPU entry: the guest cannot have run
    /// earlier) is the guest clock's rate error, and is put there instead.
    pub fn mark(&self, not_before_ns: u64) {
        if self.init_started_ns == 0 {
            return;
        }
        if let Some(t) = self.to_host(self.init_started_ns) {
            mark_at("guest: kernel hands over to init (agent starts)", t.max(not_before_ns));
        }
        if let Some(t) = self.to_host(self.agent_ready_ns) {
            mark_at("guest: agent ready", t.max(not_before_ns));
        }
        note(format!(
            "guest CLOCK_BOOTTIME: {:.1} ms at init, {:.1} ms at agent ready, {:.1} ms at its answer",
            self.init_started_ns as f64 / 1e6,
            self.agent_ready_ns as f64 / 1e6,
            self.guest_now_ns as f64 / 1e6
        ));
    }
}

/// Prints the breakdown on stderr if collection is on.
pub fn print_if_enabled() {
    if enabled() {
        let mut text = render(&marks());
        for n in NOTES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            text.push_str(n);
            text.push('\n');
        }
        eprint!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse_round_trip() {
        let marks = vec![
            Mark { name: "cli start".into(), at_ns: 1_000_000_000 },
            Mark { name: "vmm spawned".into(), at_ns: 1_012_500_000 },
            Mark { name: "vmm: first vCPU entry".into(), at_ns: 1_100_000_000 },
        ];
        let text = render(&marks);
        let back = parse(&text);
        assert_eq!(back.len(), 3, "{text}");
        assert_eq!(back[0], ("cli start".to_string(), 0.0, 0.0));
        assert_eq!(back[1], ("vmm spawned".to_string(), 12.5, 12.5));
        assert_eq!(back[2], ("vmm: first vCPU entry".to_string(), 100.0, 87.5));
        assert!(parse("husk: error\nnot a line\n  x y\n").is_empty());
        assert_eq!(render(&[]).lines().count(), 1);
    }

    #[test]
    fn vmm_points_are_validated() {
        let log = "husk-vmm-timing: started 100\n\
                   husk-vmm: something else\n\
                   husk-vmm-timing: KVM set up 150\n\
                   husk-vmm-timing: first vCPU entry 9999\n\
                   husk-vmm-timing: bad/name 120\n\
                   husk-vmm-timing: nonumber x\n\
                   husk-vmm-timing: 130\n";
        let p = vmm_points(log, 50, 1000);
        assert_eq!(p, vec![("vmm: started".to_string(), 100), ("vmm: KVM set up".to_string(), 150)]);
        let flood = "husk-vmm-timing: x 100\n".repeat(100);
        assert_eq!(vmm_points(&flood, 0, 1000).len(), 12);
    }

    #[test]
    fn guest_points_are_placed_back_from_the_answer() {
        let g = GuestClock {
            init_started_ns: 2_000_000_000,
            agent_ready_ns: 2_050_000_000,
            guest_now_ns: 2_100_000_000,
            host_reply_ns: 10_000_000_000,
        };
        assert_eq!(g.to_host(g.init_started_ns), Some(9_900_000_000));
        assert_eq!(g.to_host(g.agent_ready_ns), Some(9_950_000_000));
        // A guest time after its own answer, or further back than the host clock goes: none.
        assert_eq!(g.to_host(3_000_000_000), None);
        let far = GuestClock { guest_now_ns: u64::MAX, ..g };
        assert_eq!(far.to_host(0), None);
    }

    #[test]
    fn marks_collect_only_when_enabled_and_come_out_ordered() {
        // The only test touching the global collection (tests run in parallel).
        mark("before");
        assert!(!enabled());
        process_started();
        enable();
        let t = now_ns();
        mark("b");
        mark_at("a (earlier, from another clock)", t - 1);
        for _ in 0..MAX_MARKS + 10 {
            mark("flood");
        }
        let m = marks();
        assert_eq!(m.len(), MAX_MARKS);
        assert_eq!(m[0].name, "cli start");
        assert_eq!(m[1].name, "a (earlier, from another clock)");
        assert_eq!(m[2].name, "b");
        assert!(m.windows(2).all(|w| w[0].at_ns <= w[1].at_ns));
        assert!(!m.iter().any(|k| k.name == "before"));
    }

    #[test]
    fn instants_convert_onto_the_clock() {
        let before = now_ns();
        let i = std::time::Instant::now();
        let c = instant_ns(i);
        let after = now_ns();
        assert!(before <= c + 1_000 && c <= after, "{before} {c} {after}");
    }
}
