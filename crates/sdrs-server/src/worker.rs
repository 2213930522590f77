//! The one thread that owns the model and runs the queue's jobs, in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use candle_core::Device;
use image::RgbImage;
use sdrs::image_io::encode_png;
use sdrs::output::OutputDir;
use sdrs::pipeline::{
    img2img, txt2img, Event, GeneratedImage, GenerationRequest, NetworkOptions, StableDiffusion,
};
use sdrs::sampling::Flow;
use sdrs::weights::Checkpoint;

use crate::models::ModelEntry;
use crate::preview::cheap_preview;
use crate::queue::{FinishedImage, Job, JobError, JobState, Queue, Work};

/// The model the worker has loaded, as the API reports it.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub entry: ModelEntry,
    pub hash: Option<String>,
}

/// Shared view of which model is loaded (`None` before the first load finishes or after
/// one failed).
pub type CurrentModel = Arc<Mutex<Option<LoadedModel>>>;

pub struct Worker {
    pub queue: Arc<Queue>,
    pub device: Device,
    pub network: NetworkOptions,
    /// Images go to `<outdir>/txt2img-samples` and `<outdir>/img2img-samples`, as the CLI's.
    pub outdir: PathBuf,
    pub current: CurrentModel,
}

impl Worker {
    /// Runs jobs until the queue closes.
    pub fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("sdrs-worker".into())
            .spawn(move || self.run())
            .expect("spawning the worker thread")
    }

    fn run(self) {
        let mut model: Option<StableDiffusion> = None;
        while let Some(job) = self.queue.next() {
            job.update(|s| {
                s.state = JobState::Running;
                s.started = Some(Instant::now());
            });
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run_job(&job, &mut model)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(JobError {
                        message: format!("internal error: {what}"),
                        bad_request: false,
                    })
                });
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
    }

    fn run_job(&self, job: &Job, model: &mut Option<StableDiffusion>) -> Result<(), JobError> {
        match &job.work {
            Work::LoadModel { model: entry } => {
                // Free the old model before the new one is built: two never fit where one
                // barely does.
                *model = None;
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
                let loaded = self.load(entry)?;
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(LoadedModel {
                    entry: entry.clone(),
                    hash: loaded.model_hash.clone(),
                });
                *model = Some(loaded);
                Ok(())
            }
            Work::Generate { request, init } => {
                let sd = model.as_ref().ok_or_else(|| JobError {
                    message: "no model is loaded (the last load failed; choose one with \
                              POST /sdapi/v1/options {\"sd_model_checkpoint\": …})"
                        .into(),
                    bad_request: false,
                })?;
                self.generate(job, sd, request, init.as_ref())
            }
        }
    }

    fn load(&self, entry: &ModelEntry) -> Result<StableDiffusion, JobError> {
        let failed = |e: sdrs::Error| JobError {
            message: format!("loading {}: {e}", entry.path.display()),
            bad_request: false,
        };
        let checkpoint = Checkpoint::open(&entry.path).map_err(failed)?;
        StableDiffusion::load_with(&checkpoint, &self.device, self.network).map_err(failed)
    }

    fn generate(
        &self,
        job: &Job,
        sd: &StableDiffusion,
        request: &GenerationRequest,
        init: Option<&RgbImage>,
    ) -> Result<(), JobError> {
        let folder = if init.is_some() {
            "img2img-samples"
        } else {
            "txt2img-samples"
        };
        let mut out = OutputDir::prepare(&self.outdir.join(folder)).map_err(server_error)?;
        let mut save_error = None;
        let mut on_event = |event: Event| -> Flow {
            match event {
                Event::Step {
                    image,
                    images,
                    step,
                    steps,
                    denoised,
                } => {
                    job.update(|s| {
                        (s.image, s.images, s.step, s.steps) = (image, images, step, steps);
                    });
                    if let Some(preview) = cheap_preview(denoised) {
                        job.set_preview(preview);
                    }
                }
                Event::Image { index, image } => match save(&mut out, image) {
                    Ok(finished) => job.update(|s| {
                        s.results.push(finished);
                        s.image = index + 1;
                        s.step = 0;
                    }),
                    Err(e) => {
                        save_error = Some(e);
                        return Flow::Stop;
                    }
                },
            }
            if job.interrupted() {
                Flow::Stop
            } else if job.take_skip() {
                Flow::Skip
            } else {
                Flow::Continue
            }
        };
        let result = match init {
            None => txt2img(sd, request, &mut on_event),
            Some(init) => img2img(sd, request, init, &mut on_event),
        };
        if let Some(e) = save_error {
            return Err(server_error(e));
        }
        match result {
            Ok(_) => Ok(()),
            Err(sdrs::Error::Cancelled) if job.interrupted() => Ok(()),
            Err(e) => Err(JobError {
                bad_request: matches!(
                    e,
                    sdrs::Error::InvalidRequest(_)
                        | sdrs::Error::InvalidSize { .. }
                        | sdrs::Error::UnknownSampler { .. }
                ),
                message: e.to_string(),
            }),
        }
    }
}

fn server_error(e: sdrs::Error) -> JobError {
    JobError {
        message: e.to_string(),
        bad_request: false,
    }
}

/// Encodes an image with its infotext and writes it as the CLI does.
fn save(out: &mut OutputDir, image: &GeneratedImage) -> sdrs::Result<FinishedImage> {
    let png = encode_png(&image.image, Some(&image.infotext))?;
    let path = out.write_sample(image.seed, "png", &png)?;
    Ok(FinishedImage {
        seed: image.seed,
        infotext: image.infotext.clone(),
        path,
        png: Arc::new(png),
    })
}
