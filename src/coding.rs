//! HTTP content codings ctxgate can read: `gzip`, `deflate` (zlib-wrapped or raw), `br` and
//! `zstd`, as push decoders (fed chunks as they arrive: the usage tap reads compressed answers
//! this way) and as a bounded whole-body decode (a compressed request body, decoded for
//! pruning). Decoding is always bounded: a decompression bomb stops at the caller's limit.

use std::io::Write as _;

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A coding ctxgate does not read (`compress`, a list of codings, …).
    #[error("content encoding {0:?} is not one ctxgate decodes (gzip, deflate, br, zstd)")]
    Unknown(String),
    /// The bytes are not valid in that coding.
    #[error("body is not valid {0}")]
    Corrupt(String),
    /// The decoded body is larger than the limit.
    #[error("decoded body is larger than {0} bytes")]
    TooLarge(usize),
}

/// Decodes a whole body in `encoding`, stopping as soon as the output passes `limit` bytes.
/// `Ok(None)` for `identity` (nothing to decode).
pub fn decode_all(
    encoding: &str,
    body: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, DecodeError> {
    let mut d = match Decoder::of(encoding) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(()) => return Err(DecodeError::Unknown(encoding.to_string())),
    };
    let corrupt = |_| DecodeError::Corrupt(encoding.trim().to_ascii_lowercase());
    let mut out = Vec::new();
    // Small input steps bound what one step can expand to before the limit is checked.
    for chunk in body.chunks(1024) {
        out.extend_from_slice(&d.write(chunk).map_err(corrupt)?);
        if out.len() > limit {
            return Err(DecodeError::TooLarge(limit));
        }
    }
    out.extend_from_slice(&d.finish().map_err(corrupt)?);
    if out.len() > limit {
        return Err(DecodeError::TooLarge(limit));
    }
    Ok(Some(out))
}

/// A push decoder: fed the encoded chunks, it hands back what it decoded so far.
pub(crate) trait Push: Send + Sync {
    /// Decodes one chunk.
    fn push(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>>;
    /// Flushes what is left, at the end of the answer.
    fn end(&mut self) -> std::io::Result<Vec<u8>>;
}

/// A `Push` for a `Write`-based decoder into a `Vec`, ended by `$end`.
macro_rules! push_decoder {
    ($t:ty, $end:ident) => {
        impl Push for $t {
            fn push(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
                std::io::Write::write_all(self, chunk)?;
                Ok(std::mem::take(self.get_mut()))
            }
            fn end(&mut self) -> std::io::Result<Vec<u8>> {
                self.$end()?;
                Ok(std::mem::take(self.get_mut()))
            }
        }
    };
}

push_decoder!(flate2::write::GzDecoder<Vec<u8>>, try_finish);
push_decoder!(flate2::write::ZlibDecoder<Vec<u8>>, try_finish);
push_decoder!(flate2::write::DeflateDecoder<Vec<u8>>, try_finish);
push_decoder!(brotli_decompressor::DecompressorWriter<Vec<u8>>, flush);
push_decoder!(zstd::stream::write::Decoder<'static, Vec<u8>>, flush);

/// The decoder of one `Content-Encoding`.
pub(crate) enum Decoder {
    Ready(Box<dyn Push>),
    /// HTTP's `deflate` is zlib-wrapped; some servers send raw deflate, told apart by the
    /// first two bytes, held here until both have come.
    DeflateHead(Vec<u8>),
}

impl Decoder {
    /// The decoder of a `Content-Encoding` value: `Ok(None)` for none (`identity`), `Err` for
    /// one the tap cannot decode.
    pub(crate) fn of(encoding: &str) -> Result<Option<Decoder>, ()> {
        let ready = |d: Box<dyn Push>| Ok(Some(Decoder::Ready(d)));
        match encoding.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(None),
            "gzip" | "x-gzip" => ready(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            "deflate" => Ok(Some(Decoder::DeflateHead(Vec::new()))),
            "br" => ready(Box::new(brotli_decompressor::DecompressorWriter::new(
                Vec::new(),
                16 * 1024,
            ))),
            "zstd" => match zstd::stream::write::Decoder::new(Vec::new()) {
                Ok(d) => ready(Box::new(d)),
                Err(_) => Err(()),
            },
            _ => Err(()),
        }
    }

    /// Decodes one chunk; returns what it decoded so far.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
        let head = match self {
            Decoder::Ready(d) => return d.push(chunk),
            Decoder::DeflateHead(head) => head,
        };
        head.extend_from_slice(chunk);
        if head.len() < 2 {
            return Ok(Vec::new());
        }
        let zlib = head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
        let mut d: Box<dyn Push> = if zlib {
            Box::new(flate2::write::ZlibDecoder::new(Vec::new()))
        } else {
            Box::new(flate2::write::DeflateDecoder::new(Vec::new()))
        };
        let first = d.push(head);
        *self = Decoder::Ready(d);
        first
    }

    /// Flushes what the decoder still holds, at the end of the answer.
    pub(crate) fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Ready(d) => d.end(),
            Decoder::DeflateHead(head) if head.is_empty() => Ok(Vec::new()),
            Decoder::DeflateHead(_) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn whole_bodies_decode_within_their_limit() {
        let body = br#"{"model":"gpt-5","input":"hi"}"#.repeat(100);
        assert_eq!(
            decode_all("gzip", &gzip(&body), 1 << 20).unwrap(),
            Some(body.clone())
        );
        let z = zstd::encode_all(&body[..], 3).unwrap();
        assert_eq!(decode_all("zstd", &z, 1 << 20).unwrap(), Some(body.clone()));
        assert_eq!(decode_all("identity", &body, 10).unwrap(), None);
        assert_eq!(
            decode_all("gzip", &gzip(&body), 100),
            Err(DecodeError::TooLarge(100))
        );
        // A bomb: 64 MiB of zeros stops right after the limit.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 19).unwrap();
        assert_eq!(
            decode_all("zstd", &bomb, 1 << 20),
            Err(DecodeError::TooLarge(1 << 20))
        );
        assert_eq!(
            decode_all("gzip", b"not gzip", 100),
            Err(DecodeError::Corrupt("gzip".into()))
        );
        assert_eq!(
            decode_all("compress", b"x", 100),
            Err(DecodeError::Unknown("compress".into()))
        );
    }
}
