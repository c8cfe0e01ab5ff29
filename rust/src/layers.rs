//! Sub-layer redundancy of OCI layer blobs: decompress each layer (gzip, zstd or plain tar),
//! chunk the uncompressed bytes both content-defined and fixed-size, and account which chunks
//! are new, and how large the new ones are once each is recompressed with zstd on its own.
//!
//! A layer is only added to the index once it was read to the end without error, so a corrupt
//! or truncated blob is reported and leaves the statistics untouched.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

use crate::cdc::{stream::chunk_reader, Chunker};

/// How a layer blob is encoded, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    Gzip,
    Zstd,
    Tar,
}

impl LayerFormat {
    pub fn name(self) -> &'static str {
        match self {
            LayerFormat::Gzip => "gzip",
            LayerFormat::Zstd => "zstd",
            LayerFormat::Tar => "tar",
        }
    }

    /// Recognises a layer from its first 512 bytes; `None` for anything else (configs, manifests).
    pub fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(LayerFormat::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(LayerFormat::Zstd)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(LayerFormat::Tar)
        } else {
            None
        }
    }
}

/// Why one layer could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{path}: cannot read: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: not a layer (neither gzip, zstd nor tar)")]
    NotALayer { path: PathBuf },
    #[error("{path}: corrupt or truncated {format} data: {source}")]
    Decode {
        path: PathBuf,
        format: &'static str,
        source: io::Error,
    },
    #[error("{path}: zstd recompression failed: {source}")]
    Recompress { path: PathBuf, source: io::Error },
}

/// Sizes of one layer that was read to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    pub path: PathBuf,
    pub format: LayerFormat,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub cdc_chunks: u64,
    pub fixed_chunks: u64,
}

/// Totals of one chunking scheme over all layers added so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchemeStats {
    pub chunks: u64,
    pub bytes: u64,
    pub unique_chunks: u64,
    pub unique_bytes: u64,
    /// Sum over unique chunks of their size after zstd compression of each chunk alone.
    pub unique_zstd_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct ChunkEntry {
    len: u32,
    zstd_len: u32,
}

/// One scheme's chunk index. Global state, merged into once per finished layer.
#[derive(Default)]
struct Store {
    seen: HashMap<u128, ChunkEntry>,
    chunks: u64,
    bytes: u64,
}

impl Store {
    fn contains(&self, digest: &u128) -> bool {
        self.seen.contains_key(digest)
    }

    fn stats(&self) -> SchemeStats {
        let (unique_bytes, unique_zstd_bytes) =
            self.seen.values().fold((0u64, 0u64), |(b, z), e| {
                (b + e.len as u64, z + e.zstd_len as u64)
            });
        SchemeStats {
            chunks: self.chunks,
            bytes: self.bytes,
            unique_chunks: self.seen.len() as u64,
            unique_bytes,
            unique_zstd_bytes,
        }
    }
}

/// A layer's chunks before they are merged: new chunks with their compressed sizes.
struct LocalStore<'a> {
    global: &'a Mutex<Store>,
    seen: HashMap<u128, ChunkEntry>,
    chunks: u64,
    bytes: u64,
}

