//! Byte sources: files opened for whole-range work are memory-mapped, so a multi-GiB guest RAM
//! file is hashed without being copied and without exceeding RAM.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

/// Why a file could not be opened as a byte source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot map {path} into memory: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
}

/// A read-only view of a whole file.
pub struct MappedFile {
    // None for an empty file: mapping zero bytes is an error on Linux.
    map: Option<Mmap>,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.into(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| SourceError::Open {
            path: path.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(SourceError::NotAFile { path: path.into() });
        }
        if meta.len() == 0 {
            return Ok(Self { map: None });
        }
        // SAFETY: the map is read-only and private to this process. If another process truncates
        // the file while it is mapped, reads past the new end raise SIGBUS; that is the documented
        // contract of every mmap-based reader and is why callers only map files they own or that
        // are immutable (content-addressed blobs, snapshots).
        let map = unsafe { MmapOptions::new().map(&file) }.map_err(|source| SourceError::Map {
            path: path.into(),
            source,
        })?;
        // Sequential access lets the kernel read ahead aggressively; failure is harmless.
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Self { map: Some(map) })
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}
