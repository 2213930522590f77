//! Writing images the way every front end saves them: numbered names, atomic writes, never
//! overwriting a file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

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
        let probe = dir.join(format!(".sdrs-write-test-{}", std::process::id()));
        fs::write(&probe, b"").map_err(|e| Error::io(dir, e))?;
        let _ = fs::remove_file(&probe);
        let next = highest_index(dir, "").map_or(0, |n| n + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            next,
        })
    }

    /// Writes `<NNNNN>-<seed>.<ext>` and returns its path.
    pub fn write_sample(&mut self, seed: u64, ext: &str, bytes: &[u8]) -> Result<PathBuf> {
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

/// Writes a file atomically (temporary file, then a link that fails if the name exists):
/// readers never see half a file and an existing file is never replaced. Returns false when
/// the name was taken.
fn write_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
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
}
