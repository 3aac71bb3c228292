//! Frames: every byte after the handshake preamble travels in one. A frame is a 24-byte
//! little-endian header and a payload; the header carries the payload's length (checked
//! before anything is allocated), its kind, the request id that pairs an answer with its
//! request, and a CRC-32C over the header's first 16 bytes and the payload. After the
//! handshake every frame is followed by a 16-byte tag (see [`super::seal`]) over the header
//! and payload and the frame's sequence number in its direction; handshake frames have none.
//!
//! ```text
//! 0      4    5     6          8            16      20         24                  24+len
//! | len  |kind|flags|reserved16| request id | crc32c|reserved32| payload (len bytes) | tag (16) |
//! ```
//!
//! The decoder is incremental and resumable: it takes bytes as they come (a slice, or a
//! `Read` that may time out half-way through a frame) and never panics on any input.

use std::io::{self, BufRead, Read, Write};

use super::seal::{Opener, Sealer, TAG_LEN};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;

/// Largest payload. The largest messages carry an image's metadata JSON (`Hold`, `MetaJson`:
/// up to [`super::message::MAX_META_JSON`], 16 MiB); the 64 KiB on top hold the fixed fields
/// around it (an image name is at most 65 bytes) with a wide margin. Data chunks (1 MiB) and
/// checksum lists (about 2 MiB) are far below it.
pub const MAX_PAYLOAD: usize = (16 << 20) + (64 << 10);

/// What a frame carries. Handshake kinds are only valid before authentication, request kinds
/// only from client to server, response kinds only from server to client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Challenge = 0x02,
    Proof = 0x03,
    Accept = 0x04,
    Refuse = 0x05,
    Read = 0x10,
    Write = 0x11,
    Flush = 0x12,
    Discard = 0x13,
    Checksums = 0x14,
    Hold = 0x15,
    Release = 0x16,
    Meta = 0x17,
    Ping = 0x18,
    Ok = 0x80,
    Data = 0x81,
    ChecksumList = 0x82,
    MetaJson = 0x83,
    Error = 0x84,
}

impl Kind {
    pub const ALL: [Kind; 19] = [
        Kind::Hello,
        Kind::Challenge,
        Kind::Proof,
        Kind::Accept,
        Kind::Refuse,
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::Discard,
        Kind::Checksums,
        Kind::Hold,
        Kind::Release,
        Kind::Meta,
        Kind::Ping,
        Kind::Ok,
        Kind::Data,
        Kind::ChecksumList,
        Kind::MetaJson,
        Kind::Error,
    ];

    pub fn from_u8(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }

    pub fn is_handshake(self) -> bool {
        (self as u8) < 0x10
    }

    pub fn is_request(self) -> bool {
        (0x10..0x80).contains(&(self as u8))
    }

    pub fn is_response(self) -> bool {
        (self as u8) >= 0x80
    }
}

/// A decoded frame whose CRC matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub id: u64,
    pub payload: Vec<u8>,
}

/// Why bytes are not a frame. Any of these ends the connection they came on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame payload of {len} bytes is over the limit of {max}")]
    TooLong { len: u64, max: usize },
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("reserved header bytes {offset}..{end} are not zero", end = offset + width)]
    ReservedNotZero { offset: usize, width: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    /// The frame's tag does not check with the session key and the frame's sequence number:
    /// it was forged, altered, replayed or reordered, or a frame before it was dropped.
    #[error("frame authentication failed (forged, altered, replayed or out of order)")]
    BadTag,
}

/// Why reading a frame from a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// Includes `UnexpectedEof` (closed in the middle of a frame) and, for sockets with a
    /// read timeout, `WouldBlock`/`TimedOut`, after which reading may resume.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// A header that passed every check but the CRC, which needs the payload.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: Kind,
    id: u64,
    len: usize,
    crc: u32,
}

