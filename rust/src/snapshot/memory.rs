//! The memory section of a snapshot: what `memory.bin` holds, its identity, and for a diff
//! snapshot the base it applies to and which pages it stores.
//!
//! A full snapshot's `memory.bin` is the whole guest RAM. A diff snapshot's `memory.bin` has the
//! same size but holds only the pages set in its page bitmap (the rest are holes); every other
//! page comes from its base, which may itself be a diff. A restore maps the base chain
//! copy-on-write, oldest first, each diff's pages over the one before.
//!
//! The identity of a snapshot's memory is a 256-bit BLAKE3 digest of its content, computed while
//! the pages are written (see [`IdHasher`]): for a full snapshot over (page index, page hash) of
//! every non-zero page; for a diff over the base's identity and (page index, page hash) of every
//! page it stores. It is the snapshot's one identity: a diff records its base's identity and a
//! restore refuses a base whose identity differs, and Python verifies `memory.bin` against it
//! ([`snapshot_memory_id`]). Being cryptographic, a file that matches it holds the memory the
//! VMM wrote, whoever wrote the file.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::codec::{bounded, bounded_string};
use super::state::MAX_MEMORY_SIZE;
use super::{open_regular, Snapshot, SnapshotError, MEMORY_FILE};

pub const PAGE_SIZE: usize = 4096;
/// Longest base chain a restore follows (a diff of a diff of ...); deeper chains, and cycles,
/// are refused.
pub const MAX_CHAIN: usize = 16;
/// Longest recorded base path decoded (a sibling name is at most a few hundred bytes).
const MAX_BASE_PATH: usize = 4096;

/// 256-bit content identity of a snapshot's memory (a BLAKE3 digest, see [`IdHasher`]).
pub type MemoryId = [u8; 32];

/// The base a diff snapshot was taken against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The base snapshot directory, relative to the diff's directory when it was given that way
    /// (so a store can be moved as a whole), else absolute.
    #[serde(deserialize_with = "base_path")]
    pub path: String,
    /// The base's memory identity when the diff was taken.
    pub id: MemoryId,
    /// Size and modification time (ns) of the base's `memory.bin` then: if either changed, a
    /// restore hashes the base's content again before trusting it.
    pub memory_len: u64,
    pub memory_mtime_ns: i64,
}

fn base_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounded_string(d, MAX_BASE_PATH, "a base path")
}

/// What `memory.bin` holds, as `vmstate.bin` records it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryState {
    pub id: MemoryId,
    pub base: Option<BaseRef>,
    /// For a diff: one bit per page of RAM (least significant bit first), set for the pages
    /// stored in this snapshot's `memory.bin`.
    #[serde(deserialize_with = "page_bitmap")]
    pub pages: Option<Vec<u8>>,
}

fn page_bitmap<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    #[derive(Deserialize)]
    struct Bitmap(#[serde(deserialize_with = "bitmap_bytes")] Vec<u8>);
    fn bitmap_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        bounded(d, bitmap_len(MAX_MEMORY_SIZE), "bytes of page bitmap")
    }
    Ok(Option::<Bitmap>::deserialize(d)?.map(|b| b.0))
}

impl MemoryState {
    /// The page bitmap fits a RAM of `memory_size` bytes, and only a diff has one.
    pub fn check(&self, memory_size: u64) -> Result<(), String> {
        let expected = bitmap_len(memory_size);
        match (&self.base, &self.pages) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("a full snapshot carries a page bitmap".into()),
            (Some(_), None) => Err("a diff snapshot carries no page bitmap".into()),
            (Some(_), Some(p)) if p.len() != expected => Err(format!(
                "the page bitmap has {} bytes, but {} MiB of RAM needs {expected}",
                p.len(),
                memory_size >> 20
            )),
            (Some(_), Some(_)) => Ok(()),
        }
    }

    /// Number of pages a diff stores (0 for a full snapshot).
    pub fn stored_pages(&self) -> u64 {
        self.pages
            .as_deref()
            .map_or(0, |p| p.iter().map(|b| u64::from(b.count_ones())).sum())
    }
}

/// Bytes of a bitmap with one bit per page of `memory_size` bytes of RAM.
pub fn bitmap_len(memory_size: u64) -> usize {
    (memory_size / PAGE_SIZE as u64).div_ceil(8) as usize
}

