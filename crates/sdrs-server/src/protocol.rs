//! What the server and its worker process say to each other over the worker's stdin and
//! stdout.
//!
//! A frame is two little-endian `u32` lengths, a JSON message of the first length, then a
//! binary attachment of the second (raw RGB for init images and previews, PNG for finished
//! images). Both lengths are checked against limits before anything is allocated, so a
//! confused peer cannot make the other side allocate gigabytes.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use sdrs::pipeline::Generation;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::queue::JobError;

/// Largest JSON message of a frame: a request with two 64 KiB prompts, an infotext, an error.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest attachment: the largest init image the server decodes (8192², 192 MiB as RGB), or
/// the PNG of the largest image made (4096²; PNG of noise is a little larger than its pixels).
pub const MAX_ATTACHMENT_BYTES: usize = 256 << 20;

/// Where the worker runs its networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

/// The server's messages to the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// The first message: how to build models and where to save images.
    Setup {
        device: DeviceSpec,
        /// `--lowmem`: one network resident at a time.
        lowmem: bool,
        fast: bool,
        /// Whether an image with NaN or infinite values fails (`--no-nan-check` turns it off).
        nan_check: bool,
        outdir: PathBuf,
        /// Where `<lora:NAME>` finds `NAME`.
        lora_dir: Option<PathBuf>,
        /// The embeddings folder the models are loaded with.
        embeddings_dir: Option<PathBuf>,
    },
    /// Free the model, load this one. Answered with `Loaded` or `Done` with an error.
    Load { job: u64, path: PathBuf },
    /// Make the request's images. The attachment is the init image's RGB pixels when `init`
    /// gives its size (img2img).
    Generate {
        job: u64,
        request: Box<Generation>,
        init: Option<(u32, u32)>,
    },
    /// Scan the LoRA and embeddings folders again (`POST /sdapi/v1/refresh-loras`,
    /// `/refresh-embeddings`); sent between jobs, not answered.
    Rescan,
    /// Stop job `job` at its next step, keeping the images made.
    Interrupt { job: u64 },
    /// Give up job `job`'s current image and go on with the next.
    Skip { job: u64 },
}

/// The worker's messages to the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Setup is done; `pid` is the worker's process id.
    Ready { pid: u32 },
    /// The model of `Load` job `job` is loaded (the job is over).
    Loaded { job: u64, hash: Option<String> },
    /// A sampling step finished; the attachment is the preview's RGB pixels when `preview`
    /// gives its size.
    Step {
        job: u64,
        image: usize,
        images: usize,
        step: usize,
        steps: usize,
        preview: Option<(u32, u32)>,
    },
    /// An image is finished and saved at `path`; the attachment is its PNG.
    Image {
        job: u64,
        index: usize,
        seed: u64,
        infotext: String,
        path: PathBuf,
    },
    /// Job `job` is over: done, interrupted (no error) or failed.
    Done { job: u64, error: Option<JobError> },
}

/// Writes one frame and flushes it.
pub fn write_frame<M: Serialize>(out: &mut impl Write, message: &M, data: &[u8]) -> io::Result<()> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    check_lengths(json.len(), data.len())?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&(data.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.write_all(data)?;
    out.flush()
}

/// Reads one frame; `None` at the end of the stream (between frames).
pub fn read_frame<M: DeserializeOwned>(input: &mut impl Read) -> io::Result<Option<(M, Vec<u8>)>> {
    let mut lengths = [0u8; 8];
    let mut filled = 0;
    while filled < lengths.len() {
        match input.read(&mut lengths[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let json_len = u32::from_le_bytes([lengths[0], lengths[1], lengths[2], lengths[3]]) as usize;
    let data_len = u32::from_le_bytes([lengths[4], lengths[5], lengths[6], lengths[7]]) as usize;
    check_lengths(json_len, data_len)?;
    let mut json = vec![0; json_len];
    input.read_exact(&mut json)?;
    let mut data = vec![0; data_len];
    input.read_exact(&mut data)?;
    let message = serde_json::from_slice(&json).map_err(io::Error::other)?;
    Ok(Some((message, data)))
}

fn check_lengths(json: usize, data: usize) -> io::Result<()> {
    if json > MAX_MESSAGE_BYTES || data > MAX_ATTACHMENT_BYTES {
        return Err(io::Error::other(format!(
            "a frame of {json} + {data} bytes; at most {MAX_MESSAGE_BYTES} + \
             {MAX_ATTACHMENT_BYTES} (MAX_MESSAGE_BYTES + MAX_ATTACHMENT_BYTES)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_their_attachments_and_floats_exactly() {
        let request = sdrs::pipeline::GenerationRequest {
            prompt: "a (cat:1.1)\n\"quoted\"".into(),
            cfg_scale: 7.123456789012345,
            denoising_strength: 0.1 + 0.2,
            eta: Some(f64::MIN_POSITIVE),
            hr_scale: 1.0 / 3.0,
            seed: -5,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let mut bytes = Vec::new();
        let message = ToWorker::Generate {
            job: 7,
            request: Box::new(request.clone()),
            init: Some((2, 1)),
        };
        write_frame(&mut bytes, &message, &[1, 2, 3, 4, 5, 6]).unwrap();
        write_frame(&mut bytes, &ToWorker::Interrupt { job: 7 }, &[]).unwrap();
        let mut input = bytes.as_slice();
        let (read, data) = read_frame::<ToWorker>(&mut input).unwrap().unwrap();
        match read {
            ToWorker::Generate {
                job: 7,
                request: got,
                init: Some((2, 1)),
            } => assert_eq!(*got, request),
            other => panic!("{other:?}"),
        }
        assert_eq!(data, [1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            read_frame::<ToWorker>(&mut input).unwrap(),
            Some((ToWorker::Interrupt { job: 7 }, _))
        ));
        assert!(read_frame::<ToWorker>(&mut input).unwrap().is_none());
    }

    #[test]
    fn the_largest_init_image_fits_in_a_frame() {
        let rgb = sdrs::limits::MAX_INPUT_PIXELS as usize * 3;
        assert!(rgb <= MAX_ATTACHMENT_BYTES, "{rgb}");
    }

    #[test]
    fn oversized_or_cut_frames_are_errors_before_any_allocation() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        let e = read_frame::<ToWorker>(&mut huge.as_slice()).unwrap_err();
        assert!(e.to_string().contains("MAX_MESSAGE_BYTES"), "{e}");
        let cut = [5u8, 0, 0];
        let e = read_frame::<ToWorker>(&mut cut.as_slice()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
