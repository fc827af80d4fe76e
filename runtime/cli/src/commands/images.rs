//! The image commands: `husk pull`, `images`, `rmi`, `image inspect|prune|ls|rm`, over husk-image's
//! store and registry client. Settings come from the config's `images` section.

use std::io::IsTerminal as _;

use husk_core::config::Config;
use husk_image::{
    ImageName, ImageRecord, Platform, PullOptions, Registry, RegistryOptions, Store, UnpackLimits,
};
use serde_json::json;

use super::{check_format, out, ExitCode};
use crate::error::CliError;
use crate::progress::{short, PullLines};

/// The store, a registry client and the unpacking caps, as this host's config sets them.
#[derive(Debug)]
pub struct Images {
    pub store: Store,
    pub registry: Registry,
    pub limits: UnpackLimits,
    pub parallel: usize,
}

impl Images {
    pub fn open(cfg: &Config) -> Result<Self, CliError> {
        let c = &cfg.images;
        let store = Store::open(&c.root)?;
        let registry = Registry::new(RegistryOptions {
            insecure: c.insecure_registries.clone(),
            mirrors: c.mirrors.clone(),
            auth_files: Vec::new(),
        })?;
        let limits =
            UnpackLimits { max_layer_bytes: c.max_layer_bytes, max_layer_entries: c.max_layer_entries };
        Ok(Self { store, registry, limits, parallel: c.parallel_downloads })
    }

    /// Pulls `name`, reporting progress on stderr unless `quiet`.
    pub async fn pull(&self, name: &str, platform: &str, quiet: bool) -> Result<ImageRecord, CliError> {
        let name: ImageName = name.parse()?;
        let platform: Platform = platform.parse()?;
        let opts = PullOptions { platform, parallel: self.parallel };
        let progress = PullLines::new(quiet, std::io::stderr().is_terminal());
        let record = husk_image::pull(&self.store, &self.registry, &name, &opts, &progress).await;
        progress.finish();
        Ok(record?)
    }
}

pub async fn pull(cfg: &Config, name: &str, platform: &str, quiet: bool) -> Result<ExitCode, CliError> {
    let images = Images::open(cfg)?;
    let record = images.pull(name, platform, quiet).await?;
    if !quiet {
        eprintln!("{}: pulled {}", record.name, record.digest);
    }
    out!("{}", record.digest);
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn id_of(r: &ImageRecord) -> String {
    r.config_digest.clone()
}

pub fn list(cfg: &Config, format: &str, quiet: bool) -> Result<ExitCode, CliError> {
    check_format(format)?;
    let store = Store::open(&cfg.images.root)?;
    let images = store.images()?;
    if quiet {
        for r in &images {
            out!("{}", short(&r.config_digest));
        }
        return Ok(0);
    }
    if format == "json" {
        let list: Vec<serde_json::Value> = images
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "digest": r.digest, "id": id_of(r), "index_digest": r.index_digest,
                    "platform": r.platform, "size": r.size, "created": r.created, "pulled_at": r.pulled_at,
                })
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
        return Ok(0);
    }
    let name_w = images.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    out!("{:<name_w$}  {:<19}  {:<12}  {:>9}  CREATED", "NAME", "DIGEST", "ID", "SIZE");
    for r in &images {
        let created = r.created.as_deref().unwrap_or("-");
        out!(
            "{:<name_w$}  sha256:{:<12}  {:<12}  {:>9}  {}",
            r.name,
            short(&r.digest),
            short(&r.config_digest),
            human_size(r.size),
            created.get(..19).unwrap_or(created)
        );
    }
    Ok(0)
}

pub fn remove(cfg: &Config, names: &[String]) -> Result<ExitCode, CliError> {
    let store = Store::open(&cfg.images.root)?;
    let mut failed = None;
    for name in names {
        match store.remove(name) {
            Ok(removed) => {
                for n in removed {
                    out!("Untagged: {n}");
                }
            }
            Err(e) => {
                eprintln!("husk: {e}");
                failed = Some(e);
            }
        }
    }
    let report = store.gc()?;
    if report.freed > 0 {
        out!(
            "Deleted: {} blobs, {} snapshots ({})",
            report.blobs,
            report.snapshots,
            human_size(report.freed)
        );
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(0),
    }
}

pub fn inspect(cfg: &Config, name: &str) -> Result<ExitCode, CliError> {
    let store = Store::open(&cfg.images.root)?;
    let Some(r) = store.find(name)? else {
        return Err(husk_image::ImageError::NoSuchImage { query: name.to_string() }.into());
    };
    let config = store.config_json(&r)?;
    let snapshot = store.snapshot_path(&r);
    let v = json!({
        "name": r.name, "digest": r.digest, "id": id_of(&r), "index_digest": r.index_digest,
        "platform": r.platform, "layers": r.layers, "diff_ids": r.diff_ids, "size": r.size,
        "created": r.created, "pulled_at": r.pulled_at,
        "snapshot": snapshot.is_dir().then(|| snapshot.display().to_string()),
        "config": config,
    });
    out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(0)
}

pub fn prune(cfg: &Config) -> Result<ExitCode, CliError> {
    let store = Store::open(&cfg.images.root)?;
    let r = store.gc()?;
    out!("removed {} blobs, {} snapshots, {} partial downloads", r.blobs, r.snapshots, r.partials);
    out!("freed {} bytes", r.freed);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_short_digests() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1_500_000), "1.5 MB");
        assert_eq!(short(&format!("sha256:{}", "ab".repeat(32))), "abababababab");
        assert_eq!(short("sha256:abc"), "abc");
    }
}