impl<'a> LocalStore<'a> {
    fn new(global: &'a Mutex<Store>) -> Self {
        Self {
            global,
            seen: HashMap::new(),
            chunks: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, chunk: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> io::Result<()> {
        self.chunks += 1;
        self.bytes += chunk.len() as u64;
        let digest = xxh3_128(chunk);
        if self.seen.contains_key(&digest) || lock(self.global).contains(&digest) {
            return Ok(());
        }
        let zstd_len = compressor.compress(chunk)?.len() as u32;
        self.seen.insert(
            digest,
            ChunkEntry {
                len: chunk.len() as u32,
                zstd_len,
            },
        );
        Ok(())
    }

    fn merge(self) {
        let mut global = lock(self.global);
        global.chunks += self.chunks;
        global.bytes += self.bytes;
        for (digest, entry) in self.seen {
            global.seen.entry(digest).or_insert(entry);
        }
    }
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave a half-merged map (merge does not panic), so
    // the data is still consistent: recover it rather than propagate the poison.
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Collects fixed-size chunks out of the stream of content-defined chunks.
struct FixedSplitter {
    size: usize,
    pending: Vec<u8>,
}

impl FixedSplitter {
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut emit: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.pending.is_empty() && bytes.len() >= self.size {
                emit(&bytes[..self.size])?;
                bytes = &bytes[self.size..];
                continue;
            }
            let take = (self.size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == self.size {
                emit(&self.pending)?;
                self.pending.clear();
            }
        }
        Ok(())
    }
}

/// Counts bytes pulled from the underlying (compressed) file and reports progress.
struct CountingReader<'p, R> {
    inner: R,
    count: u64,
    unreported: u64,
    progress: &'p (dyn Fn(u64) + Sync),
}

const PROGRESS_STEP: u64 = 4 << 20;

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        self.unreported += n as u64;
        if self.unreported >= PROGRESS_STEP {
            (self.progress)(self.unreported);
            self.unreported = 0;
        }
        Ok(n)
    }
}

/// Settings of a dedup scan.
#[derive(Debug, Clone, Copy)]
pub struct DedupConfig {
    pub chunker: Chunker,
    pub fixed_size: usize,
    pub zstd_level: i32,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            chunker: Chunker::default(),
            fixed_size: 512 << 10,
            zstd_level: 3,
        }
    }
}

/// The chunk index over all layers added so far, for both chunking schemes.
pub struct DedupIndex {
    config: DedupConfig,
    cdc: Mutex<Store>,
    fixed: Mutex<Store>,
}

impl DedupIndex {
    pub fn new(config: DedupConfig) -> Self {
        Self {
            config,
            cdc: Mutex::default(),
            fixed: Mutex::default(),
        }
    }

