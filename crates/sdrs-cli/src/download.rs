//! Progress bars for model downloads.

use indicatif::{ProgressBar, ProgressStyle};

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
