//! The server's side of the worker process: starts it, hands it the queue's jobs one at a
//! time, passes its progress and images on to the jobs, and when it dies — any signal, any
//! exit — fails the job it was running with what happened, starts a new one with the same
//! model, and goes on with the queue.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use image::RgbImage;
use sdrs::pipeline::Generation;

use crate::models::ModelEntry;
use crate::process::{Process, WorkerCommand};
use crate::protocol::{FromWorker, ToWorker, MAX_ATTACHMENT_BYTES};
use crate::queue::{Control, FinishedImage, Job, JobError, JobState, Queue, Work};

/// The model the worker has loaded, as the API reports it.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub entry: ModelEntry,
    pub hash: Option<String>,
}

/// Shared view of which model is loaded (`None` before the first load finishes or after
/// one failed).
pub type CurrentModel = Arc<Mutex<Option<LoadedModel>>>;

pub struct Supervisor {
    pub queue: Arc<Queue>,
    pub command: WorkerCommand,
    /// The `Setup` message every new worker gets first.
    pub setup: ToWorker,
    pub current: CurrentModel,
    /// The running worker's process id, 0 while there is none.
    pub pid: Arc<AtomicU32>,
    /// How many times the LoRA folder was rescanned (`POST /sdapi/v1/refresh-loras`); a
    /// worker that has seen fewer rescans gets `Rescan` before its next job.
    pub addon_scans: Arc<AtomicU64>,
}

/// How a job on the worker ended.
enum Ended<T> {
    Finished(Result<T, JobError>),
    /// The worker died (or broke the protocol and was killed); why, in words.
    Died(String),
}