pub fn bit(bitmap: &[u8], page: usize) -> bool {
    bitmap[page / 8] & (1 << (page % 8)) != 0
}

pub fn set_bit(bitmap: &mut [u8], page: usize) {
    bitmap[page / 8] |= 1 << (page % 8);
}

/// Runs `(first page, page count)` of set bits among pages `[from, to)`.
pub fn runs(bitmap: &[u8], from: usize, to: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut page = from;
    while page < to {
        if bitmap[page / 8] == 0 && page.is_multiple_of(8) {
            page += 8;
            continue;
        }
        if !bit(bitmap, page) {
            page += 1;
            continue;
        }
        let start = page;
        while page < to && bit(bitmap, page) {
            page += 1;
        }
        out.push((start, page - start));
    }
    out
}

/// Accumulates a memory identity page by page.
///
/// Each page is hashed on its own (BLAKE3 of its 4 KiB, whose four 1 KiB chunks are compressed
/// side by side in SIMD lanes), and the identity is BLAKE3, in the `derive_key` mode with a
/// context of its own, over fixed 40-byte records: the page index (u64, little-endian) and the
/// page's hash, in ascending page order. A diff's records follow its base's identity. Fixed-size
/// records make the encoding unambiguous, so two memories with the same identity would need a
/// BLAKE3 collision; hashing whole pages rather than an index-prefixed stream keeps the page
/// hashes on the fast, chunk-aligned path.
pub struct IdHasher(blake3::Hasher);

/// Context strings of the two kinds of identity (BLAKE3 `derive_key`): a full snapshot's
/// identity can never equal a diff's.
const FULL_CONTEXT: &str = "supermachine 2026 snapshot memory identity: full";
const DIFF_CONTEXT: &str = "supermachine 2026 snapshot memory identity: diff";

impl IdHasher {
    pub fn full() -> Self {
        IdHasher(blake3::Hasher::new_derive_key(FULL_CONTEXT))
    }

    pub fn diff(base: &MemoryId) -> Self {
        let mut h = blake3::Hasher::new_derive_key(DIFF_CONTEXT);
        h.update(base);
        IdHasher(h)
    }

    /// Adds page `index` holding `bytes` (one page); pages must come in ascending order.
    pub fn page(&mut self, index: usize, bytes: &[u8]) {
        let mut record = [0u8; 40];
        record[..8].copy_from_slice(&(index as u64).to_le_bytes());
        record[8..].copy_from_slice(blake3::hash(bytes).as_bytes());
        self.0.update(&record);
    }

    /// Adds the pages of `run` (whole pages), the first of which is page `first`: the same
    /// records as [`IdHasher::page`] for each, with the page hashes of a long run computed on
    /// all cores (rayon's pool). For checking a file in the owner's process, not in a worker,
    /// whose threads its pids limit bounds.
    pub fn pages(&mut self, first: usize, run: &[u8]) {
        use rayon::prelude::*;
        // Below this many pages a thread hand-off costs more than it saves.
        const PARALLEL_PAGES: usize = 64;
        if run.len() < PARALLEL_PAGES * PAGE_SIZE {
            for (i, bytes) in run.chunks_exact(PAGE_SIZE).enumerate() {
                self.page(first + i, bytes);
            }
            return;
        }
        let hashes: Vec<blake3::Hash> = run.par_chunks_exact(PAGE_SIZE).map(blake3::hash).collect();
        for (i, hash) in hashes.iter().enumerate() {
            let mut record = [0u8; 40];
            record[..8].copy_from_slice(&((first + i) as u64).to_le_bytes());
            record[8..].copy_from_slice(hash.as_bytes());
            self.0.update(&record);
        }
    }

    pub fn finish(self) -> MemoryId {
        *self.0.finalize().as_bytes()
    }
}

/// Hex form of an identity, for messages and metadata.
pub fn id_hex(id: &MemoryId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// One file of a restore's memory chain: the snapshot's `memory.bin` and, for a diff, which of
/// its pages apply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryLayer {
    pub path: PathBuf,
    pub pages: Option<Vec<u8>>,
    /// The layer's snapshot memory identity (the whole chain up to and including it).
    pub id: MemoryId,
    /// The file, when it is already open (checked when the chain was resolved, or passed in by
    /// descriptor to a worker that cannot open paths); `None`: open `path`.
    #[serde(skip)]
    pub file: Option<LayerFile>,
}

