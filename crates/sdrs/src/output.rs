//! Writing images the way every front end saves them: numbered names, atomic writes, never
//! overwriting a file and never following a link.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::RgbImage;

use crate::image_io::{encode_jpeg, encode_png};
use crate::pipeline::GeneratedImage;
use crate::{Error, Result};

/// The file formats images are saved in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG, with the infotext in a `parameters` text chunk (as A1111 writes it).
    #[default]
    Png,
    /// JPEG at quality 95, with the infotext as the EXIF `UserComment` (as A1111 writes it).
    Jpeg,
}

impl ImageFormat {
    /// The file name extension.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
        }
    }

    /// The file's bytes, `infotext` embedded where the format keeps it.
    pub fn encode(self, image: &RgbImage, infotext: Option<&str>) -> Result<Vec<u8>> {
        match self {
            ImageFormat::Png => encode_png(image, infotext),
            ImageFormat::Jpeg => encode_jpeg(image, infotext),
        }
    }
}

/// An image written to its file.
#[derive(Debug, Clone)]
pub struct Saved {
    /// Where it was written.
    pub path: PathBuf,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// The output folder of a run and the numbering of what is written into it.
pub struct OutputDir {
    dir: PathBuf,
    next: usize,
}

/// The numbers already used by names like `00042-1234.png` or `grid-0007.png`.
fn highest_index(dir: &Path, prefix: &str) -> Option<usize> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digits: String = name
                .strip_prefix(prefix)?
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .max()
}

impl OutputDir {
    /// Creates the folder if needed and checks that it can be written, before any work is done.
    pub fn prepare(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (_, probe) = create_temporary(dir, "sdrs-write-test")?;
        let _ = fs::remove_file(&probe);
        let next = highest_index(dir, "").map_or(0, |n| n + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            next,
        })
    }

    /// Saves a generated image as `<NNNNN>-<seed>.<ext>`, with its infotext where the format
    /// keeps one.
    pub fn save(&mut self, image: &GeneratedImage, format: ImageFormat) -> Result<Saved> {
        let bytes = format.encode(&image.image, Some(&image.infotext))?;
        let path = self.write_sample(image.seed, format.extension(), &bytes)?;
        Ok(Saved { path, bytes })
    }

    /// Writes `<NNNNN>-<seed>.<ext>` and returns its path (a wrapped negative seed is named
    /// as it was given).
    pub fn write_sample(&mut self, seed: u64, ext: &str, bytes: &[u8]) -> Result<PathBuf> {
        let seed = crate::pipeline::signed_seed(seed);
        loop {
            let path = self.dir.join(format!("{:05}-{seed}.{ext}", self.next));
            self.next += 1;
            if write_new(&path, bytes)? {
                return Ok(path);
            }
        }
    }

    /// Writes `grid-NNNN.<ext>` with the next free number and returns its path.
    pub fn write_grid(&self, ext: &str, bytes: &[u8]) -> Result<PathBuf> {
        let mut n = highest_index(&self.dir, "grid-").map_or(0, |n| n + 1);
        loop {
            let path = self.dir.join(format!("grid-{n:04}.{ext}"));
            if write_new(&path, bytes)? {
                return Ok(path);
            }
            n += 1;
        }
    }
}

/// Writes a new file atomically: the bytes go to a fresh temporary file, which is then linked
/// under `path`. Readers never see half a file; an existing name — a file, a folder or a
/// symbolic link — is never replaced or written through. Returns false when the name was taken.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (mut file, tmp) = create_temporary(dir, "sdrs")?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // link(2) fails with EEXIST on any existing name, a dangling link included, and never
    // follows one.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Numbers the temporary files of this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Opens a new file `.<stem>.<pid>.<n>.tmp` in `dir` that did not exist before, without
/// following links: a name planted by someone else (a link to a file elsewhere) is skipped,
/// never opened.
fn create_temporary(dir: &Path, stem: &str) -> Result<(fs::File, PathBuf)> {
    let mut last = None;
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{stem}.{}.{n}.tmp", std::process::id()));
        match create_exclusive(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => last = Some(e),
            // procfs and the like answer "No such file or directory" in a folder that exists.
            Err(e) if e.kind() == ErrorKind::NotFound && dir.is_dir() => {
                let reason =
                    format!("the folder exists but its file system refuses new files ({e})");
                return Err(Error::io(dir, std::io::Error::other(reason)));
            }
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    Err(Error::io(
        dir,
        last.unwrap_or_else(|| ErrorKind::AlreadyExists.into()),
    ))
}

/// `open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644)`.
fn create_exclusive(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW).mode(0o644);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_continues_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("sdrs-out-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("00007-5.png"), b"old").unwrap();
        let mut out = OutputDir::prepare(&dir).unwrap();
        let a = out.write_sample(42, "png", b"new").unwrap();
        assert_eq!(a.file_name().unwrap(), "00008-42.png");
        assert_eq!(fs::read(dir.join("00007-5.png")).unwrap(), b"old");
        fs::write(dir.join("00009-43.png"), b"taken").unwrap();
        let b = out.write_sample(43, "png", b"x").unwrap();
        assert_eq!(b.file_name().unwrap(), "00010-43.png");
        assert_eq!(fs::read(dir.join("00009-43.png")).unwrap(), b"taken");
        let g = out.write_grid("png", b"g").unwrap();
        assert_eq!(g.file_name().unwrap(), "grid-0000.png");
        assert!(!fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn links_are_never_written_through_or_replaced() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("sdrs-links-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("out")).unwrap();
        let victim = dir.join("victim.txt");
        fs::write(&victim, b"precious").unwrap();
        let out = dir.join("out");
        // Links planted at the next image's name, at every temporary name this process would
        // try first, and at the write test's name.
        symlink(&victim, out.join("00000-1.png")).unwrap();
        symlink(&victim, out.join("dangling.png")).unwrap();
        let first = COUNTER.load(Ordering::Relaxed);
        for n in first..first + 8 {
            for stem in ["sdrs", "sdrs-write-test"] {
                let name = format!(".{stem}.{}.{n}.tmp", std::process::id());
                symlink(&victim, out.join(name)).unwrap();
            }
        }
        let mut output = OutputDir::prepare(&out).unwrap();
        let written = output.write_sample(1, "png", b"image").unwrap();
        assert_eq!(written.file_name().unwrap(), "00001-1.png");
        assert!(!write_new(&out.join("dangling.png"), b"x").unwrap());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(out.join("00000-1.png"))
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }
}
