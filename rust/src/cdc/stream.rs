//! Chunking a `Read` stream of any length in bounded memory, with the same cut points as
//! chunking the whole input at once.

use std::io::{self, Read};

use super::Chunker;

/// Size of the read buffer: large enough that syscall and memmove costs stay small, small enough
/// that what `read` just copied is still in the core's cache when the cut-point scan reads it
/// (measured on a tar of /usr: 66.7 ms against 71.4 ms with a 4 MiB buffer; random bytes: no change).
const BUFFER_SIZE: usize = 256 << 10;

/// Reads `reader` to the end and calls `on_chunk(offset, bytes)` for each chunk in order.
///
/// Memory use is bounded by `max(256 KiB, 2 * max_size)` whatever the input length. Returns the
/// total number of bytes read.
pub fn chunk_reader<R, E, F>(mut reader: R, chunker: &Chunker, mut on_chunk: F) -> Result<u64, E>
where
    R: Read,
    E: From<io::Error>,
    F: FnMut(u64, &[u8]) -> Result<(), E>,
{
    let capacity = BUFFER_SIZE.max(2 * chunker.max_size());
    let mut buf = vec![0u8; capacity];
    let (mut start, mut filled, mut offset, mut eof) = (0usize, 0usize, 0u64, false);
    loop {
        // The cut rule needs max_size bytes of look-ahead (or the true end of the input).
        if !eof && filled - start < chunker.max_size() {
            buf.copy_within(start..filled, 0);
            filled -= start;
            start = 0;
            while filled < capacity {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if start == filled {
            return Ok(offset);
        }
        let len = chunker.cut(&buf[start..filled]);
        on_chunk(offset, &buf[start..start + len])?;
        start += len;
        offset += len as u64;
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