/// An open layer file, shared by clones of the layer list.
#[derive(Debug, Clone)]
pub struct LayerFile(pub std::sync::Arc<File>);

impl PartialEq for LayerFile {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LayerFile {}

/// Size and modification time (ns) of a file, without following a symlink and without
/// opening anything but a regular file.
pub fn file_stamp(path: &Path) -> std::io::Result<(u64, i64)> {
    stamp_of(&open_regular(path)?)
}

pub fn stamp_of(file: &File) -> std::io::Result<(u64, i64)> {
    let m = file.metadata()?;
    Ok((m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()))
}

/// Recomputes a snapshot's memory identity from its `memory.bin` (for a diff: from its stored
/// pages and recorded base identity).
pub fn hash_memory_file(dir: &Path, state: &MemoryState, size: u64) -> Result<MemoryId, String> {
    let path = dir.join(MEMORY_FILE);
    let file = open_regular(&path).map_err(|e| format!("{}: {}", path.display(), e))?;
    hash_memory(&file, &path, state, size)
}

/// The memory identity of the snapshot in `dir`, computed the way its VMM recorded it in
/// `vmstate.bin` (same page bitmap, same base identity): from `memory` when the caller has the
/// file open already (so the file it checked is the file hashed), else from `dir/memory.bin`.
/// Compare the result with the recorded [`MemoryState::id`] to verify the file.
pub fn snapshot_memory_id(dir: &Path, memory: Option<&File>) -> Result<MemoryId, String> {
    let snap = Snapshot::load(dir).map_err(|e| e.to_string())?;
    let size = snap.machine.memory_size;
    match memory {
        Some(file) => hash_memory(file, &dir.join(MEMORY_FILE), &snap.memory, size),
        None => hash_memory_file(dir, &snap.memory, size),
    }
}

/// Pages read per `pread`: large enough that the hash, not the system calls, sets the pace.
const HASH_BLOCK_PAGES: usize = 512;

fn hash_memory(
    file: &File,
    path: &Path,
    state: &MemoryState,
    size: u64,
) -> Result<MemoryId, String> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != size {
        return Err(format!(
            "{} has {len} bytes, expected {size}",
            path.display()
        ));
    }
    let mut h = match (&state.base, &state.pages) {
        (Some(b), Some(_)) => IdHasher::diff(&b.id),
        _ => IdHasher::full(),
    };
    // Read, not mapped: a file truncated while it is hashed (anyone who can write the snapshot
    // directory can do that) is then a read error, not a SIGBUS that kills the process.
    let pages = (size / PAGE_SIZE as u64) as usize;
    let mut buf = vec![0u8; HASH_BLOCK_PAGES.min(pages) * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let n = HASH_BLOCK_PAGES.min(pages - first);
        let block = &mut buf[..n * PAGE_SIZE];
        let wanted = |page: usize| match &state.pages {
            Some(bm) => bit(bm, page),
            None => true,
        };
        if (first..first + n).any(wanted) {
            file.read_exact_at(block, (first * PAGE_SIZE) as u64)
                .map_err(|e| format!("{}: {}", path.display(), crate::vmm::os_msg(&e)))?;
            let include = |i: usize| match &state.pages {
                Some(bm) => bit(bm, first + i),
                None => block[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .any(|&b| b != 0),
            };
            // Runs of included pages, hashed together (see `IdHasher::pages`).
            let mut i = 0;
            while i < n {
                if !include(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && include(i) {
                    i += 1;
                }
                h.pages(first + start, &block[start * PAGE_SIZE..i * PAGE_SIZE]);
            }
        }
        first += n;
    }
    Ok(h.finish())
}

/// The directory name a diff recorded for its base, if it follows the one rule for recorded
/// bases: `../NAME`, a sibling in the same store. Absolute paths, deeper or higher relative
/// paths would let a snapshot file point a restore at any directory of the host.
pub fn sibling_name(recorded: &str) -> Result<&str, String> {
    let rule = "a recorded base must be a sibling directory `../NAME` in the same store \
                (name another base explicitly)";
    if recorded.starts_with('/') {
        return Err(format!(
            "its recorded path {recorded:?} is absolute; {rule}"
        ));
    }
    match recorded.strip_prefix("../") {
        Some(name)
            if !name.is_empty()
                && name != "."
                && name != ".."
                && !name.contains('/')
                && !name.contains('\0') =>
        {
            Ok(name)
        }
        _ => Err(format!(
            "its recorded path {recorded:?} is not a single name beside the diff; {rule}"
        )),
    }
}

/// Where the base of the snapshot in `dir` recorded as `recorded` lies: `NAME` in the directory
/// holding `dir` (resolved through the caller's own path), refusing a symlink there.
fn sibling_dir(dir: &Path, recorded: &str) -> Result<PathBuf, String> {
    let name = sibling_name(recorded)?;
    let store = dir
        .canonicalize()
        .map_err(|e| format!("{}: {}", dir.display(), crate::vmm::os_msg(&e)))?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "the diff has no parent directory to hold its base".to_string())?;
    let base_dir = store.join(name);
    match std::fs::symlink_metadata(&base_dir) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{} is a symbolic link; a recorded base must be a real directory in the same store",
            base_dir.display()
        )),
        _ => Ok(base_dir),
    }
}

