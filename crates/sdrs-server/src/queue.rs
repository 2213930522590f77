//! The FIFO queue every generation goes through, and the jobs in it.
//!
//! The queue is shared by the HTTP handlers (which submit, watch and cancel jobs) and the one
//! supervisor thread that hands jobs, in order, to the worker process owning the model. A
//! job's status lives in a `watch` channel, so any number of clients can follow it without
//! polling.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use image::RgbImage;
use sdrs::pipeline::Generation;
use tokio::sync::watch;

use crate::models::ModelEntry;

pub type JobId = u64;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    /// Every image was made.
    Done,
    /// Stopped while running (interrupt or cancel); the images made before stay.
    Interrupted,
    /// Cancelled before it started.
    Cancelled,
    Failed,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// What a job does.
pub enum Work {
    Generate {
        request: Box<Generation>,
        /// The init image of an img2img job.
        init: Option<RgbImage>,
    },
    /// Switch the server's model (A1111's `sd_model_checkpoint` option).
    LoadModel { model: ModelEntry },
}

/// One image a job made, as saved in the output folder.
#[derive(Debug, Clone)]
pub struct FinishedImage {
    pub seed: u64,
    pub infotext: String,
    pub path: PathBuf,
    pub png: Arc<Vec<u8>>,
}

/// Why a job failed, and whose fault it was (which decides the HTTP status).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    pub message: String,
    pub bad_request: bool,
}

/// A job's state and progress, as clients see it.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub state: JobState,
    /// Zero-based index of the image being sampled, and how many the job makes.
    pub image: usize,
    pub images: usize,
    /// The last finished sampling step of the current image, and its step count.
    pub step: usize,
    pub steps: usize,
    pub submitted: SystemTime,
    pub started: Option<Instant>,
    pub results: Vec<FinishedImage>,
    pub error: Option<JobError>,
    pub skipped: bool,
    pub interrupted: bool,
}

impl JobStatus {
    /// A1111's progress formula: finished images plus the current image's share of steps,
    /// over the job's image count, at most 1.
    pub fn progress(&self) -> f64 {
        if self.state.is_final() {
            return 1.0;
        }
        if self.images == 0 {
            return 0.0;
        }
        let mut progress = self.image as f64 / self.images as f64;
        if self.steps > 0 {
            progress += self.step as f64 / self.steps as f64 / self.images as f64;
        }
        progress.min(1.0)
    }

    /// A1111's `eta_relative`: the time still to go if the rest runs at the pace so far.
    pub fn eta_relative(&self) -> f64 {
        let (Some(started), progress) = (self.started, self.progress()) else {
            return 0.0;
        };
        if progress <= 0.0 || self.state.is_final() {
            return 0.0;
        }
        let elapsed = started.elapsed().as_secs_f64();
        elapsed / progress - elapsed
    }
}

/// What a client asks of a running job; the supervisor passes it on to the worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Interrupt,
    Skip,
}

/// Where a running job's [`Control`]s go.
pub type ControlSink = Box<dyn Fn(Control) + Send>;

/// A queued, running or finished piece of work.
pub struct Job {
    pub id: JobId,
    pub work: Work,
    /// The `--api-auth` user who queued it (`None` without authentication, and for the
    /// server's own model loads): only they see and control it.
    pub owner: Option<String>,
    cancel: AtomicBool,
    status: watch::Sender<JobStatus>,
    preview: Mutex<Option<RgbImage>>,
    control: Mutex<Option<ControlSink>>,
}

impl Job {
    fn new(id: JobId, work: Work, owner: Option<String>) -> Self {
        let images = match &work {
            Work::Generate { request, .. } => request.image_count(),
            Work::LoadModel { .. } => 0,
        };
        let (status, _) = watch::channel(JobStatus {
            state: JobState::Queued,
            image: 0,
            images,
            step: 0,
            steps: 0,
            submitted: SystemTime::now(),
            started: None,
            results: Vec::new(),
            error: None,
            skipped: false,
            interrupted: false,
        });
        Self {
            id,
            work,
            owner,
            cancel: AtomicBool::new(false),
            status,
            preview: Mutex::new(None),
            control: Mutex::new(None),
        }
    }

    /// Whether `caller` (the authenticated user, if any) may see and control this job.
    pub fn visible_to(&self, caller: Option<&str>) -> bool {
        self.owner.as_deref() == caller
    }

    pub fn status(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.status.subscribe()
    }

    pub fn update(&self, change: impl FnOnce(&mut JobStatus)) {
        self.status.send_modify(change);
    }

    /// Asks a running job to stop at its next step, keeping the images made so far.
    pub fn interrupt(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.update(|s| s.interrupted = true);
        self.send(Control::Interrupt);
    }

    /// Asks a running job to give up its current image and go on with the next.
    pub fn skip(&self) {
        self.update(|s| s.skipped = true);
        self.send(Control::Skip);
    }

