//! A layer's bytes on their way to the tar reader: decompression, the cap on the uncompressed size, the
//! diff_id hash, and the cap on what the tar reader buffers for one entry's headers.

use std::cell::{Cell, RefCell};
use std::io::{self, Read};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Descriptor, MediaType};
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;

pub(super) const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Most bytes the tar reader may read between two entries. It keeps PAX records, GNU long names and
/// sparse maps in memory whole, so without this one entry's headers could take as much memory as the layer
/// is large. Real headers (a long path, a few xattrs) are a few KiB.
pub(super) const MAX_ENTRY_HEADERS: u64 = 1 << 20;

#[derive(Clone, Copy)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(super) fn of(desc: &Descriptor) -> Result<Self, ImageError> {
        match desc.media_type() {
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Ok(Compression::None),
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Ok(Compression::Gzip),
            MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Ok(Compression::Zstd),
            MediaType::Other(s) if s == DOCKER_LAYER_GZIP || s == DOCKER_FOREIGN_LAYER_GZIP => {
                Ok(Compression::Gzip)
            }
            other => Err(ImageError::UnsupportedLayer {
                digest: desc.digest().to_string(),
                media_type: other.to_string(),
            }),
        }
    }

    /// Wraps `blob` in the matching streaming decompressor.
    pub(super) fn decoder<'a, R: Read + 'a>(self, blob: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(blob),
            // Multi-member: pigz and some registries concatenate gzip streams.
            Compression::Gzip => Box::new(MultiGzDecoder::new(blob)),
            // Reads concatenated frames too; its default window cap (128 MiB) bounds its memory.
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
        })
    }
}

/// The uncompressed tar stream of a layer. Counts what comes out, fails as soon as more than `limit`
/// bytes did (never asking the decompressor for more than one byte past it, so a bomb is not inflated
/// further), and hashes it when a diff_id is to be checked.
pub(super) struct LayerStream<R> {
    inner: R,
    limit: u64,
    read: u64,
    over_limit: bool,
    hasher: Option<Sha256>,
}

impl<R: Read> LayerStream<R> {
    pub(super) fn new(inner: R, limit: u64, hash: bool) -> Self {
        LayerStream { inner, limit, read: 0, over_limit: false, hasher: hash.then(Sha256::new) }
    }

    /// Whether reading stopped because the layer is larger than the limit.
    pub(super) fn over_limit(&self) -> bool {
        self.over_limit
    }

    /// Uncompressed bytes read so far.
    pub(super) fn consumed(&self) -> u64 {
        self.read
    }

    /// Reads what follows the tar end marker (the tar reader stops there), still capped and hashed, so the
    /// diff_id covers the whole stream and the decompressor checks its trailer.
    pub(super) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    /// `sha256:<hex>` of everything read, if hashing.
    pub(super) fn diff_id(&mut self) -> Option<String> {
        self.hasher.take().map(|h| format!("sha256:{:x}", h.finalize()))
    }
}

impl<R: Read> Read for LayerStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let too_large = || io::Error::other("layer is larger than its uncompressed size limit");
        if self.over_limit {
            return Err(too_large());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.limit - self.read;
        if room == 0 {
            // At the limit: one more byte, and the layer is over it.
            let n = self.inner.read(&mut [0u8])?;
            if n == 0 {
                return Ok(0);
            }
            self.read += 1;
            self.over_limit = true;
            return Err(too_large());
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.read += n as u64;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Watches what the tar reader reads between two entries, which is all headers once the previous entry's
/// data is consumed: it caps that (the reader keeps PAX records and GNU long names in memory whole) and
/// keeps a copy, from which [`super::pax`] frames the PAX records itself.
#[derive(Default)]
pub(super) struct HeaderTap {
    armed: Cell<bool>,
    /// Bytes read through the tap since the layer's start.
    pos: Cell<u64>,
    /// `pos` when last armed.
    start: Cell<u64>,
    seen: RefCell<Vec<u8>>,
}

impl HeaderTap {
    /// Call right before asking for the next entry, once the previous one's data is consumed.
    pub(super) fn arm(&self) {
        self.seen.borrow_mut().clear();
        self.start.set(self.pos.get());
        self.armed.set(true);
    }

    pub(super) fn disarm(&self) {
        self.armed.set(false);
    }

    /// The headers read for the entry just returned, from the first 512-byte block boundary on (what comes
    /// before it is the previous entry's padding).
    pub(super) fn headers(&self) -> Vec<u8> {
        let padding = (512 - self.start.get() % 512) % 512;
        let seen = self.seen.borrow();
        usize::try_from(padding).ok().and_then(|p| seen.get(p..)).unwrap_or_default().to_vec()
    }

    /// A reader of `inner` that goes through this tap.
    pub(super) fn reader<R: Read>(&self, inner: R) -> Tapped<'_, R> {
        Tapped { inner, tap: self }
    }
}

pub(super) struct Tapped<'t, R> {
    inner: R,
    tap: &'t HeaderTap,
}

impl<R: Read> Read for Tapped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tap = self.tap;
        if !tap.armed.get() {
            let n = self.inner.read(buf)?;
            tap.pos.set(tap.pos.get() + n as u64);
            return Ok(n);
        }
        let mut seen = tap.seen.borrow_mut();
        let left = MAX_ENTRY_HEADERS.saturating_sub(seen.len() as u64);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a tar entry's headers take more than {MAX_ENTRY_HEADERS} bytes"),
            ));
        }
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        seen.extend_from_slice(&buf[..n]);
        tap.pos.set(tap.pos.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_stream_stops_one_byte_past_the_limit() {
        let data = [7u8; 100];
        let mut stream = LayerStream::new(&data[..], 10, true);
        let mut buf = [0u8; 64];
        assert_eq!(stream.read(&mut buf).expect("up to the limit"), 10);
        assert!(stream.read(&mut buf).is_err());
        assert!(stream.over_limit());
        assert_eq!(stream.consumed(), 11, "read one byte past the limit only");
        assert!(stream.read(&mut buf).is_err(), "stays failed");

        let mut stream = LayerStream::new(&data[..10], 10, true);
        stream.drain().expect("exactly the limit is fine");
        assert!(!stream.over_limit());
        assert_eq!(stream.diff_id(), Some(format!("sha256:{:x}", Sha256::digest(&data[..10]))));
    }

    #[test]
    fn header_tap_caps_and_copies_only_while_armed() {
        let data: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let tap = HeaderTap::default();
        let mut reader = tap.reader(&data[..]);
        let mut buf = vec![0u8; 1000];
        assert_eq!(reader.read(&mut buf[..700]).expect("unarmed"), 700);
        tap.arm();
        reader.read_exact(&mut buf[..900]).expect("armed");
        tap.disarm();
        assert_eq!(reader.read(&mut buf[..100]).expect("unarmed again"), 100);
        // Armed at 700: the next block boundary is 1024, 324 bytes in.
        assert_eq!(tap.headers(), &data[1024..1600]);

        let big = vec![0u8; MAX_ENTRY_HEADERS as usize + 1];
        let tap = HeaderTap::default();
        let mut reader = tap.reader(&big[..]);
        tap.arm();
        let err = io::copy(&mut reader, &mut io::sink()).expect_err("capped");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