/// The memory chain of the snapshot in `dir` (already loaded as `snap`), base first. Each base
/// is the sibling directory the diff recorded (see [`sibling_name`]), or for the first link
/// `base_override` (the caller's choice, trusted); its identity must match the one the diff
/// recorded. Only regular files are opened, never through a symlink.
pub fn resolve_chain(
    dir: &Path,
    snap: &Snapshot,
    base_override: Option<&Path>,
) -> Result<Vec<MemoryLayer>, SnapshotError> {
    let size = snap.machine.memory_size;
    let mut layers = vec![MemoryLayer {
        path: dir.join(MEMORY_FILE),
        pages: snap.memory.pages.clone(),
        id: snap.memory.id,
        file: None,
    }];
    let mut seen = vec![dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())];
    let mut current_dir = dir.to_path_buf();
    let mut base = snap.memory.base.clone();
    let mut first = true;
    while let Some(b) = base {
        let base_dir = match (first, base_override) {
            (true, Some(p)) => p.to_path_buf(),
            _ => sibling_dir(&current_dir, &b.path).map_err(|why| SnapshotError::Base {
                path: b.path.clone(),
                why,
            })?,
        };
        first = false;
        let shown = base_dir.display().to_string();
        let fail = |why: String| SnapshotError::Base {
            path: shown.clone(),
            why,
        };
        let canonical = base_dir.canonicalize().unwrap_or_else(|_| base_dir.clone());
        if seen.contains(&canonical) {
            return Err(fail("the chain of bases loops back on itself".into()));
        }
        if seen.len() > MAX_CHAIN {
            return Err(fail(format!(
                "the chain of bases is deeper than {MAX_CHAIN} snapshots"
            )));
        }
        seen.push(canonical);
        let base_snap = load_base(&base_dir)?;
        if base_snap.machine.memory_size != size {
            return Err(fail(format!(
                "it has {} MiB of RAM, the diff {} MiB",
                base_snap.machine.memory_size >> 20,
                size >> 20
            )));
        }
        if base_snap.memory.id != b.id {
            return Err(fail(format!(
                "its content hash is {}, but the diff was taken against {}",
                id_hex(&base_snap.memory.id),
                id_hex(&b.id)
            )));
        }
        let memory = base_dir.join(MEMORY_FILE);
        let file = open_regular(&memory).map_err(|e| fail(format!("{}: {e}", memory.display())))?;
        let stamp = stamp_of(&file).map_err(|e| fail(format!("{}: {e}", memory.display())))?;
        if stamp != (b.memory_len, b.memory_mtime_ns) {
            // The file was replaced or touched since the diff was taken: trust only its content.
            let found = hash_memory(&file, &memory, &base_snap.memory, size).map_err(fail)?;
            if found != b.id {
                return Err(fail(format!(
                    "its memory.bin changed: content hash {}, but the diff was taken against {}",
                    id_hex(&found),
                    id_hex(&b.id)
                )));
            }
        }
        layers.push(MemoryLayer {
            path: memory,
            pages: base_snap.memory.pages.clone(),
            id: base_snap.memory.id,
            // The file just checked, so the restore maps this one and not a replacement.
            file: Some(LayerFile(std::sync::Arc::new(file))),
        });
        base = base_snap.memory.base.clone();
        current_dir = base_dir;
    }
    layers.reverse();
    Ok(layers)
}