    pub fn interrupted(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn send(&self, control: Control) {
        if let Some(sink) = lock(&self.control).as_ref() {
            sink(control);
        }
    }

    /// Routes this job's interrupts and skips to `sink` while it runs (`None` when it ends).
    /// An interrupt asked for before is passed on at once.
    pub fn set_control(&self, sink: Option<ControlSink>) {
        let mut slot = lock(&self.control);
        *slot = sink;
        if let Some(sink) = slot.as_ref() {
            if self.interrupted() {
                sink(Control::Interrupt);
            }
        }
    }

    pub fn set_preview(&self, image: RgbImage) {
        *lock(&self.preview) = Some(image);
    }

    pub fn preview(&self) -> Option<RgbImage> {
        lock(&self.preview).clone()
    }
}

/// The queue is full: the caller should come back later.
#[derive(Debug)]
pub struct QueueFull {
    pub pending: usize,
}

struct Inner {
    pending: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    jobs: HashMap<JobId, Arc<Job>>,
    /// Finished jobs, oldest first; the oldest are forgotten beyond `keep_finished`.
    finished: VecDeque<JobId>,
    next_id: JobId,
    closed: bool,
}

/// The FIFO of jobs waiting for the worker.
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Condvar,
    max_pending: usize,
    keep_finished: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a single assignment or push: a panic elsewhere
    // cannot leave the data half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    pub fn new(max_pending: usize, keep_finished: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                pending: VecDeque::new(),
                running: None,
                jobs: HashMap::new(),
                finished: VecDeque::new(),
                next_id: 1,
                closed: false,
            }),
            wake: Condvar::new(),
            max_pending,
            keep_finished,
        }
    }

    /// Appends a job, or refuses when `max_pending` jobs are already waiting.
    pub fn submit(&self, work: Work, owner: Option<String>) -> Result<Arc<Job>, QueueFull> {
        let mut inner = lock(&self.inner);
        if inner.pending.len() >= self.max_pending {
            return Err(QueueFull {
                pending: inner.pending.len(),
            });
        }
        let job = Arc::new(Job::new(inner.next_id, work, owner));
        inner.next_id += 1;
        inner.jobs.insert(job.id, job.clone());
        inner.pending.push_back(job.clone());
        self.wake.notify_one();
        Ok(job)
    }

    pub fn get(&self, id: JobId) -> Option<Arc<Job>> {
        lock(&self.inner).jobs.get(&id).cloned()
    }

    /// The job the worker process is running.
    pub fn running(&self) -> Option<Arc<Job>> {
        lock(&self.inner).running.clone()
    }

    /// How many jobs are ahead of `id` (0 = next), if it is waiting.
    pub fn position(&self, id: JobId) -> Option<usize> {
        lock(&self.inner).pending.iter().position(|j| j.id == id)
    }

    pub fn pending_len(&self) -> usize {
        lock(&self.inner).pending.len()
    }

    /// Every known job, oldest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs: Vec<_> = lock(&self.inner).jobs.values().cloned().collect();
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    /// Cancels a job: a waiting one leaves the queue, a running one stops at its next step.
    pub fn cancel(&self, id: JobId) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        let job = inner.jobs.get(&id).cloned()?;
        if let Some(at) = inner.pending.iter().position(|j| j.id == id) {
            inner.pending.remove(at);
            job.update(|s| s.state = JobState::Cancelled);
            Self::remember(&mut inner, id, self.keep_finished);
        } else if !job.status().state.is_final() {
            job.interrupt();
        }
        Some(job)
    }

    /// The next job, waiting for one; `None` once the queue is closed.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.closed {
                return None;
            }
            if let Some(job) = inner.pending.pop_front() {
                inner.running = Some(job.clone());
                return Some(job);
            }
            inner = self
                .wake
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Records that the supervisor is done with `job`.
    pub fn finish(&self, job: &Job) {
        let mut inner = lock(&self.inner);
        inner.running = None;
        Self::remember(&mut inner, job.id, self.keep_finished);
    }

    fn remember(inner: &mut Inner, id: JobId, keep: usize) {
        inner.finished.push_back(id);
        while inner.finished.len() > keep {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }

    /// Stops the supervisor once it finishes its current job.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work() -> Work {
        Work::Generate {
            request: Box::new(
                sdrs::pipeline::GenerationRequest::default()
                    .validate()
                    .expect("the default request is valid"),
            ),
            init: None,
        }
    }

    #[test]
    fn jobs_come_out_in_order_and_a_full_queue_refuses() {
        let q = Queue::new(2, 10);
        let a = q.submit(work(), None).unwrap();
        let b = q.submit(work(), None).unwrap();
        assert_eq!(
            q.submit(work(), None).err().map(|full| full.pending),
            Some(2)
        );
        assert_eq!(q.position(b.id), Some(1));
        assert_eq!(q.next().unwrap().id, a.id);
        assert_eq!(q.running().unwrap().id, a.id);
        q.finish(&a);
        assert!(q.running().is_none());
        assert_eq!(q.next().unwrap().id, b.id);
    }

    #[test]
    fn cancelling_a_waiting_job_takes_it_out_and_a_running_one_is_interrupted() {
        let q = Queue::new(5, 10);
        let a = q.submit(work(), None).unwrap();
        let b = q.submit(work(), None).unwrap();
        assert_eq!(q.next().unwrap().id, a.id);
        q.cancel(b.id);
        assert_eq!(b.status().state, JobState::Cancelled);
        assert_eq!(q.pending_len(), 0);
        q.cancel(a.id);
        assert!(a.interrupted());
        assert_eq!(a.status().state, JobState::Queued);
    }

    #[test]
    fn old_finished_jobs_are_forgotten() {
        let q = Queue::new(5, 1);
        let a = q.submit(work(), None).unwrap();
        let b = q.submit(work(), None).unwrap();
        q.finish(&q.next().unwrap());
        q.finish(&q.next().unwrap());
        assert!(q.get(a.id).is_none());
        assert!(q.get(b.id).is_some());
    }

    #[test]
    fn progress_follows_a1111s_formula() {
        let q = Queue::new(1, 1);
        let job = q.submit(work(), None).unwrap();
        job.update(|s| {
            s.state = JobState::Running;
            s.images = 4;
            s.image = 1;
            s.step = 5;
            s.steps = 20;
        });
        // 1/4 + 1/4 · 5/20
        assert!((job.status().progress() - 0.3125).abs() < 1e-12);
        job.update(|s| s.state = JobState::Done);
        assert_eq!(job.status().progress(), 1.0);
    }
}
