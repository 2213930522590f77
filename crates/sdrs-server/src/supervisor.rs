//! The server's side of the worker process: starts it, hands it the queue's jobs one at a
//! time, passes its progress and images on to the jobs, and when it dies — any signal, any
//! exit — fails the job it was running with what happened, starts a new one with the same
//! model, and goes on with the queue.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use image::RgbImage;
use sdrs::pipeline::GenerationRequest;

use crate::models::ModelEntry;
use crate::protocol::{read_frame, write_frame, FromWorker, ToWorker, MAX_ATTACHMENT_BYTES};
use crate::queue::{Control, FinishedImage, Job, JobError, JobState, Queue, Work};

/// How to start a worker process: `sdrs serve-worker`, or the crate's `sdrs-server-worker`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra environment variables (tests arm the worker's crash hooks with one).
    pub env: Vec<(OsString, OsString)>,
}

impl WorkerCommand {
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
        }
    }
}

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
}

/// A running worker process.
struct Process {
    child: Child,
    /// Frames for the worker's stdin, written by a thread of their own so that no caller
    /// ever blocks on the pipe.
    input: mpsc::Sender<(ToWorker, Vec<u8>)>,
    output: BufReader<ChildStdout>,
    /// The last fatal line the worker wrote on stderr ("has overflowed its stack", …).
    last_words: Arc<Mutex<Option<String>>>,
}

/// How a job on the worker ended.
enum Ended<T> {
    Finished(Result<T, JobError>),
    /// The worker died (or broke the protocol and was killed); why, in words.
    Died(String),
}