/// Loads a base snapshot's state; errors name it as the base.
pub fn load_base(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let path = dir.display().to_string();
    Snapshot::load(dir).map_err(|e| match e {
        SnapshotError::Missing { .. } => SnapshotError::BaseMissing { path },
        e => SnapshotError::Base {
            path,
            why: e.to_string(),
        },
    })
}

/// This process's `/proc/self/pagemap`, opened before a worker gives up its view of `/proc`.
static PAGEMAP: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Opens `/proc/self/pagemap` now, for [`written_pages`] after the file system is gone.
pub fn preopen_pagemap() -> std::io::Result<()> {
    if PAGEMAP.get().is_none() {
        let _ = PAGEMAP.set(File::open("/proc/self/pagemap")?);
    }
    Ok(())
}

/// Reads which pages of `[host, host + len)` this process wrote since they were mapped
/// copy-on-write: present (or swapped) pages that are no longer the file's page-cache page.
/// Unlike KVM's dirty log this also sees writes made by the VMM itself (virtio devices), and
/// reading it resets nothing.
pub fn written_pages(host: *const u8, len: usize) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    const BATCH: usize = 1 << 16;
    let opened;
    let pagemap = match PAGEMAP.get() {
        Some(f) => f,
        None => {
            opened = File::open("/proc/self/pagemap")?;
            &opened
        }
    };
    let pages = len / PAGE_SIZE;
    let first = host as u64 / PAGE_SIZE as u64;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; BATCH * 8];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(BATCH);
        pagemap.read_exact_at(&mut buf[..n * 8], (first + done as u64) * 8)?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_OR_SHARED == 0)
        }));
        done += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_checks_the_bitmap() {
        let size = 8 << 20;
        let full = MemoryState {
            id: [7; 32],
            base: None,
            pages: None,
        };
        let round = |m: &MemoryState, size| {
            let back: MemoryState = super::super::codec::decode(&super::super::codec::encode(m))?;
            back.check(size).map(|()| back)
        };
        assert_eq!(round(&full, size).unwrap(), full);
        let mut bm = vec![0u8; bitmap_len(size)];
        set_bit(&mut bm, 3);
        let diff = MemoryState {
            id: [1; 32],
            base: Some(BaseRef {
                path: "../golden".into(),
                id: [2; 32],
                memory_len: size,
                memory_mtime_ns: 1_700_000_000_123_456_789,
            }),
            pages: Some(bm),
        };
        assert_eq!(round(&diff, size).unwrap(), diff);
        assert_eq!(diff.stored_pages(), 1);
        let e = round(&diff, size * 2).unwrap_err();
        assert!(e.contains("page bitmap"), "{e}");
    }

    #[test]
    fn only_a_sibling_name_is_a_recorded_base() {
        assert_eq!(sibling_name("../golden"), Ok("golden"));
        for (bad, rule) in [
            ("/etc", "is absolute"),
            ("../../x", "not a single name"),
            ("a/b", "not a single name"),
            ("golden", "not a single name"),
            ("..", "not a single name"),
            ("../..", "not a single name"),
            ("../.", "not a single name"),
            ("../", "not a single name"),
            ("../a/b", "not a single name"),
        ] {
            let e = sibling_name(bad).unwrap_err();
            assert!(e.contains(rule) && e.contains("../NAME"), "{bad}: {e}");
        }
    }

    use std::os::unix::fs::FileExt;

    #[test]
    fn a_file_hashes_to_the_identity_its_pages_were_written_with() {
        use std::io::Write;
        let size = (HASH_BLOCK_PAGES as u64 + 3) * PAGE_SIZE as u64; // more than one read
        let page = |i: usize| vec![(i % 251) as u8 + 1; PAGE_SIZE];
        let mut f = tempfile_in_tmp();
        let mut full = IdHasher::full();
        for i in 0..(size as usize / PAGE_SIZE) {
            // Every third page all zero: a full snapshot's identity leaves those out.
            let bytes = if i % 3 == 0 {
                vec![0; PAGE_SIZE]
            } else {
                page(i)
            };
            if i % 3 != 0 {
                full.page(i, &bytes);
            }
            f.write_all(&bytes).unwrap();
        }
        let full_id = full.finish();
        let state = MemoryState::default();
        let path = f.1.clone();
        assert_eq!(hash_memory(f.as_file(), &path, &state, size), Ok(full_id));

        // A diff hashes its base identity and only the pages its bitmap names.
        let mut bm = vec![0u8; bitmap_len(size)];
        let mut diff = IdHasher::diff(&full_id);
        for i in [1, HASH_BLOCK_PAGES + 2] {
            assert!(i % 3 != 0, "a page the file holds non-zero");
            set_bit(&mut bm, i);
            diff.page(i, &page(i));
        }
        let state = MemoryState {
            id: [0; 32],
            base: Some(BaseRef {
                path: "../golden".into(),
                id: full_id,
                memory_len: size,
                memory_mtime_ns: 0,
            }),
            pages: Some(bm),
        };
        assert_eq!(
            hash_memory(f.as_file(), &path, &state, size),
            Ok(diff.finish())
        );

        // Changing one page changes the identity; a file of another size is refused.
        f.as_file()
            .write_all_at(&[9], 2 * PAGE_SIZE as u64)
            .unwrap();
        let changed = hash_memory(f.as_file(), &path, &MemoryState::default(), size).unwrap();
        assert_ne!(changed, full_id);
        let e = hash_memory(f.as_file(), &path, &MemoryState::default(), size * 2).unwrap_err();
        assert!(e.contains("expected"), "{e}");
    }

    #[test]
    fn a_run_of_pages_hashes_like_its_pages_one_by_one() {
        // Long enough for the parallel path, short enough for the sequential one.
        for count in [3, 200] {
            let run: Vec<u8> = (0..count * PAGE_SIZE)
                .map(|i| (i / 7 % 253) as u8)
                .collect();
            let mut one_by_one = IdHasher::full();
            for (i, page) in run.chunks_exact(PAGE_SIZE).enumerate() {
                one_by_one.page(5 + i, page);
            }
            let mut together = IdHasher::full();
            together.pages(5, &run);
            let id = together.finish();
            assert_eq!(id, one_by_one.finish(), "{count} pages");
            // The identity is 32 bytes, depends on where the pages are, and on their kind.
            let mut elsewhere = IdHasher::full();
            elsewhere.pages(6, &run);
            assert_ne!(elsewhere.finish(), id);
            let mut diff = IdHasher::diff(&[0; 32]);
            diff.pages(5, &run);
            assert_ne!(diff.finish(), id);
        }
    }

    #[test]
    fn runs_find_every_stretch() {
        let mut bm = vec![0u8; 4];
        for p in [0, 1, 2, 9, 17, 18, 31] {
            set_bit(&mut bm, p);
        }
        assert_eq!(runs(&bm, 0, 32), vec![(0, 3), (9, 1), (17, 2), (31, 1)]);
        assert_eq!(runs(&bm, 1, 18), vec![(1, 2), (9, 1), (17, 1)]);
    }

    #[test]
    fn written_pages_sees_copy_on_write() {
        use std::io::Write;
        let mut f = tempfile_in_tmp();
        f.write_all(&vec![1u8; 4 * PAGE_SIZE]).unwrap();
        // SAFETY: a private mapping of a file we own; nothing else maps it.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(f.as_file()) }.unwrap();
        let _ = map[0]; // read only: still the file's page
        map[2 * PAGE_SIZE] = 9; // written: a private copy
        let w = written_pages(map.as_ptr(), map.len()).unwrap();
        assert_eq!(w, vec![false, false, true, false]);
    }

    struct Temp(File, PathBuf);
    impl Temp {
        fn as_file(&self) -> &File {
            &self.0
        }
    }
    impl std::io::Write for Temp {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.1);
        }
    }
    fn tempfile_in_tmp() -> Temp {
        // One name per call: tests run in parallel threads of one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sm-memory-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        Temp(f, p)
    }
}
