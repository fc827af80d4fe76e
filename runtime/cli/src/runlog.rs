//! Logs the way runc writes them, because containerd's shim and conmon read them back: with
//! `--log-format json` one `{"level":"error","msg":"...","time":"..."}` object per line, with
//! `text` logrus's `time="..." level=error msg="..."`. The last error line is what those clients
//! show the user when a command fails.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A tracing layer that writes runc-format lines.
struct RuncLayer {
    out: Mutex<Box<dyn Write + Send>>,
    format: LogFormat,
    max: Level,
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// One log line in `format` (without the newline).
pub fn format_line(format: LogFormat, level: &Level, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            serde_json::json!({"level": level_name(level), "msg": msg, "time": time}).to_string()
        }
        LogFormat::Text => format!("time={time:?} level={} msg={msg:?}", level_name(level)),
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        // Debug output is husk's own; the gRPC stack's would drown it.
        let ours = event.metadata().target().starts_with("husk");
        if *level > self.max || (*level > Level::WARN && !ours) {
            return;
        }
        let mut m = Message::default();
        event.record(&mut m);
        let line = format_line(self.format, level, &m.0, &husk_core::lifecycle::now_rfc3339());
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Sets up logging to `path` (stderr when absent). Falls back to stderr if the file cannot be
/// opened, which is reported there.
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) {
    let out: Box<dyn Write + Send> = match path {
        Some(p) => match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("husk: cannot open log {}: {e}", p.display());
                Box::new(std::io::stderr())
            }
        },
        None => Box::new(std::io::stderr()),
    };
    let max = if debug { Level::DEBUG } else { Level::WARN };
    let layer = RuncLayer { out: Mutex::new(out), format, max };
    // The same choice as `on_event`'s, made once per callsite: the gRPC stack's spans and
    // trace events are then never built (they were, for every frame, only to be dropped).
    let wanted =
        tracing_subscriber::filter::Targets::new().with_target("husk", max).with_default(Level::WARN);
    let _ = tracing_subscriber::registry().with(layer.with_filter(wanted)).try_init();
}

/// Whether errors already reach stderr through the log (then they are not printed twice).
pub fn logs_to_stderr(path: Option<&Path>) -> bool {
    path.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_what_containerd_parses() {
        let l = format_line(LogFormat::Json, &Level::ERROR, "container \"x\" does not exist", "T");
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert_eq!(v["time"], "T");
        let t = format_line(LogFormat::Text, &Level::WARN, "a \"b\"", "T");
        assert_eq!(t, r#"time="T" level=warning msg="a \"b\"""#);
    }
}