    /// Adds layers in parallel on the current rayon pool; one result per input, in order.
    /// `progress` receives increments of compressed bytes read.
    pub fn add_layers(
        &self,
        paths: &[PathBuf],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Vec<Result<LayerReport, LayerError>> {
        paths
            .par_iter()
            .map(|p| self.add_layer(p, progress))
            .collect()
    }

    pub fn add_layer(
        &self,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<LayerReport, LayerError> {
        let open_err = |source| LayerError::Open {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut head = [0u8; 512];
        let head_len = read_up_to(&mut reader, &mut head).map_err(open_err)?;
        let format = LayerFormat::sniff(&head[..head_len])
            .ok_or_else(|| LayerError::NotALayer { path: path.into() })?;
        let counted = CountingReader {
            inner: io::Cursor::new(head[..head_len].to_vec()).chain(reader),
            count: 0,
            unreported: 0,
            progress,
        };

        let mut compressor =
            zstd::bulk::Compressor::new(self.config.zstd_level).map_err(|source| {
                LayerError::Recompress {
                    path: path.into(),
                    source,
                }
            })?;
        let mut fixed_compressor =
            zstd::bulk::Compressor::new(self.config.zstd_level).map_err(|source| {
                LayerError::Recompress {
                    path: path.into(),
                    source,
                }
            })?;
        let mut cdc = LocalStore::new(&self.cdc);
        let mut fixed = LocalStore::new(&self.fixed);
        let mut splitter = FixedSplitter {
            size: self.config.fixed_size,
            pending: Vec::new(),
        };

        let mut on_chunk = |_offset: u64, chunk: &[u8]| -> io::Result<()> {
            cdc.add(chunk, &mut compressor)?;
            splitter.feed(chunk, |piece| fixed.add(piece, &mut fixed_compressor))
        };
        let mut decoder = Decoder::new(format, counted).map_err(open_err)?;
        let result = chunk_reader(&mut decoder, &self.config.chunker, &mut on_chunk);
        let uncompressed = match result {
            Ok(n) => n,
            Err(source) => {
                return Err(LayerError::Decode {
                    path: path.into(),
                    format: format.name(),
                    source,
                })
            }
        };
        if !splitter.pending.is_empty() {
            let tail = std::mem::take(&mut splitter.pending);
            fixed
                .add(&tail, &mut fixed_compressor)
                .map_err(|source| LayerError::Recompress {
                    path: path.into(),
                    source,
                })?;
        }
        let counted = decoder.into_inner();
        (progress)(counted.unreported);
        let report = LayerReport {
            path: path.into(),
            format,
            compressed_bytes: counted.count,
            uncompressed_bytes: uncompressed,
            cdc_chunks: cdc.chunks,
            fixed_chunks: fixed.chunks,
        };
        cdc.merge();
        fixed.merge();
        Ok(report)
    }

    pub fn cdc_stats(&self) -> SchemeStats {
        lock(&self.cdc).stats()
    }

    pub fn fixed_stats(&self) -> SchemeStats {
        lock(&self.fixed).stats()
    }

    pub fn config(&self) -> DedupConfig {
        self.config
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The decompressing reader for each layer format.
enum Decoder<R: Read> {
    Gzip(Box<flate2::read::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
    Tar(R),
}

impl<R: Read> Decoder<R> {
    fn new(format: LayerFormat, inner: R) -> io::Result<Self> {
        Ok(match format {
            LayerFormat::Gzip => Decoder::Gzip(Box::new(flate2::read::MultiGzDecoder::new(inner))),
            LayerFormat::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(inner)?),
            LayerFormat::Tar => Decoder::Tar(inner),
        })
    }

    fn into_inner(self) -> R {
        match self {
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish().into_inner(),
            Decoder::Tar(r) => r,
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Tar(r) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_like(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; 512];
        data[257..262].copy_from_slice(b"ustar");
        let mut x = seed | 1;
        data.extend((0..len).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        data
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-layers-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn identical_layers_in_three_encodings_dedup_fully() {
        let dir = tempdir("same");
        let raw = tar_like(3 << 20, 1);
        let paths = vec![
            write(&dir, "a.tar", &raw),
            write(&dir, "b.gz", &gzip(&raw)),
            write(&dir, "c.zst", &zstd::encode_all(&raw[..], 3).unwrap()),
        ];
        let index = DedupIndex::new(DedupConfig::default());
        let reports: Vec<_> = index
            .add_layers(&paths, &|_| {})
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            reports.iter().map(|r| r.format).collect::<Vec<_>>(),
            [LayerFormat::Tar, LayerFormat::Gzip, LayerFormat::Zstd]
        );
        let cdc = index.cdc_stats();
        assert_eq!(cdc.bytes, 3 * raw.len() as u64);
        assert_eq!(cdc.unique_bytes, raw.len() as u64);
        let fixed = index.fixed_stats();
        assert_eq!(fixed.unique_bytes, raw.len() as u64);
        assert_eq!(fixed.unique_chunks, (raw.len() as u64).div_ceil(512 << 10));
        // Random data does not compress: zstd output is slightly larger than the input.
        assert!(cdc.unique_zstd_bytes >= cdc.unique_bytes);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncated_gzip_is_an_error_and_leaves_the_index_untouched() {
        let dir = tempdir("trunc");
        let gz = gzip(&tar_like(1 << 20, 2));
        let path = write(&dir, "broken.gz", &gz[..gz.len() / 2]);
        let index = DedupIndex::new(DedupConfig::default());
        let err = index.add_layer(&path, &|_| {}).unwrap_err();
        assert!(
            matches!(err, LayerError::Decode { format: "gzip", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("broken.gz"));
        assert_eq!(index.cdc_stats(), SchemeStats::default());
        let json = write(&dir, "config.json", b"{\"architecture\":\"amd64\"}");
        assert!(matches!(
            index.add_layer(&json, &|_| {}),
            Err(LayerError::NotALayer { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fixed_splitter_emits_exact_sizes() {
        let mut s = FixedSplitter {
            size: 10,
            pending: Vec::new(),
        };
        let mut out = Vec::new();
        for piece in [&[1u8; 3][..], &[2; 25], &[3; 2], &[4; 4]] {
            s.feed(piece, |c| {
                out.push(c.len());
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(out, vec![10, 10, 10]);
        assert_eq!(s.pending, vec![4; 4]);
    }
}
