//! The worker process: owns the model and runs one job at a time for the server that started
//! it, talking over stdin and stdout (see [`crate::protocol`]). Whatever a job does to this
//! process — abort, stack overflow, out-of-memory kill, SIGBUS — the server only loses the
//! job and starts another worker.

use std::io::{self, BufReader, BufWriter, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use image::RgbImage;
use sdrs::output::{ImageFormat, OutputDir};
use sdrs::pipeline::{
    img2img, txt2img, Event, Generation, LoadOptions, NetworkOptions, Residency, StableDiffusion,
};
use sdrs::sampling::Flow;
use sdrs::weights::Checkpoint;

use crate::preview::cheap_preview;
use crate::protocol::{read_frame, write_frame, DeviceSpec, FromWorker, ToWorker};
use crate::queue::JobError;

/// The environment variable that arms `test_crash`; only the crate's own tests set it.
pub const TEST_CRASH_VAR: &str = "SDRS_WORKER_TEST_CRASH";

/// What the reader thread tells the job loop: which job is current and what was asked of it.
#[derive(Default)]
struct Control {
    job: AtomicU64,
    interrupt: AtomicBool,
    skip: AtomicBool,
}

impl Control {
    fn start(&self, job: u64) {
        self.job.store(job, Ordering::SeqCst);
        self.interrupt.store(false, Ordering::SeqCst);
        self.skip.store(false, Ordering::SeqCst);
    }

    fn flag(&self, job: u64, flag: &AtomicBool) {
        // A control message for a job that already ended must not touch the next one.
        if self.job.load(Ordering::SeqCst) == job {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs the worker until the server closes its stdin. Called by `sdrs serve-worker` and the
/// crate's `sdrs-server-worker` binary.
pub fn run_worker() -> Result<()> {
    // The worker is the process that runs the models (the server only relays), so it is the
    // one that makes the allocator keep freed activations between steps.
    sdrs::keep_freed_memory();
    let out = protocol_output()?;
    die_with_parent();
    let control = Arc::new(Control::default());
    let (jobs, incoming) = mpsc::channel();
    {
        let control = control.clone();
        std::thread::Builder::new()
            .name("sdrs-worker-input".into())
            .spawn(move || read_input(&control, &jobs))
            .context("starting the worker's input thread")?;
    }
    let mut worker = Worker {
        out: BufWriter::new(out),
        control,
        setup: None,
        model: None,
        crash_test: std::env::var_os(TEST_CRASH_VAR).is_some(),
    };
    while let Ok((message, data)) = incoming.recv() {
        worker.handle(message, data)?;
    }
    Ok(())
}

/// Reads the server's frames: control messages act at once, the rest go to the job loop.
/// The end of input (the server went away) interrupts the running job.
fn read_input(control: &Control, jobs: &mpsc::Sender<(ToWorker, Vec<u8>)>) {
    let mut input = BufReader::new(io::stdin().lock());
    loop {
        match read_frame::<ToWorker>(&mut input) {
            Ok(Some((ToWorker::Interrupt { job }, _))) => control.flag(job, &control.interrupt),
            Ok(Some((ToWorker::Skip { job }, _))) => control.flag(job, &control.skip),
            Ok(Some((message, data))) => {
                if let ToWorker::Load { job, .. } | ToWorker::Generate { job, .. } = &message {
                    control.start(*job);
                }
                if jobs.send((message, data)).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => {
                control.interrupt.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// How the worker builds models and where it saves, from the `Setup` message.
struct Setup {
    device: Device,
    network: NetworkOptions,
    nan_check: bool,
    outdir: PathBuf,
    lora_dir: Option<PathBuf>,
    embeddings_dir: Option<PathBuf>,
}

struct Worker {
    out: BufWriter<std::fs::File>,
    control: Arc<Control>,
    setup: Option<Setup>,
    model: Option<StableDiffusion>,
    crash_test: bool,
}

impl Worker {
    fn send(&mut self, message: &FromWorker, data: &[u8]) -> io::Result<()> {
        write_frame(&mut self.out, message, data)
    }

    fn handle(&mut self, message: ToWorker, data: Vec<u8>) -> Result<()> {
        match message {
            ToWorker::Setup {
                device,
                lowmem,
                fast,
                nan_check,
                outdir,
                lora_dir,
                embeddings_dir,
            } => {
                let device = match device {
                    DeviceSpec::Cpu => Device::Cpu,
                    DeviceSpec::Cuda(n) => Device::new_cuda(n)?,
                    DeviceSpec::Metal(n) => Device::new_metal(n)?,
                };
                let residency = if lowmem {
                    Residency::OneAtATime
                } else {
                    Residency::All
                };
                self.setup = Some(Setup {
                    device,
                    network: NetworkOptions { residency, fast },
                    nan_check,
                    outdir,
                    lora_dir,
                    embeddings_dir,
                });
                self.send(
                    &FromWorker::Ready {
                        pid: std::process::id(),
                    },
                    &[],
                )?;
            }
            ToWorker::Load { job, path } => {
                // Free the old model before the new one is built: two never fit where one
                // barely does.
                self.model = None;
                match guarded(|| self.load(&path)) {
                    Ok(model) => {
                        let hash = model.model_hash().map(str::to_string);
                        self.model = Some(model);
                        self.send(&FromWorker::Loaded { job, hash }, &[])?;
                    }
                    Err(error) => self.send(
                        &FromWorker::Done {
                            job,
                            error: Some(error),
                        },
                        &[],
                    )?,
                }
            }
            ToWorker::Generate { job, request, init } => {
                let init = match init {
                    Some((w, h)) => match RgbImage::from_raw(w, h, data) {
                        Some(image) => Some(image),
                        None => {
                            let error = server_error(format!(
                                "the init image's pixels do not make a {w}x{h} picture"
                            ));
                            let done = FromWorker::Done {
                                job,
                                error: Some(error),
                            };
                            self.send(&done, &[])?;
                            return Ok(());
                        }
                    },
                    None => None,
                };
                let outcome = guarded(|| self.generate(job, &request, init.as_ref()));
                let error = match outcome {
                    Ok(()) => None,
                    Err(e) if e.message == LOST_SERVER => bail!("the server went away"),
                    Err(e) => Some(e),
                };
                self.send(&FromWorker::Done { job, error }, &[])?;
            }
            ToWorker::Rescan => {
                if let Some(model) = &self.model {
                    model.loras().refresh();
                    model.reload_embeddings()?;
                }
            }
            ToWorker::Interrupt { .. } | ToWorker::Skip { .. } => {}
        }
        Ok(())
    }

    fn setup(&self) -> Result<&Setup, JobError> {
        self.setup
            .as_ref()
            .ok_or_else(|| server_error("the worker was given a job before its setup"))
    }

    fn load(&self, path: &Path) -> Result<StableDiffusion, JobError> {
        let setup = self.setup()?;
        let failed = |e: sdrs::Error| server_error(format!("loading {}: {e}", path.display()));
        let checkpoint = Checkpoint::open(path).map_err(failed)?;
        let options = LoadOptions {
            networks: setup.network,
            nan_check: setup.nan_check,
            embeddings_dir: setup.embeddings_dir.clone().filter(|d| d.is_dir()),
            lora_dir: setup.lora_dir.clone(),
            ..LoadOptions::default()
        };
        StableDiffusion::load_with(&checkpoint, &setup.device, options).map_err(failed)
    }

    fn generate(
        &mut self,
        job: u64,
        request: &Generation,
        init: Option<&RgbImage>,
    ) -> Result<(), JobError> {
        if self.crash_test {
            test_crash(&request.request().prompt);
        }
        let folder = if init.is_some() {
            "img2img-samples"
        } else {
            "txt2img-samples"
        };
        let setup = self.setup()?;
        let mut out = OutputDir::prepare(&setup.outdir.join(folder)).map_err(server_error)?;
        let sd = self.model.as_ref().ok_or_else(|| {
            server_error(
                "no model is loaded (the last load failed; choose one with \
                 POST /sdapi/v1/options {\"sd_model_checkpoint\": …})",
            )
        })?;
        let control = self.control.clone();
        let writer = &mut self.out;
        // The first failure to save an image or to reach the server stops the job.
        let mut failure: Option<JobError> = None;
        let mut on_event = |event: Event| -> Flow {
            let sent = match event {
                Event::Step {
                    image,
                    images,
                    step,
                    steps,
                    denoised,
                } => {
                    let preview = cheap_preview(denoised);
                    let message = FromWorker::Step {
                        job,
                        image,
                        images,
                        step,
                        steps,
                        preview: preview.as_ref().map(|p| p.dimensions()),
                    };
                    let pixels = preview.map(|p| p.into_raw()).unwrap_or_default();
                    write_frame(writer, &message, &pixels)
                }
                Event::Image { index, image } => match out.save(image, ImageFormat::Png) {
                    Ok(saved) => {
                        let message = FromWorker::Image {
                            job,
                            index,
                            seed: image.seed,
                            infotext: image.infotext.clone(),
                            path: saved.path,
                        };
                        write_frame(writer, &message, &saved.bytes)
                    }
                    Err(e) => {
                        failure = Some(server_error(e));
                        return Flow::Stop;
                    }
                },
            };
            if sent.is_err() {
                failure = Some(server_error(LOST_SERVER));
                return Flow::Stop;
            }
            if control.interrupt.load(Ordering::SeqCst) {
                Flow::Stop
            } else if control.skip.swap(false, Ordering::SeqCst) {
                Flow::Skip
            } else {
                Flow::Continue
            }
        };
        let result = match init {
            None => txt2img(sd, request, &mut on_event),
            Some(init) => img2img(sd, request, init, &mut on_event),
        };
        if let Some(e) = failure {
            return Err(e);
        }
        match result {
            // A stopped run is the interrupt the server asked for: the job ends with the
            // images it has.
            Ok(_) => Ok(()),
            Err(e) => Err(JobError {
                bad_request: e.is_user_error(),
                message: e.to_string(),
            }),
        }
    }
}

/// The message of a job whose events could not be written: the server is gone.
const LOST_SERVER: &str = "the server stopped reading";

fn server_error(message: impl ToString) -> JobError {
    JobError {
        message: message.to_string(),
        bad_request: false,
    }
}

/// Runs a job, turning a panic into its error (the message only, never a backtrace).
fn guarded<T>(job: impl FnOnce() -> Result<T, JobError>) -> Result<T, JobError> {
    catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(server_error(format!("internal error: {what}")))
    })
}

/// The protocol's output: the real stdout, kept aside; fd 1 then points at stderr so that a
/// stray print anywhere in the process cannot corrupt a frame.
fn protocol_output() -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    io::stdout().flush()?;
    // SAFETY: plain descriptor calls on fds 1 and 2, which the process owns; the duplicate
    // is owned by the returned File alone.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            bail!(
                "setting up the worker's output: {}",
                io::Error::last_os_error()
            );
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Asks Linux to kill this process if the server dies, so that no orphan keeps a model (and
/// a job) going.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
}

/// Test-only crashes, armed by [`TEST_CRASH_VAR`] in the worker's environment: a prompt of
/// `sdrs-test-crash:segv`, `:abort` or `:exit` makes the worker die that way.
fn test_crash(prompt: &str) {
    match prompt.strip_prefix("sdrs-test-crash:") {
        Some("segv") => {
            // SAFETY: none; this is the crash the test asks for (a write through null).
            unsafe { std::ptr::null_mut::<u8>().write_volatile(1) }
        }
        Some("abort") => std::process::abort(),
        Some("exit") => std::process::exit(3),
        _ => {}
    }
}
