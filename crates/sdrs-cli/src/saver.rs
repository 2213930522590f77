//! Saving a run's images as they come, then its grid.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use sdrs::image_io::grid;
use sdrs::output::{ImageFormat, OutputDir};
use sdrs::pipeline::GeneratedImage;

/// Writes each image the moment it is done, so that nothing is lost if a later one fails,
/// and keeps the first write error to report after the run stops.
pub struct Saver {
    out: OutputDir,
    format: ImageFormat,
    written: Vec<(PathBuf, RgbImage)>,
    error: Option<anyhow::Error>,
}

impl Saver {
    /// Checks that `dir` can be written before any work is done.
    pub fn prepare(dir: &Path, format: ImageFormat) -> Result<Self> {
        let out = OutputDir::prepare(dir)
            .with_context(|| format!("cannot use the output directory {}", dir.display()))?;
        Ok(Self {
            out,
            format,
            written: Vec::new(),
            error: None,
        })
    }

    /// Saves one image; false when it could not be written (the run should stop).
    pub fn save(&mut self, image: &GeneratedImage) -> bool {
        match self.out.save(image, self.format) {
            Ok(saved) => {
                self.written.push((saved.path, image.image.clone()));
                true
            }
            Err(e) => {
                self.error = Some(e.into());
                false
            }
        }
    }

    /// The first write error, which stopped the run.
    pub fn take_error(&mut self) -> Option<anyhow::Error> {
        self.error.take()
    }

    /// After a run that went well: the grid of the images (more than one, `columns` wide,
    /// unless `skip_grid`), and the paths written, in order.
    pub fn finish(self, columns: usize, skip_grid: bool) -> Result<Vec<PathBuf>> {
        if !skip_grid && self.written.len() > 1 {
            let images: Vec<RgbImage> = self.written.iter().map(|(_, i)| i.clone()).collect();
            if let Some(g) = grid(&images, columns) {
                let bytes = self.format.encode(&g, None)?;
                let path = self.out.write_grid(self.format.extension(), &bytes)?;
                eprintln!("grid: {}", path.display());
            }
        }
        Ok(self.written.into_iter().map(|(path, _)| path).collect())
    }
}
