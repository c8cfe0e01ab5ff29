//! Chunking a `Read` stream of any length in bounded memory, with the same cut points as
//! chunking the whole input at once.

use std::io::{self, Read};

use super::cutter::{Cutter, SCAN_BLOCK};
use super::window::WINDOW;
use super::Chunker;

/// Reads `reader` to the end and calls `on_chunk(offset, bytes)` for each chunk in order.
///
/// The read buffer is a scan block (256 KiB) or two chunks of `max_size`, whichever is larger:
/// large enough that syscall and memmove costs stay small, small enough that what `read` just
/// copied is still in the core's cache when the scan reads it. What is kept between reads (the
/// chunk not yet cut, and the hash window before the next byte to scan) is at most `max_size`
/// bytes. Returns the total number of bytes read.
pub fn chunk_reader<R, E, F>(reader: R, chunker: &Chunker, on_chunk: F) -> Result<u64, E>
where
    R: Read,
    E: From<io::Error>,
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    chunk_reader_with(reader, Cutter::new(*chunker), on_chunk)
}

/// [`chunk_reader`] with a given cutter (a chunker and the kernel it scans with), fresh.
pub fn chunk_reader_with<R, E, F>(
    mut reader: R,
    mut cutter: Cutter,
    mut on_chunk: F,
) -> Result<u64, E>
where
    R: Read,
    E: From<io::Error>,
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    assert_eq!(cutter.scanned(), 0, "a fresh cutter");
    let capacity = SCAN_BLOCK.max(2 * cutter.chunker().max_size());
    let mut buf = vec![0u8; capacity];
    let mut cuts = Vec::new();
    // `buf[..filled]` holds the input from offset `base`; the next chunk starts at `chunk_start`.
    let (mut base, mut filled, mut eof, mut chunk_start) = (0u64, 0usize, false, 0u64);
    loop {
        while !eof && filled < capacity {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => eof = true,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let end = base + filled as u64;
        cutter.scan(&buf[..filled], base, &mut cuts);
        if eof {
            cutter.finish(end, &mut cuts);
        }
        for &cut in &cuts {
            let (from, to) = ((chunk_start - base) as usize, (cut - base) as usize);
            on_chunk(chunk_start, &buf[from..to])?;
            chunk_start = cut;
        }
        cuts.clear();
        if eof {
            return Ok(end);
        }
        // Keep the chunk not yet cut and the window before the next byte to scan.
        let keep = cutter.start().min(cutter.scanned() - WINDOW as u64);
        let from = (keep - base) as usize;
        buf.copy_within(from..filled, 0);
        filled -= from;
        base = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out data in small, uneven pieces, like a pipe or a decompressor.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.step = self.step * 7 % 4093 + 1;
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn streamed_cut_points_equal_whole_buffer_cut_points() {
        let data: Vec<u8> = (0..9_000_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8)
            .collect();
        for chunker in [Chunker::default(), Chunker::new(64, 256, 1024, 2).unwrap()] {
            let whole: Vec<_> = chunker.chunks(&data).collect();
            let mut streamed = Vec::new();
            let total = chunk_reader::<_, io::Error, _>(
                Trickle {
                    data: &data,
                    step: 1,
                },
                &chunker,
                |off, c| {
                    assert_eq!(c, &data[off as usize..off as usize + c.len()]);
                    streamed.push((off as usize, c.len()));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(total, data.len() as u64);
            assert_eq!(streamed, whole);
        }
    }

    #[test]
    fn read_errors_are_returned() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let err = chunk_reader::<_, io::Error, _>(Broken, &Chunker::default(), |_, _| Ok(()))
            .unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }
}
