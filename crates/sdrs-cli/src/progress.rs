//! The progress bar of a generation and the summary line after it.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::timing::PhaseClock;

/// Shows each image's steps on a bar and times the phases between events.
pub struct Progress {
    style: ProgressStyle,
    bar: Option<ProgressBar>,
    clock: PhaseClock,
}

impl Progress {
    /// A reporter whose clock starts now (after the model is loaded).
    pub fn start() -> Self {
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Self {
            style,
            bar: None,
            clock: PhaseClock::start(),
        }
    }

    /// Image `image` of `images` finished step `step` of `steps`.
    pub fn step(&mut self, image: usize, images: usize, step: usize, steps: usize) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(steps as u64).with_style(self.style.clone());
            bar.set_message(format!("image {}/{images}", image + 1));
            bar
        });
        bar.set_length(steps as u64);
        bar.set_position(step as u64);
        self.clock.step_done();
    }

    /// An image finished (its decode is timed up to here).
    pub fn image_done(&mut self) {
        self.clock.image_done();
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    /// The summary line: where the time went, and the seed.
    pub fn summary(&self, images: usize, total: Duration, load: Duration, seed: i64) -> String {
        format!(
            "{images} image(s) in {:.1}s: load {:.1}s, sampling {:.1}s ({:.2}s/step), decode \
             {:.1}s, seed {seed}",
            total.as_secs_f64(),
            load.as_secs_f64(),
            self.clock.sampling.as_secs_f64(),
            self.clock.per_step(),
            self.clock.decoding.as_secs_f64(),
        )
    }
}