fn parse_header(bytes: &[u8; HEADER_LEN], max_payload: usize) -> Result<Header, FrameError> {
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let len = u32_at(0);
    if len as usize > max_payload {
        return Err(FrameError::TooLong {
            len: len.into(),
            max: max_payload,
        });
    }
    if bytes[6] != 0 || bytes[7] != 0 {
        return Err(FrameError::ReservedNotZero {
            offset: 6,
            width: 2,
        });
    }
    if u32_at(20) != 0 {
        return Err(FrameError::ReservedNotZero {
            offset: 20,
            width: 4,
        });
    }
    if bytes[5] != 0 {
        return Err(FrameError::UnknownFlags(bytes[5]));
    }
    let kind = Kind::from_u8(bytes[4]).ok_or(FrameError::UnknownKind(bytes[4]))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..16]);
    Ok(Header {
        kind,
        id: u64::from_le_bytes(id),
        len: len as usize,
        crc: u32_at(16),
    })
}

/// Incremental frame decoder. Feed it bytes with [`Decoder::push`] or let it read with
/// [`Decoder::read_from`]; it keeps a partial frame across calls, so a read that times out
/// can simply be retried. It only ever asks for the bytes of the current frame, so the
/// stream (or the `BufReader` under it) keeps whatever follows.
#[derive(Debug)]
pub struct Decoder {
    max_payload: usize,
    header: [u8; HEADER_LEN],
    header_filled: usize,
    body: Option<Body>,
    /// After the handshake: checks the tag that follows every payload.
    opener: Option<Opener>,
}

#[derive(Debug)]
struct Body {
    header: Header,
    /// The payload (and then the tag) so far; its capacity is the whole of both, reserved
    /// (not filled) once the header has passed its checks.
    payload: Vec<u8>,
    /// Payload and tag bytes: when `payload` holds this many the frame is complete.
    want: usize,
}

impl Decoder {
    /// A decoder that refuses payloads over `max_payload` (itself capped at [`MAX_PAYLOAD`]).
    pub fn new(max_payload: usize) -> Self {
        Decoder {
            max_payload: max_payload.min(MAX_PAYLOAD),
            header: [0; HEADER_LEN],
            header_filled: 0,
            body: None,
            opener: None,
        }
    }

    /// A decoder for frames after the handshake: each must carry a tag that `opener` checks.
    pub fn sealed(max_payload: usize, opener: Opener) -> Self {
        Decoder {
            opener: Some(opener),
            ..Decoder::new(max_payload)
        }
    }

