//! Getting a model by name from the command line: what is being downloaded, and progress bars.

use indicatif::{ProgressBar, ProgressStyle};
use sdrs::hub::{CatalogueEntry, Hub, Located, ResolvedModel};

/// `hub.resolve(name)`, saying first what it will download, and showing the download.
pub fn resolve_model(hub: &Hub, name: Option<&str>) -> sdrs::Result<ResolvedModel> {
    if let Located::Missing(entry) = hub.locate(name)? {
        if !hub.offline {
            announce(hub, entry);
        }
    }
    hub.resolve(name, &mut DownloadBars::default())
}

/// Says which model is about to be downloaded, from where, to where.
pub fn announce(hub: &Hub, entry: &CatalogueEntry) {
    eprintln!(
        "downloading {} ({}) from {} into {}",
        entry.name,
        entry.repo,
        hub.endpoint,
        hub.cache_dir.display()
    );
}

/// One bar per file, on stderr.
#[derive(Default)]
pub struct DownloadBars {
    bar: Option<ProgressBar>,
}

impl sdrs::hub::Progress for DownloadBars {
    fn init(&mut self, size: usize, filename: &str) {
        // A resumed transfer starts again from `init`: its new bar replaces the broken one.
        if let Some(old) = self.bar.take() {
            if old.message() == filename {
                old.finish_and_clear();
            }
        }
        let style = ProgressStyle::with_template(
            "{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(size as u64).with_style(style);
        bar.set_message(filename.to_string());
        self.bar = Some(bar);
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
