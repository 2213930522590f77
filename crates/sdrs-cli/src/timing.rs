//! Where a run's time went, split by the pipeline's events: sampling steps vs. VAE decode.

use std::time::{Duration, Instant};

/// Accumulates the time between events into the phase each event closes.
pub struct PhaseClock {
    last: Instant,
    pub sampling: Duration,
    pub decoding: Duration,
    pub steps: usize,
}

impl PhaseClock {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            sampling: Duration::ZERO,
            decoding: Duration::ZERO,
            steps: 0,
        }
    }

    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        d
    }

    /// A sampling step finished (the text encoding before the first one is counted here too).
    pub fn step_done(&mut self) {
        let d = self.lap();
        self.sampling += d;
        self.steps += 1;
    }

    /// An image finished decoding.
    pub fn image_done(&mut self) {
        let d = self.lap();
        self.decoding += d;
    }

    /// Seconds per sampling step.
    pub fn per_step(&self) -> f64 {
        self.sampling.as_secs_f64() / self.steps.max(1) as f64
    }
}