    fn trailer(&self) -> usize {
        if self.opener.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// True between frames: nothing of a next frame has been seen yet.
    pub fn is_idle(&self) -> bool {
        self.header_filled == 0 && self.body.is_none()
    }

    /// Whether `buffered` (bytes read from the stream but not yet given to the decoder)
    /// complete the next frame, so that decoding it will not wait for the stream. A reader
    /// that answers what it decodes sends its staged answers when this is false.
    pub fn holds_frame(&self, buffered: &[u8]) -> bool {
        let trailer = self.trailer();
        match &self.body {
            Some(body) => buffered.len() >= body.want - body.payload.len(),
            None => {
                let need = HEADER_LEN - self.header_filled;
                if buffered.len() < need {
                    return false;
                }
                let mut header = self.header;
                header[self.header_filled..].copy_from_slice(&buffered[..need]);
                let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                // A bad header fails at once: no wait either.
                buffered.len() - need >= (len as usize).saturating_add(trailer)
                    || len as usize > self.max_payload
            }
        }
    }

    /// The next frame's header, when the decoder is between frames, `buffered` (bytes read
    /// but not yet given to the decoder) starts with a whole header that passes its checks,
    /// and the payload can be checked piece by piece (the frames are tagged, not encrypted):
    /// then [`Decoder::land`] may decode it into a caller's buffers.
    pub fn peek(&self, buffered: &[u8]) -> Option<Peeked> {
        if !self.is_idle() || self.opener.as_ref().is_some_and(Opener::decrypts) {
            return None;
        }
        let header: [u8; HEADER_LEN] = buffered.get(..HEADER_LEN)?.try_into().ok()?;
        let header = parse_header(&header, self.max_payload).ok()?;
        Some(Peeked {
            kind: header.kind,
            id: header.id,
            len: header.len,
        })
    }

    /// Decodes the frame [`Decoder::peek`] just saw at the start of `reader`'s buffer,
    /// handing its payload to `put` (byte offset, bytes) piece by piece as it comes out of
    /// the read buffer instead of collecting it: a caller's buffers get each byte once. The
    /// CRC and the tag are computed over the bytes as received, so nothing the owner of those
    /// buffers does to them meanwhile changes the outcome. `Ok` only when both check; after
    /// an `Err` the buffers hold whatever arrived. When a read times out, `wait` says whether
    /// to keep waiting; if not, this fails with `TimedOut` and the stream is left mid-frame
    /// (drop the connection).
    pub fn land<R: BufRead>(
        &mut self,
        reader: &mut R,
        put: &mut dyn FnMut(usize, &[u8]),
        wait: &mut dyn FnMut() -> bool,
    ) -> Result<(), ReadError> {
        let buffered = fill(reader, wait)?;
        let Some(bytes) = buffered.get(..HEADER_LEN) else {
            return Err(io::Error::other("no whole header buffered to land").into());
        };
        self.header.copy_from_slice(bytes);
        let header = parse_header(&self.header, self.max_payload)?;
        reader.consume(HEADER_LEN);
        let mut check = match self.opener.as_mut().map(Opener::begin_check) {
            Some(None) => return Err(io::Error::other("an encrypted payload cannot land").into()),
            other => other.flatten(),
        };
        // With a tag the CRC adds nothing (see `check`); a landed payload is not kept, so a
        // tag that fails is reported as such, without the CRC's diagnosis.
        let mut crc = check.is_none().then(|| crc32c::crc32c(&self.header[..16]));
        let mut at = 0;
        while at < header.len {
            let piece = fill(reader, wait)?;
            let n = piece.len().min(header.len - at);
            let piece = &piece[..n];
            if let Some(crc) = crc.as_mut() {
                *crc = crc32c::crc32c_append(*crc, piece);
            }
            if let Some(check) = check.as_mut() {
                check.update(piece);
            }
            put(at, piece);
            reader.consume(n);
            at += n;
        }
        let mut tag = [0u8; TAG_LEN];
        let mut filled = 0;
        while check.is_some() && filled < TAG_LEN {
            let piece = fill(reader, wait)?;
            let n = piece.len().min(TAG_LEN - filled);
            tag[filled..filled + n].copy_from_slice(&piece[..n]);
            reader.consume(n);
            filled += n;
        }
        if let Some(actual) = crc.filter(|&crc| crc != header.crc) {
            return Err(FrameError::BadCrc {
                expected: header.crc,
                actual,
            }
            .into());
        }
        match check.map(|check| check.finish(&self.header, &tag)) {
            Some(false) => Err(FrameError::BadTag.into()),
            _ => Ok(()),
        }
    }

    /// Checks a header once it is complete, and hands out a frame once its payload is.
    fn step(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.body.is_none() {
            if self.header_filled < HEADER_LEN {
                return Ok(None);
            }
            let header = parse_header(&self.header, self.max_payload)?;
            let want = header.len + self.trailer();
            let payload = Vec::with_capacity(want);
            self.body = Some(Body {
                header,
                payload,
                want,
            });
        }
        match self.body.take() {
            Some(body) if body.payload.len() == body.want => {
                self.header_filled = 0;
                self.check(body).map(Some)
            }
            partial => {
                self.body = partial;
                Ok(None)
            }
        }
    }

    fn check(&mut self, body: Body) -> Result<Frame, FrameError> {
        let mut payload = body.payload;
        if let Some(opener) = self.opener.as_mut().filter(|o| o.decrypts()) {
            // Encrypted: decrypt, which authenticates.
            let (content, tag) = payload.split_at_mut(body.header.len);
            if !opener.decrypt(&self.header, content, tag) {
                return Err(FrameError::BadTag);
            }
            // The plaintext is what the sender sealed: its CRC, computed by the sender over
            // the same bytes and authenticated with the header, needs no second look.
            payload.truncate(body.header.len);
            return Ok(Frame {
                kind: body.header.kind,
                id: body.header.id,
                payload,
            });
        }
        let (content, tag) = payload.split_at(body.header.len);
        // A tag that checks covers every byte the CRC does: the CRC is only computed without
        // a tag, or to tell a corrupted frame from a forged one once the tag failed.
        let tagged = match &mut self.opener {
            Some(opener) => Some(opener.check(&[&self.header, content], tag)),
            None => None,
        };
        if tagged != Some(true) {
            let actual = crc32c::crc32c_append(crc32c::crc32c(&self.header[..16]), content);
            if actual != body.header.crc {
                return Err(FrameError::BadCrc {
                    expected: body.header.crc,
                    actual,
                });
            }
        }
        if tagged == Some(false) {
            return Err(FrameError::BadTag);
        }
        payload.truncate(body.header.len);
        Ok(Frame {
            kind: body.header.kind,
            id: body.header.id,
            payload,
        })
    }

    /// Takes bytes from `input` up to the end of one frame. Returns how many it took and the
    /// frame if one completed; call again with the rest.
    pub fn push(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), FrameError> {
        let mut used = 0;
        loop {
            if let Some(frame) = self.step()? {
                return Ok((used, Some(frame)));
            }
            let rest = &input[used..];
            if rest.is_empty() {
                return Ok((used, None));
            }
            used += match &mut self.body {
                Some(body) => {
                    let n = (body.want - body.payload.len()).min(rest.len());
                    body.payload.extend_from_slice(&rest[..n]);
                    n
                }
                None => {
                    let n = (HEADER_LEN - self.header_filled).min(rest.len());
                    self.header[self.header_filled..][..n].copy_from_slice(&rest[..n]);
                    self.header_filled += n;
                    n
                }
            };
        }
    }

    /// Reads one frame. `Ok(None)` is a clean end of stream between frames. A
    /// `WouldBlock`/`TimedOut` error leaves the partial frame in place for the next call.
    pub fn read_from<R: Read>(&mut self, reader: &mut R) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.step()? {
                return Ok(Some(frame));
            }
            let result = match &mut self.body {
                // Straight into the reserved payload: no zeroing, no copy.
                Some(body) => {
                    let want = (body.want - body.payload.len()) as u64;
                    let before = body.payload.len();
                    match reader.by_ref().take(want).read_to_end(&mut body.payload) {
                        Ok(_) if body.payload.len() == before => Ok(0),
                        other => other,
                    }
                }
                None => reader
                    .read(&mut self.header[self.header_filled..])
                    .inspect(|n| self.header_filled += n),
            };
            match result {
                Ok(0) if self.is_idle() => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A header [`Decoder::peek`] saw in buffered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peeked {
    pub kind: Kind,
    pub id: u64,
    /// Payload bytes.
    pub len: usize,
}

/// Buffered bytes of `reader`, at least one: reads when its buffer is empty, and on a read
/// timeout asks `wait` whether to try again. The end of the stream is `UnexpectedEof` (the
/// caller is inside a frame).
fn fill<'r, R: BufRead>(
    reader: &'r mut R,
    wait: &mut dyn FnMut() -> bool,
) -> Result<&'r [u8], ReadError> {
    loop {
        match reader.fill_buf() {
            Ok([]) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !wait() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut).into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Buffered now: no system call.
    Ok(reader.fill_buf()?)
}

/// A frame ready to be written: the header, then the payload in two parts so that bulk data
/// (a write's bytes, a read's answer) is never copied into a bigger buffer.
#[derive(Debug)]
pub struct Outgoing {
    header: [u8; HEADER_LEN],
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Outgoing {
    /// Frames `head` followed by `body` as one payload.
    pub fn new(kind: Kind, id: u64, head: Vec<u8>, body: Vec<u8>) -> Result<Self, FrameError> {
        let len = head.len() + body.len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong {
                len: len as u64,
                max: MAX_PAYLOAD,
            });
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4] = kind as u8;
        header[8..16].copy_from_slice(&id.to_le_bytes());
        let crc = crc32c::crc32c(&header[..16]);
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, &head), &body);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        Ok(Outgoing { header, head, body })
    }

    /// Header and payload bytes together.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.head.len() + self.body.len()
    }

    /// Never true: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn write_to<W: Write>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(&self.header)?;
        writer.write_all(&self.head)?;
        writer.write_all(&self.body)
    }

    /// The frame's parts in wire order (header, then the payload's non-empty parts), for a
    /// vectored write.
    pub fn slices<'a>(&'a self, out: &mut Vec<io::IoSlice<'a>>) {
        out.push(io::IoSlice::new(&self.header));
        for part in [&self.head, &self.body] {
            if !part.is_empty() {
                out.push(io::IoSlice::new(part));
            }
        }
    }

    /// The tag of this frame under `sealer`'s next sequence number (a tagging sealer: see
    /// [`Sealer::tag`]).
    pub fn tag(&self, sealer: &mut Sealer) -> [u8; TAG_LEN] {
        sealer.tag(&[&self.header, &self.head, &self.body])
    }

    /// Writes the frame followed by its tag, which takes the next sequence number of
    /// `sealer`: frames must be sealed in the order they go on the wire.
    ///
    /// With an encrypting sealer the payload goes out encrypted (a copy: the frame itself is
    /// left as it is) and the tag is ChaCha20-Poly1305's.
    pub fn write_sealed<W: Write>(&self, writer: &mut W, sealer: &mut Sealer) -> io::Result<()> {
        if sealer.encrypts() {
            return writer.write_all(&self.to_sealed_bytes(sealer));
        }
        let tag = sealer.tag(&[&self.header, &self.head, &self.body]);
        self.write_to(writer)?;
        writer.write_all(&tag)
    }

    /// The bytes [`Outgoing::write_sealed`] writes.
    pub fn to_sealed_bytes(&self, sealer: &mut Sealer) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len() + TAG_LEN);
        bytes.extend_from_slice(&self.header);
        bytes.extend_from_slice(&self.head);
        bytes.extend_from_slice(&self.body);
        let tag = if sealer.encrypts() {
            sealer.encrypt(&self.header, &mut bytes[HEADER_LEN..])
        } else {
            sealer.tag(&[&self.header, &self.head, &self.body])
        };
        bytes.extend_from_slice(&tag);
        bytes
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        bytes.extend_from_slice(&self.header);
        bytes.extend_from_slice(&self.head);
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Encodes one frame into bytes (tests, fuzzing, the handshake).
pub fn encode(kind: Kind, id: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    Ok(Outgoing::new(kind, id, payload.to_vec(), Vec::new())?.to_bytes())
}