impl Supervisor {
    /// Runs jobs until the queue closes, then stops the worker.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sdrs-supervisor".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let mut process: Option<Process> = None;
        // The model a fresh worker must load before the next job: after a death, or after
        // a failed switch freed the old model.
        let mut restore: Option<LoadedModel> = None;
        loop {
            if process.is_none() {
                process = self.start().map_err(|e| eprintln!("sdrs: {e}")).ok();
            }
            if let Some(model) = restore.take() {
                self.reload(&mut process, model);
            }
            let Some(job) = self.queue.next() else { break };
            if let Some(p) = &process {
                p.forget_last_words();
            }
            job.update(|s| {
                s.state = JobState::Running;
                s.started = Some(Instant::now());
            });
            let outcome = self.run_job(&mut process, &mut restore, &job);
            // Off the queue first: a client told that its job ended must find the worker idle.
            self.queue.finish(&job);
            job.update(|s| {
                s.state = match &outcome {
                    Ok(()) if job.interrupted() => JobState::Interrupted,
                    Ok(()) => JobState::Done,
                    Err(_) => JobState::Failed,
                };
                s.error = outcome.err();
            });
        }
        if let Some(process) = process {
            self.stop(process);
        }
    }

    fn run_job(
        &self,
        process: &mut Option<Process>,
        restore: &mut Option<LoadedModel>,
        job: &Job,
    ) -> Result<(), JobError> {
        // A worker that died while idle is replaced before the job, which is not its fault.
        if process.as_mut().is_some_and(Process::exited) {
            let why = process
                .take()
                .map(|mut p| self.reap(&mut p))
                .unwrap_or_default();
            eprintln!("sdrs: the idle worker process {why}; starting another");
            let model = self.current_model();
            *process = self.start().map_err(|e| eprintln!("sdrs: {e}")).ok();
            if let Some(model) = model {
                self.reload(process, model);
            }
        }
        if process.is_none() {
            *process = Some(self.start().map_err(server_error)?);
        }
        let Some(worker) = process.as_mut() else {
            return Err(server_error("no worker process"));
        };
        match &job.work {
            Work::LoadModel { model } => {
                let previous = self.set_current(None);
                match self.load(worker, job.id, model) {
                    Ended::Finished(Ok(hash)) => {
                        self.set_current(Some(LoadedModel {
                            entry: model.clone(),
                            hash,
                        }));
                        Ok(())
                    }
                    Ended::Finished(Err(e)) => {
                        *restore = previous;
                        Err(e)
                    }
                    Ended::Died(why) => {
                        *process = None;
                        *restore = previous;
                        Err(server_error(format!(
                            "the worker process {why} while loading {}; the server goes on \
                             with a new worker",
                            model.title
                        )))
                    }
                }
            }
            Work::Generate { request, init } => {
                match self.generate(worker, job, request, init.as_ref()) {
                    Ended::Finished(result) => result,
                    Ended::Died(why) => {
                        *process = None;
                        *restore = self.current_model();
                        let reload = restore
                            .as_ref()
                            .map(|m| format!(" and reloading {}", m.entry.title))
                            .unwrap_or_default();
                        Err(server_error(format!(
                            "the worker process {why} while running this job; a new worker \
                             is starting{reload}, and the queue goes on"
                        )))
                    }
                }
            }
        }
    }

    /// Loads `model` into a fresh worker (starting one if needed). A failure leaves the
    /// server without a model, which jobs then say; it is not retried.
    fn reload(&self, process: &mut Option<Process>, model: LoadedModel) {
        if process.is_none() {
            *process = self.start().map_err(|e| eprintln!("sdrs: {e}")).ok();
        }
        let Some(worker) = process.as_mut() else {
            self.set_current(None);
            return;
        };
        match self.load(worker, 0, &model.entry) {
            Ended::Finished(Ok(hash)) => {
                self.set_current(Some(LoadedModel {
                    entry: model.entry,
                    hash,
                }));
            }
            Ended::Finished(Err(e)) => {
                eprintln!("sdrs: reloading {}: {}", model.entry.title, e.message);
                self.set_current(None);
            }
            Ended::Died(why) => {
                eprintln!(
                    "sdrs: the worker process {why} while reloading {}",
                    model.entry.title
                );
                *process = None;
                self.set_current(None);
            }
        }
    }

    fn load(&self, worker: &mut Process, job: u64, model: &ModelEntry) -> Ended<Option<String>> {
        let path = model.path.clone();
        worker.send(ToWorker::Load { job, path }, Vec::new());
        match worker.read() {
            Some((FromWorker::Loaded { job: j, hash }, _)) if j == job => Ended::Finished(Ok(hash)),
            Some((
                FromWorker::Done {
                    job: j,
                    error: Some(e),
                },
                _,
            )) if j == job => Ended::Finished(Err(e)),
            _ => self.died(worker),
        }
    }

    fn generate(
        &self,
        worker: &mut Process,
        job: &Job,
        request: &Generation,
        init: Option<&RgbImage>,
    ) -> Ended<()> {
        let message = ToWorker::Generate {
            job: job.id,
            request: Box::new(request.clone()),
            init: init.map(|i| i.dimensions()),
        };
        let scans = self.addon_scans.load(Ordering::SeqCst);
        if worker.addon_scans != scans {
            worker.send(ToWorker::Rescan, Vec::new());
            worker.addon_scans = scans;
        }
        let pixels = init.map(|i| i.as_raw().clone()).unwrap_or_default();
        if pixels.len() > MAX_ATTACHMENT_BYTES {
            return Ended::Finished(Err(JobError {
                message: format!(
                    "the init image is {} bytes as RGB; at most {MAX_ATTACHMENT_BYTES} go to \
                     the worker",
                    pixels.len()
                ),
                bad_request: true,
            }));
        }
        worker.send(message, pixels);
        // After the job's frame, so that the worker knows the job an early interrupt names.
        let (input, id) = (worker.sender(), job.id);
        job.set_control(Some(Box::new(move |control| {
            let message = match control {
                Control::Interrupt => ToWorker::Interrupt { job: id },
                Control::Skip => ToWorker::Skip { job: id },
            };
            let _ = input.send((message, Vec::new()));
        })));
        let ended = loop {
            let Some(frame) = worker.read() else {
                break self.died(worker);
            };
            match frame {
                (
                    FromWorker::Step {
                        job: j,
                        image,
                        images,
                        step,
                        steps,
                        preview,
                    },
                    pixels,
                ) if j == job.id => {
                    job.update(|s| {
                        (s.image, s.images, s.step, s.steps) = (image, images, step, steps);
                    });
                    if let Some(p) = preview.and_then(|(w, h)| RgbImage::from_raw(w, h, pixels)) {
                        job.set_preview(p);
                    }
                }
                (
                    FromWorker::Image {
                        job: j,
                        index,
                        seed,
                        infotext,
                        path,
                    },
                    png,
                ) if j == job.id => {
                    let finished = FinishedImage {
                        seed,
                        infotext,
                        path,
                        png: Arc::new(png),
                    };
                    job.update(|s| {
                        s.results.push(finished);
                        s.image = index + 1;
                        s.step = 0;
                    });
                }
                (FromWorker::Done { job: j, error }, _) if j == job.id => {
                    break Ended::Finished(error.map_or(Ok(()), Err));
                }
                _ => break self.died(worker),
            }
        };
        job.set_control(None);
        ended
    }

    /// Starts a worker; its id is then the server's `worker_pid`.
    fn start(&self) -> Result<Process, String> {
        let process = Process::start(&self.command, &self.setup)?;
        self.pid.store(process.pid(), Ordering::SeqCst);
        Ok(process)
    }

    /// The worker broke off: reaps it and says why.
    fn died<T>(&self, worker: &mut Process) -> Ended<T> {
        Ended::Died(self.reap(worker))
    }

    fn reap(&self, worker: &mut Process) -> String {
        self.pid.store(0, Ordering::SeqCst);
        worker.reap()
    }

    fn stop(&self, worker: Process) {
        worker.stop();
        self.pid.store(0, Ordering::SeqCst);
    }

    fn current_model(&self) -> Option<LoadedModel> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets the current model, returning the one before.
    fn set_current(&self, model: Option<LoadedModel>) -> Option<LoadedModel> {
        std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(PoisonError::into_inner),
            model,
        )
    }
}

fn server_error(message: impl Into<String>) -> JobError {
    JobError {
        message: message.into(),
        bad_request: false,
    }
}