/// How long a worker that closed its output gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

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
                // Dying words belong to the job that dies.
                p.last_words
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
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
        if process
            .as_mut()
            .is_some_and(|p| !matches!(p.child.try_wait(), Ok(None)))
        {
            let why = process.take().map(|p| self.bury(p)).unwrap_or_default();
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
        let _ = worker
            .input
            .send((ToWorker::Load { job, path }, Vec::new()));
        match read_frame::<FromWorker>(&mut worker.output) {
            Ok(Some((FromWorker::Loaded { job: j, hash }, _))) if j == job => {
                Ended::Finished(Ok(hash))
            }
            Ok(Some((
                FromWorker::Done {
                    job: j,
                    error: Some(e),
                },
                _,
            ))) if j == job => Ended::Finished(Err(e)),
            _ => self.died(worker),
        }
    }

    fn generate(
        &self,
        worker: &mut Process,
        job: &Job,
        request: &GenerationRequest,
        init: Option<&RgbImage>,
    ) -> Ended<()> {
        let message = ToWorker::Generate {
            job: job.id,
            request: Box::new(request.clone()),
            init: init.map(|i| i.dimensions()),
        };
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
        let _ = worker.input.send((message, pixels));
        // After the job's frame, so that the worker knows the job an early interrupt names.
        let (input, id) = (worker.input.clone(), job.id);
        job.set_control(Some(Box::new(move |control| {
            let message = match control {
                Control::Interrupt => ToWorker::Interrupt { job: id },
                Control::Skip => ToWorker::Skip { job: id },
            };
            let _ = input.send((message, Vec::new()));
        })));
        let ended = loop {
            let frame = match read_frame::<FromWorker>(&mut worker.output) {
                Ok(Some(frame)) => frame,
                _ => break self.died(worker),
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

    /// Starts a worker and gives it its setup.
    fn start(&self) -> Result<Process, String> {
        let program = self.command.program.display();
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            // Errors carry their message only: no backtrace is captured, whatever
            // RUST_BACKTRACE says (panics still print theirs on stderr).
            .env("RUST_LIB_BACKTRACE", "0")
            // The crash hooks are armed only by a command built to arm them (tests).
            .env_remove(crate::worker::TEST_CRASH_VAR)
            .envs(self.command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the worker process {program}: {e}"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err("the worker process has no pipes".into());
        };
        let (input, frames) = mpsc::channel::<(ToWorker, Vec<u8>)>();
        let last_words = Arc::new(Mutex::new(None));
        let threads = std::thread::Builder::new()
            .name("sdrs-worker-stdin".into())
            .spawn(move || write_frames(stdin, &frames))
            .and_then(|_| {
                let last_words = last_words.clone();
                std::thread::Builder::new()
                    .name("sdrs-worker-stderr".into())
                    .spawn(move || relay_stderr(stderr, &last_words))
            });
        if let Err(e) = threads {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot start the worker's threads: {e}"));
        }
        let mut process = Process {
            child,
            input,
            output: BufReader::new(stdout),
            last_words,
        };
        let _ = process.input.send((self.setup.clone(), Vec::new()));
        match read_frame::<FromWorker>(&mut process.output) {
            Ok(Some((FromWorker::Ready { pid }, _))) => {
                self.pid.store(pid, Ordering::SeqCst);
                eprintln!("sdrs: worker process {pid} started");
                Ok(process)
            }
            _ => Err(format!(
                "the worker process ({program}) {} before it was ready",
                self.bury(process)
            )),
        }
    }

    /// The worker broke off: waits for it to exit (killing it if it does not) and says why.
    fn died<T>(&self, worker: &mut Process) -> Ended<T> {
        Ended::Died(self.reap(worker))
    }

    fn bury(&self, mut worker: Process) -> String {
        self.reap(&mut worker)
    }

    fn reap(&self, worker: &mut Process) -> String {
        self.pid.store(0, Ordering::SeqCst);
        let deadline = Instant::now() + EXIT_GRACE;
        let status = loop {
            match worker.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    // Alive but no longer talking (or unwaitable): it cannot be trusted.
                    let _ = worker.child.kill();
                    break worker.child.wait().ok();
                }
            }
        };
        // The stderr relay may still be reading the dying words.
        std::thread::sleep(Duration::from_millis(20));
        let mut why = status.map_or_else(|| "vanished".to_string(), describe);
        let last = worker
            .last_words
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(last) = last {
            why.push_str(&format!(", saying {last:?}"));
        }
        why
    }

    /// Closes the worker's input (it ends after its job) and waits a little for it.
    fn stop(&self, process: Process) {
        let Process {
            mut child, input, ..
        } = process;
        drop(input);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
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

/// A worker's end in words: "was killed by signal 9 (SIGKILL: …)" or "exited with status 3".
pub fn describe(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let (name, hint) = match signal {
            libc::SIGKILL => (
                "SIGKILL",
                ": out of memory (the kernel's OOM killer), or killed",
            ),
            libc::SIGABRT => ("SIGABRT", ": an abort, such as a failed allocation"),
            libc::SIGSEGV => ("SIGSEGV", ": a crash"),
            libc::SIGBUS => (
                "SIGBUS",
                ": a mapped file, such as a model, shrank under it",
            ),
            libc::SIGILL => ("SIGILL", ": an instruction this CPU lacks, or a crash"),
            libc::SIGFPE => ("SIGFPE", ""),
            libc::SIGTERM => ("SIGTERM", ""),
            libc::SIGINT => ("SIGINT", ""),
            libc::SIGHUP => ("SIGHUP", ""),
            libc::SIGPIPE => ("SIGPIPE", ""),
            libc::SIGXCPU => ("SIGXCPU", ": over its CPU time limit"),
            _ => ("", ""),
        };
        return if name.is_empty() {
            format!("was killed by signal {signal}")
        } else {
            format!("was killed by signal {signal} ({name}{hint})")
        };
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended ({status})"),
    }
}

/// The worker's stdin: frames from the channel until it closes or the pipe breaks.
fn write_frames(stdin: impl Write, frames: &mpsc::Receiver<(ToWorker, Vec<u8>)>) {
    let mut stdin = std::io::BufWriter::new(stdin);
    while let Ok((message, data)) = frames.recv() {
        if write_frame(&mut stdin, &message, &data).is_err() {
            return;
        }
    }
}

/// Copies the worker's stderr to ours, line by line, and keeps the last line that says why
/// a process dies.
fn relay_stderr(stderr: impl Read, last_words: &Mutex<Option<String>>) {
    const FATAL: [&str; 4] = [
        "has overflowed its stack",
        "memory allocation of",
        "fatal runtime error",
        "panicked while",
    ];
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Lines are cut at 4 KiB so that a worker printing without newlines costs nothing.
        match lines.by_ref().take(4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        eprintln!("sdrs worker: {text}");
        if FATAL.iter().any(|f| text.contains(f)) {
            let mut kept: String = text.chars().take(300).collect();
            if let Some(at) = kept.find(", aborting") {
                kept.truncate(at);
            }
            *last_words.lock().unwrap_or_else(PoisonError::into_inner) = Some(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_are_described_by_signal_name_or_exit_status() {
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(
            describe(killed).contains("signal 9 (SIGKILL"),
            "{}",
            describe(killed)
        );
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe(exited), "exited with status 3");
        let odd = ExitStatus::from_raw(40);
        assert_eq!(describe(odd), "was killed by signal 40");
    }
}
