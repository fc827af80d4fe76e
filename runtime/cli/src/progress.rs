//! Pull progress: a bar per blob (bytes, rate) on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use husk_image::{PullEvent, PullProgress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What `husk pull` and `husk run IMAGE` show while blobs arrive.
#[derive(Debug)]
pub struct PullLines {
    quiet: bool,
    bars: Option<(MultiProgress, Mutex<HashMap<String, ProgressBar>>)>,
}

/// The first 12 hex digits of a digest, as image tools show them.
pub(crate) fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl PullLines {
    pub fn new(quiet: bool, terminal: bool) -> Self {
        let bars = (!quiet && terminal).then(|| {
            (MultiProgress::with_draw_target(ProgressDrawTarget::stderr()), Mutex::new(HashMap::new()))
        });
        Self { quiet, bars }
    }

    fn bar(&self, digest: &str, size: u64) -> Option<ProgressBar> {
        let (multi, bars) = self.bars.as_ref()?;
        let mut bars = bars.lock().ok()?;
        Some(
            bars.entry(digest.to_string())
                .or_insert_with(|| {
                    let style = ProgressStyle::with_template(
                        "{prefix}: [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    let bar = multi.add(ProgressBar::new(size).with_style(style));
                    bar.set_prefix(short(digest).to_string());
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                })
                .clone(),
        )
    }

    /// Leaves the bars drawn as they ended.
    pub fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            if let Ok(bars) = bars.lock() {
                for bar in bars.values().filter(|b| !b.is_finished()) {
                    bar.abandon();
                }
            }
        }
    }
}

impl PullProgress for PullLines {
    fn event(&self, event: PullEvent<'_>) {
        if self.quiet {
            return;
        }
        if self.bars.is_some() {
            match event {
                PullEvent::Present { digest, size } => {
                    if let Some(b) = self.bar(digest, size) {
                        b.set_position(size);
                        b.finish_with_message("already present");
                    }
                }
                PullEvent::Fetching { digest, size } => drop(self.bar(digest, size)),
                PullEvent::Progress { digest, done } => {
                    if let Some(b) = self.bar(digest, 0) {
                        b.set_position(done);
                    }
                }
                PullEvent::Done { digest, size } => {
                    if let Some(b) = self.bar(digest, size) {
                        b.set_position(size);
                        b.finish_with_message("done");
                    }
                }
            }
            return;
        }
        match event {
            PullEvent::Present { digest, .. } => eprintln!("{}: already present", short(digest)),
            PullEvent::Fetching { digest, size } => eprintln!("{}: fetching {size} bytes", short(digest)),
            PullEvent::Progress { .. } => {}
            PullEvent::Done { digest, .. } => eprintln!("{}: done", short(digest)),
        }
    }
}