/// Encodes one frame sent after the handshake: the frame, then its tag (tests, fuzzing).
pub fn encode_sealed(
    kind: Kind,
    id: u64,
    payload: &[u8],
    sealer: &mut Sealer,
) -> Result<Vec<u8>, FrameError> {
    Ok(Outgoing::new(kind, id, payload.to_vec(), Vec::new())?.to_sealed_bytes(sealer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::seal::Session;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut decoder = Decoder::new(MAX_PAYLOAD);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (used, frame) = decoder.push(&bytes[at..])?;
            at += used;
            frames.extend(frame);
        }
        Ok(frames)
    }

    #[test]
    fn kinds_round_trip_and_classify() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_u8(kind as u8), Some(kind));
            let classes = [kind.is_handshake(), kind.is_request(), kind.is_response()];
            assert_eq!(classes.iter().filter(|c| **c).count(), 1, "{kind:?}");
        }
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(0xff), None);
    }

    #[test]
    fn holds_frame_says_whether_decoding_would_wait() {
        let (mut a, b) = Session::pair(&[1; 32], &[2; 32]);
        let bytes = encode_sealed(Kind::Data, 5, &[3; 100], &mut a.sealer).unwrap();
        let decoder = Decoder::sealed(MAX_PAYLOAD, b.opener.clone());
        assert!(decoder.holds_frame(&bytes));
        assert!(!decoder.holds_frame(&bytes[..bytes.len() - 1]), "tag cut");
        assert!(!decoder.holds_frame(&bytes[..10]), "header cut");
        assert!(!decoder.holds_frame(&[]));
        // Part of the frame already taken by the decoder.
        let mut decoder = Decoder::sealed(MAX_PAYLOAD, b.opener);
        assert_eq!(decoder.push(&bytes[..30]).unwrap(), (30, None));
        assert!(decoder.holds_frame(&bytes[30..]));
        assert!(!decoder.holds_frame(&bytes[30..bytes.len() - 1]));
        // A header over the limit fails at once: nothing to wait for.
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Decoder::new(MAX_PAYLOAD).holds_frame(&header));
    }

    #[test]
    fn header_layout_is_as_documented() {
        // The CRC is CRC-32C (Castagnoli): its standard check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let bytes = encode(Kind::Read, 0x0102_0304_0506_0708, b"abc").unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 3);
        assert_eq!(&bytes[0..4], &3u32.to_le_bytes());
        assert_eq!(bytes[4], 0x10);
        assert_eq!(&bytes[5..8], &[0, 0, 0]);
        assert_eq!(&bytes[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        let crc = crc32c::crc32c(&[&bytes[..16], b"abc"].concat());
        assert_eq!(&bytes[16..20], &crc.to_le_bytes());
        assert_eq!(&bytes[20..24], &[0; 4]);
    }

    #[test]
    fn each_violation_has_its_own_error() {
        let good = encode(Kind::Flush, 7, b"xyz").unwrap();
        let with = |at: usize, byte: u8| {
            let mut bad = good.clone();
            bad[at] = byte;
            decode_all(&bad).unwrap_err()
        };
        assert!(matches!(with(3, 0x7f), FrameError::TooLong { .. }));
        assert_eq!(with(4, 0x7e), FrameError::UnknownKind(0x7e));
        assert_eq!(with(5, 1), FrameError::UnknownFlags(1));
        assert_eq!(
            with(7, 1),
            FrameError::ReservedNotZero {
                offset: 6,
                width: 2
            }
        );
        assert_eq!(
            with(23, 1),
            FrameError::ReservedNotZero {
                offset: 20,
                width: 4
            }
        );
        assert!(matches!(with(9, 1), FrameError::BadCrc { .. }));
        assert!(matches!(with(25, b'q'), FrameError::BadCrc { .. }));
    }

    #[test]
    fn oversize_length_is_refused_from_the_header_alone() {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        header[4] = Kind::Write as u8;
        let mut decoder = Decoder::new(MAX_PAYLOAD);
        assert!(matches!(
            decoder.push(&header),
            Err(FrameError::TooLong { .. })
        ));
        let mut small = Decoder::new(16);
        let frame = encode(Kind::Hello, 0, &[0; 17]).unwrap();
        assert!(matches!(
            small.push(&frame),
            Err(FrameError::TooLong { len: 17, max: 16 })
        ));
    }

    #[test]
    fn read_from_resumes_and_reports_truncation() {
        let bytes = [
            encode(Kind::Ok, 1, b"").unwrap(),
            encode(Kind::Data, 2, &[9; 1000]).unwrap(),
        ]
        .concat();
        let mut decoder = Decoder::new(MAX_PAYLOAD);
        let mut reader = &bytes[..];
        assert_eq!(decoder.read_from(&mut reader).unwrap().unwrap().id, 1);
        assert_eq!(
            decoder.read_from(&mut reader).unwrap().unwrap().payload,
            vec![9; 1000]
        );
        assert!(decoder.read_from(&mut reader).unwrap().is_none());
        let mut cut = &bytes[..30];
        decoder.read_from(&mut cut).unwrap();
        match decoder.read_from(&mut cut) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outgoing_refuses_oversize_payloads() {
        let err = Outgoing::new(Kind::Hold, 1, vec![0; 10], vec![0; MAX_PAYLOAD]).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }));
    }

    /// A reader that hands out bytes in the given piece sizes, timing out between pieces.
    struct Choppy<'a> {
        bytes: &'a [u8],
        pieces: Vec<usize>,
        turn: usize,
    }

    impl Read for Choppy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.turn += 1;
            if self.turn.is_multiple_of(2) && !self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let piece = self.pieces[self.turn % self.pieces.len()];
            let n = piece.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop::sample::select(Kind::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_pieces(
            frames in prop::collection::vec((kind(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..300)), 1..8),
            cut in 1usize..50,
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(|(k, id, p)| encode(*k, *id, p).unwrap()).collect();
            let mut decoder = Decoder::new(MAX_PAYLOAD);
            let mut out = Vec::new();
            for piece in bytes.chunks(cut) {
                let mut at = 0;
                while at < piece.len() {
                    let (used, frame) = decoder.push(&piece[at..]).unwrap();
                    at += used;
                    out.extend(frame);
                }
            }
            prop_assert!(decoder.is_idle());
            let expected: Vec<Frame> = frames.into_iter().map(|(kind, id, payload)| Frame { kind, id, payload }).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn reads_resume_after_timeouts(
            frames in prop::collection::vec((kind(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..3000)), 1..6),
            pieces in prop::collection::vec(1usize..700, 1..20),
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(|(k, id, p)| encode(*k, *id, p).unwrap()).collect();
            let mut reader = Choppy { bytes: &bytes, pieces, turn: 0 };
            let mut decoder = Decoder::new(MAX_PAYLOAD);
            let mut out = Vec::new();
            loop {
                match decoder.read_from(&mut reader) {
                    Ok(Some(frame)) => out.push(frame),
                    Ok(None) => break,
                    Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            let expected: Vec<Frame> = frames.into_iter().map(|(kind, id, payload)| Frame { kind, id, payload }).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn sealed_frames_round_trip_in_any_pieces(
            frames in prop::collection::vec((kind(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..300)), 1..8),
            cut in 1usize..50,
        ) {
            let (mut a, b) = Session::pair(&[3; 32], &[4; 32]);
            let bytes: Vec<u8> = frames.iter().flat_map(|(k, id, p)| encode_sealed(*k, *id, p, &mut a.sealer).unwrap()).collect();
            let mut decoder = Decoder::sealed(MAX_PAYLOAD, b.opener);
            let mut out = Vec::new();
            for piece in bytes.chunks(cut) {
                let mut at = 0;
                while at < piece.len() {
                    let (used, frame) = decoder.push(&piece[at..]).unwrap();
                    at += used;
                    out.extend(frame);
                }
            }
            prop_assert!(decoder.is_idle());
            let expected: Vec<Frame> = frames.into_iter().map(|(kind, id, payload)| Frame { kind, id, payload }).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn encrypted_frames_round_trip_in_any_pieces(
            frames in prop::collection::vec((kind(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..300)), 1..8),
            cut in 1usize..50,
        ) {
            let (mut a, b) = Session::encrypted_pair(&[3; 32], &[4; 32]);
            let bytes: Vec<u8> = frames.iter().flat_map(|(k, id, p)| encode_sealed(*k, *id, p, &mut a.sealer).unwrap()).collect();
            let mut decoder = Decoder::sealed(MAX_PAYLOAD, b.opener);
            let mut out = Vec::new();
            for piece in bytes.chunks(cut) {
                let mut at = 0;
                while at < piece.len() {
                    let (used, frame) = decoder.push(&piece[at..]).unwrap();
                    at += used;
                    out.extend(frame);
                }
            }
            let expected: Vec<Frame> = frames.into_iter().map(|(kind, id, payload)| Frame { kind, id, payload }).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn a_sealed_stream_tampered_anyhow_fails(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 3..6),
            bit in any::<usize>(),
            how in 0u8..4,
            encrypt in any::<bool>(),
        ) {
            let (mut a, b) = if encrypt {
                Session::encrypted_pair(&[5; 32], &[6; 32])
            } else {
                Session::pair(&[5; 32], &[6; 32])
            };
            let mut frames: Vec<Vec<u8>> = payloads.iter().enumerate()
                .map(|(i, p)| encode_sealed(Kind::Write, i as u64, p, &mut a.sealer).unwrap())
                .collect();
            match how {
                // A flipped bit anywhere, header, payload or tag.
                0 => {
                    let f = &mut frames[bit % 3];
                    let bit = (bit / 3) % (f.len() * 8);
                    f[bit / 8] ^= 1 << (bit % 8);
                }
                1 => frames.swap(0, 1 + bit % 2),
                2 => { frames.remove(bit % 2); }
                _ => { let again = frames[bit % 3].clone(); frames.insert(1 + bit % 3, again); }
            }
            let mut decoder = Decoder::sealed(MAX_PAYLOAD, b.opener);
            let stream = frames.concat();
            let mut at = 0;
            let mut good = 0;
            let failed = loop {
                match decoder.push(&stream[at..]) {
                    Ok((used, frame)) => {
                        at += used;
                        good += usize::from(frame.is_some());
                        if used == 0 && frame.is_none() { break false; }
                    }
                    Err(_) => break true,
                }
            };
            // A frame fails; only a length bit flipped upwards may instead leave the decoder
            // waiting for bytes that never come.
            prop_assert!(failed || (how == 0 && good < payloads.len()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode_all(&bytes);
            let mut decoder = Decoder::new(256);
            let _ = decoder.read_from(&mut &bytes[..]);
        }

        #[test]
        fn a_flipped_bit_is_caught(payload in prop::collection::vec(any::<u8>(), 0..100), bit in 0usize..1000) {
            let mut bytes = encode(Kind::Write, 42, &payload).unwrap();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            // The length field may now ask for more bytes: then no frame comes out at all.
            if let Ok(frames) = decode_all(&bytes) {
                prop_assert!(frames.is_empty());
            }
        }
    }
}
