//! The byte stream under the tar entries: compression detection, hard
//! bounds on what we read, and tar framing (headers, data, padding, the
//! end-of-archive marker and what may follow it).
//!
//! The framing is a few lines written by hand (see `entry.rs` for why we do
//! not use `tar::Archive::entries`); header fields are parsed by the `tar`
//! crate.

use std::fmt;
use std::io::{self, Read};

use super::entry::{parse_header, EntryHeader, BLOCK};
use super::{ArchiveError, Limits, MAX_TRAILING_ZEROS, ZSTD_MAGIC};

/// Largest zstd window we accept when decompressing (16 MiB). Our writer
/// uses level 3, whose window is 2 MiB at most; the cap keeps a crafted
/// frame from making the decoder allocate up to zstd's default 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Marker error produced by [`Bounded`] once its budget is spent.
#[derive(Debug)]
struct BudgetSpent {
    limit: u64,
    decompressed: bool,
}

impl fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "more than {} bytes", self.limit)
    }
}

impl std::error::Error for BudgetSpent {}

/// A reader that fails (rather than ending quietly) after `limit` bytes, so
/// that truncation by the bound can never pass for a short archive.
struct Bounded<R> {
    inner: R,
    remaining: u64,
    limit: u64,
    decompressed: bool,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            // One probe byte tells "exactly at the limit and done" from "more".
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(BudgetSpent {
                    limit: self.limit,
                    decompressed: self.decompressed,
                })),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Map a read error, recognising the bounds.
pub(super) fn read_error(e: io::Error) -> ArchiveError {
    if let Some(spent) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<BudgetSpent>())
    {
        return if spent.decompressed {
            ArchiveError::StreamTooLarge { limit: spent.limit }
        } else {
            ArchiveError::InputTooLarge { limit: spent.limit }
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return ArchiveError::Truncated("unexpected end of input");
    }
    ArchiveError::Read(e)
}

/// The decoded tar stream of a bundle, and whether it was compressed.
pub(super) fn decode<'a, R: Read + Send + 'a>(
    mut reader: R,
    limits: &Limits,
) -> Result<(Box<dyn Read + Send + 'a>, bool), ArchiveError> {
    // Peek at the magic without assuming the reader can seek.
    let mut magic = [0u8; 4];
    let mut have = 0;
    while have < magic.len() {
        match reader.read(&mut magic[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ArchiveError::Read(e)),
        }
    }
    let whole = io::Cursor::new(magic[..have].to_vec()).chain(reader);
    let stream_limit = limits.max_stream_bytes();
    if have == magic.len() && magic == ZSTD_MAGIC {
        let input_limit = limits.max_input_bytes();
        let input = Bounded {
            inner: whole,
            remaining: input_limit,
            limit: input_limit,
            decompressed: false,
        };
        let mut decoder = zstd::stream::read::Decoder::new(input).map_err(ArchiveError::Read)?;
        decoder
            .window_log_max(ZSTD_WINDOW_LOG_MAX)
            .map_err(ArchiveError::Read)?;
        let output = Bounded {
            inner: decoder,
            remaining: stream_limit,
            limit: stream_limit,
            decompressed: true,
        };
        Ok((Box::new(output), true))
    } else {
        let output = Bounded {
            inner: whole,
            remaining: stream_limit,
            limit: stream_limit,
            decompressed: true,
        };
        Ok((Box::new(output), false))
    }
}

/// Tar framing over a decoded stream.
pub(super) struct TarReader<'a> {
    inner: Box<dyn Read + Send + 'a>,
    /// Offset of the next byte of the decoded stream, for messages.
    offset: u64,
}

impl<'a> TarReader<'a> {
    pub fn new(inner: Box<dyn Read + Send + 'a>) -> Self {
        TarReader { inner, offset: 0 }
    }

    /// Read up to `buf.len()` bytes, short only at end of input.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let mut have = 0;
        while have < buf.len() {
            match self.inner.read(&mut buf[have..]) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        self.offset += have as u64;
        Ok(have)
    }

    /// The next entry's header, or `None` at the end-of-archive marker (a
    /// zero block). End of input where a header should be is truncation:
    /// every bundle we write ends with the marker.
    pub fn next_header(&mut self) -> Result<Option<EntryHeader>, ArchiveError> {
        let offset = self.offset;
        let mut block = [0u8; BLOCK];
        match self.fill(&mut block)? {
            0 => return Err(ArchiveError::Truncated("no end-of-archive marker")),
            BLOCK => {}
            _ => return Err(ArchiveError::Truncated("partial tar header")),
        }
        if block.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        parse_header(&block, offset).map(Some)
    }

    /// Stream exactly `size` bytes of entry data to `sink`, then skip the
    /// padding to the next block. Buffers are fixed-size: the header's size
    /// is never used to allocate.
    pub fn read_data(
        &mut self,
        size: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let got = self.fill(&mut buf[..want])?;
            if got < want {
                return Err(ArchiveError::Truncated("entry data ends early"));
            }
            sink(&buf[..got])?;
            left -= got as u64;
        }
        // Padding content is not interpreted (other writers need not zero it).
        let padding = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        if self.fill(&mut buf[..padding])? < padding {
            return Err(ArchiveError::Truncated("entry padding ends early"));
        }
        Ok(())
    }

    /// Read a small entry (already checked against its limit) into memory.
    pub fn read_small(&mut self, size: u64) -> Result<Vec<u8>, ArchiveError> {
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 * 1024));
        self.read_data(size, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// After the end-of-archive marker: only zero bytes, at most
    /// [`MAX_TRAILING_ZEROS`] of them, then the end of the input. For a
    /// compressed bundle this also drives the decoder to the end of the
    /// input, so garbage after the last zstd frame is an error too.
    pub fn finish(mut self) -> Result<(), ArchiveError> {
        let mut buf = [0u8; 4096];
        let mut seen: u64 = 0;
        loop {
            let n = self.fill(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            seen += n as u64;
            if seen > MAX_TRAILING_ZEROS || buf[..n].iter().any(|b| *b != 0) {
                return Err(ArchiveError::TrailingData);
            }
        }
    }
}

/// Drain the decoded stream of `bytes`, returning how many bytes it yielded.
#[cfg(test)]
pub(super) fn drain_for_test(bytes: &[u8], limits: &Limits) -> (u64, Result<(), ArchiveError>) {
    let mut stream = match decode(bytes, limits) {
        Ok((stream, _)) => stream,
        Err(e) => return (0, Err(e)),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Err(read_error(e))),
        }
    }
}
