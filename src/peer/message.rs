//! Typed requests and responses, and their payloads. Decoding checks every field (names are
//! validated image names, tiers are known, ranges are non-empty and bounded, lengths are
//! within their caps) and refuses trailing bytes, so a handler only ever sees checked values.
//!
//! Layouts (little-endian; `name` is a u8 length then that many bytes; `tier` is a u8,
//! 0 = ram, 1 = volume; `range` is start u64, end u64) are written down in docs/PROTOCOL.md.

use crate::image::name::NameError;
use crate::image::range::RangeError;
use crate::image::{BlockRange, ImageName, Tier};

use super::frame::{FrameError, Kind, Outgoing, MAX_PAYLOAD};

/// Largest read or write in one request. Callers split bigger ones; one chunk per frame keeps
/// any one request from holding a connection for long, so small requests pipelined behind it
/// wait at most about a millisecond on a fast link.
pub const MAX_CHUNK: u32 = 1 << 20;

/// Largest metadata JSON (`Hold`, `MetaJson`): room for the block table of a large, heavily
/// fragmented image; the frame limit is derived from it.
pub const MAX_META_JSON: usize = 16 << 20;

/// Most blocks in one `Checksums` request: the answer is at most 65536 * 33 bytes (about
/// 2 MiB), and 256 GiB of 4 MiB blocks. Hashing that many takes far longer than a request's
/// timeout: ask for much smaller ranges in practice.
pub const MAX_CHECKSUM_BLOCKS: u64 = 1 << 16;

/// Longest error message carried; longer ones are cut (at a character boundary) when encoded.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// A block's SHA-256 digest.
pub type BlockDigest = [u8; 32];

const _: () = assert!(MAX_META_JSON + 1 + 64 <= MAX_PAYLOAD);
const _: () = assert!(4 + MAX_CHECKSUM_BLOCKS as usize * 33 <= MAX_PAYLOAD);
const _: () = assert!(MAX_CHUNK as usize + 128 <= MAX_PAYLOAD);

/// Error codes in `Response::Error`. The transport itself sends `BAD_REQUEST` and `INTERNAL`;
/// the rest are for handlers. Codes a client does not know are still reported as `Refused`.
pub mod code {
    /// The request's payload did not decode (sent by the transport; the handler never saw it).
    pub const BAD_REQUEST: u16 = 1;
    /// No such image on this node.
    pub const NOT_FOUND: u16 = 2;
    /// This node holds no copy of that block on that tier.
    pub const NOT_HELD: u16 = 3;
    /// The request does not fit the image (offset or length past the block, range past the end).
    pub const INVALID: u16 = 4;
    /// The image is read-only.
    pub const READ_ONLY: u16 = 5;
    /// The storage failed (the message says how).
    pub const IO: u16 = 6;
    /// The handler panicked or its answer could not be encoded (sent by the transport).
    pub const INTERNAL: u16 = 7;
    /// The node is shutting down or otherwise cannot serve now; try another copy.
    pub const UNAVAILABLE: u16 = 8;
    /// The request's owner epoch is older than one this node has seen: the sender was
    /// replaced as the image's owner and must not change anything.
    pub const STALE_EPOCH: u16 = 9;
    /// This node's copy may have lost data (its tier was wiped) and is not served until its
    /// owner has marked it out of sync; read another copy.
    pub const LOST: u16 = 10;
    /// A newer change to that block was applied here already: this one (which its sender
    /// gave up on) is not.
    pub const SUPERSEDED: u16 = 11;
}

/// Which image a request is about, and the owner epoch the sender acts under. A holder
/// refuses a request whose epoch is older than the newest it has seen for that image, so a
/// fenced owner (or a request it sent before it was fenced) can change nothing.
///
/// `stamp` orders the sender's writes (`Write`, `Discard`; 0 on other requests): the
/// sender's incarnation in the top 24 bits, a counter below. A holder never applies a change
/// to a block older (by epoch, then stamp) than one it already applied there: a write that
/// the owner gave up on (timed out) cannot land over a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: ImageName,
    pub epoch: u64,
    pub stamp: u64,
}

impl ImageRef {
    pub fn new(name: ImageName, epoch: u64) -> ImageRef {
        ImageRef {
            name,
            epoch,
            stamp: 0,
        }
    }

    pub fn with_stamp(mut self, stamp: u64) -> ImageRef {
        self.stamp = stamp;
        self
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (epoch {})", self.name, self.epoch)
    }
}

/// What a node asks another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `len` bytes of `block` from `offset`; answered by `Data` of exactly `len` bytes.
    Read {
        image: ImageRef,
        tier: Tier,
        block: u64,
        offset: u32,
        len: u32,
    },
    /// `data` into `block` at `offset`; answered by `Ok`.
    Write {
        image: ImageRef,
        tier: Tier,
        block: u64,
        offset: u32,
        data: Vec<u8>,
    },
    /// Makes every write answered before it durable; answered by `Ok`.
    Flush { image: ImageRef },
    /// Frees `len` bytes of `block` from `offset`; answered by `Ok`.
    Discard {
        image: ImageRef,
        tier: Tier,
        block: u64,
        offset: u32,
        len: u32,
    },
    /// One digest per block of `blocks` (`None`: the block has no file); answered by
    /// `Checksums` with exactly `blocks.len()` entries.
    Checksums {
        image: ImageRef,
        tier: Tier,
        blocks: BlockRange,
    },
    /// The owner tells a node that it holds copies of `image`; `meta_json` is opaque here.
    Hold { image: ImageRef, meta_json: Vec<u8> },
    /// The node no longer holds `blocks` of `image` on `tier`; answered by `Ok`.
    Release {
        image: ImageRef,
        tier: Tier,
        blocks: BlockRange,
    },
    /// The image's metadata as this node knows it; answered by `MetaJson`.
    Meta { image: ImageRef },
    /// Answered by `Ok` at once: the sender's heartbeat, on a connection of its own so that
    /// guest traffic cannot hold it up (`peers.rs`).
    Ping,
}

/// What a node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Data(Vec<u8>),
    Checksums(Vec<Option<BlockDigest>>),
    MetaJson(Vec<u8>),
    Error { code: u16, message: String },
}

/// Why a payload is not a valid message (or a message cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{0:?} payload is truncated")]
    Truncated(Kind),
    #[error("{0:?} payload has {1} trailing bytes")]
    Trailing(Kind, usize),
    #[error("bad image name: {0}")]
    BadName(String),
    #[error("image name is not UTF-8")]
    NameNotUtf8,
    #[error("unknown tier {0}")]
    BadTier(u8),
    #[error("bad block range: {0}")]
    BadRange(String),
    #[error("zero-length {0:?}")]
    ZeroLength(Kind),
    #[error("{len} bytes is more than one chunk ({MAX_CHUNK})")]
    ChunkTooLarge { len: usize },
    #[error("{blocks} blocks is more than {MAX_CHECKSUM_BLOCKS} per checksum request")]
    TooManyBlocks { blocks: u64 },
    #[error("metadata JSON of {len} bytes is over {MAX_META_JSON}")]
    JsonTooLarge { len: usize },
    #[error("error message of {len} bytes is over {MAX_ERROR_MESSAGE}")]
    ErrorMessageTooLong { len: usize },
    #[error("error message is not UTF-8")]
    ErrorMessageNotUtf8,
    #[error("bad checksum entry tag {0}")]
    BadDigestTag(u8),
    #[error("{0:?} is not a request kind")]
    NotARequest(Kind),
    #[error("{0:?} is not a response kind")]
    NotAResponse(Kind),
}

// The image layer's errors are not `Clone`; their text is all a peer error needs.
impl From<NameError> for MessageError {
    fn from(e: NameError) -> Self {
        MessageError::BadName(e.to_string())
    }
}

impl From<RangeError> for MessageError {
    fn from(e: RangeError) -> Self {
        MessageError::BadRange(e.to_string())
    }
}

/// An encoded payload: fixed fields in `head`, bulk bytes in `body` (moved, not copied).
#[derive(Debug)]
pub struct Payload {
    pub kind: Kind,
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

impl Payload {
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn into_frame(self, id: u64) -> Result<Outgoing, FrameError> {
        Outgoing::new(self.kind, id, self.head, self.body)
    }
}

fn put_name(out: &mut Vec<u8>, name: &ImageName) {
    // ImageName is at most 64 bytes: its length fits a u8.
    out.push(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
}

fn tier_byte(tier: Tier) -> u8 {
    match tier {
        Tier::Ram => 0,
        Tier::Volume => 1,
    }
}

fn put_image(out: &mut Vec<u8>, image: &ImageRef) {
    put_name(out, &image.name);
    out.extend_from_slice(&image.epoch.to_le_bytes());
    out.extend_from_slice(&image.stamp.to_le_bytes());
}

fn put_place(out: &mut Vec<u8>, image: &ImageRef, tier: Tier) {
    put_image(out, image);
    out.push(tier_byte(tier));
}

fn put_range(out: &mut Vec<u8>, range: BlockRange) {
    out.extend_from_slice(&range.start().to_le_bytes());
    out.extend_from_slice(&range.end().to_le_bytes());
}

fn check_chunk(kind: Kind, len: usize) -> Result<(), MessageError> {
    match len {
        0 => Err(MessageError::ZeroLength(kind)),
        n if n > MAX_CHUNK as usize => Err(MessageError::ChunkTooLarge { len: n }),
        _ => Ok(()),
    }
}

fn check_checksum_range(range: BlockRange) -> Result<(), MessageError> {
    if range.len() > MAX_CHECKSUM_BLOCKS {
        return Err(MessageError::TooManyBlocks {
            blocks: range.len(),
        });
    }
    Ok(())
}

fn check_json(len: usize) -> Result<(), MessageError> {
    if len > MAX_META_JSON {
        return Err(MessageError::JsonTooLarge { len });
    }
    Ok(())
}

/// Reads fields off a payload, failing with `Truncated` instead of panicking.
struct Fields<'a> {
    kind: Kind,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(kind: Kind, bytes: &'a [u8]) -> Self {
        Fields { kind, bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(MessageError::Truncated(self.kind))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MessageError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, MessageError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        self.array().map(u64::from_le_bytes)
    }

    fn name(&mut self) -> Result<ImageName, MessageError> {
        let len = self.u8()? as usize;
        let text = std::str::from_utf8(self.take(len)?).map_err(|_| MessageError::NameNotUtf8)?;
        Ok(text.parse()?)
    }

    fn image(&mut self) -> Result<ImageRef, MessageError> {
        let name = self.name()?;
        let epoch = self.u64()?;
        Ok(ImageRef::new(name, epoch).with_stamp(self.u64()?))
    }

    fn tier(&mut self) -> Result<Tier, MessageError> {
        match self.u8()? {
            0 => Ok(Tier::Ram),
            1 => Ok(Tier::Volume),
            other => Err(MessageError::BadTier(other)),
        }
    }

    fn range(&mut self) -> Result<BlockRange, MessageError> {
        let start = self.u64()?;
        Ok(BlockRange::new(start, self.u64()?)?)
    }

    /// Where the fields end and the bulk bytes begin.
    fn offset(&self) -> usize {
        self.at
    }

    fn finish(self) -> Result<(), MessageError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            extra => Err(MessageError::Trailing(self.kind, extra)),
        }
    }
}

impl Request {
    /// The frame kind this request travels as.
    pub fn kind(&self) -> Kind {
        match self {
            Request::Read { .. } => Kind::Read,
            Request::Write { .. } => Kind::Write,
            Request::Flush { .. } => Kind::Flush,
            Request::Discard { .. } => Kind::Discard,
            Request::Checksums { .. } => Kind::Checksums,
            Request::Hold { .. } => Kind::Hold,
            Request::Release { .. } => Kind::Release,
            Request::Meta { .. } => Kind::Meta,
            Request::Ping => Kind::Ping,
        }
    }

    /// The image the request is about (none for `Ping`).
    pub fn image(&self) -> Option<&ImageRef> {
        let image = match self {
            Request::Read { image, .. }
            | Request::Write { image, .. }
            | Request::Flush { image }
            | Request::Discard { image, .. }
            | Request::Checksums { image, .. }
            | Request::Hold { image, .. }
            | Request::Release { image, .. }
            | Request::Meta { image } => image,
            Request::Ping => return None,
        };
        Some(image)
    }

    /// What a well-behaved peer answers (besides `Error`, always allowed).
    pub fn expects(&self) -> Expect {
        match self {
            Request::Read { len, .. } => Expect::Data(*len as usize),
            Request::Checksums { blocks, .. } => Expect::Checksums(blocks.len() as usize),
            Request::Meta { .. } => Expect::MetaJson,
            _ => Expect::Ok,
        }
    }

    /// Checks the request's limits and encodes it; bulk data is moved, not copied.
    pub fn encode(self) -> Result<Payload, MessageError> {
        let kind = self.kind();
        let mut head = Vec::with_capacity(96);
        let mut body = Vec::new();
        match self {
            Request::Read {
                image,
                tier,
                block,
                offset,
                len,
            }
            | Request::Discard {
                image,
                tier,
                block,
                offset,
                len,
            } => {
                if kind == Kind::Read {
                    check_chunk(kind, len as usize)?;
                } else if len == 0 {
                    return Err(MessageError::ZeroLength(kind));
                }
                put_place(&mut head, &image, tier);
                head.extend_from_slice(&block.to_le_bytes());
                head.extend_from_slice(&offset.to_le_bytes());
                head.extend_from_slice(&len.to_le_bytes());
            }
            Request::Write {
                image,
                tier,
                block,
                offset,
                data,
            } => {
                check_chunk(kind, data.len())?;
                put_place(&mut head, &image, tier);
                head.extend_from_slice(&block.to_le_bytes());
                head.extend_from_slice(&offset.to_le_bytes());
                body = data;
            }
            Request::Flush { image } | Request::Meta { image } => put_image(&mut head, &image),
            Request::Checksums {
                image,
                tier,
                blocks,
            }
            | Request::Release {
                image,
                tier,
                blocks,
            } => {
                if kind == Kind::Checksums {
                    check_checksum_range(blocks)?;
                }
                put_place(&mut head, &image, tier);
                put_range(&mut head, blocks);
            }
            Request::Hold { image, meta_json } => {
                check_json(meta_json.len())?;
                put_image(&mut head, &image);
                body = meta_json;
            }
            Request::Ping => {}
        }
        Ok(Payload { kind, head, body })
    }

    /// Decodes and checks a request payload.
    pub fn decode(kind: Kind, mut payload: Vec<u8>) -> Result<Request, MessageError> {
        let mut f = Fields::new(kind, &payload);
        let request = match kind {
            Kind::Read | Kind::Discard => {
                let (image, tier) = (f.image()?, f.tier()?);
                let (block, offset, len) = (f.u64()?, f.u32()?, f.u32()?);
                f.finish()?;
                if kind == Kind::Read {
                    check_chunk(kind, len as usize)?;
                    Request::Read {
                        image,
                        tier,
                        block,
                        offset,
                        len,
                    }
                } else if len == 0 {
                    return Err(MessageError::ZeroLength(kind));
                } else {
                    Request::Discard {
                        image,
                        tier,
                        block,
                        offset,
                        len,
                    }
                }
            }
            Kind::Write => {
                let (image, tier) = (f.image()?, f.tier()?);
                let (block, offset) = (f.u64()?, f.u32()?);
                let start = f.offset();
                check_chunk(kind, payload.len() - start)?;
                payload.drain(..start);
                Request::Write {
                    image,
                    tier,
                    block,
                    offset,
                    data: payload,
                }
            }
            Kind::Flush | Kind::Meta => {
                let image = f.image()?;
                f.finish()?;
                if kind == Kind::Flush {
                    Request::Flush { image }
                } else {
                    Request::Meta { image }
                }
            }
            Kind::Checksums | Kind::Release => {
                let (image, tier, blocks) = (f.image()?, f.tier()?, f.range()?);
                f.finish()?;
                if kind == Kind::Checksums {
                    check_checksum_range(blocks)?;
                    Request::Checksums {
                        image,
                        tier,
                        blocks,
                    }
                } else {
                    Request::Release {
                        image,
                        tier,
                        blocks,
                    }
                }
            }
            Kind::Hold => {
                let image = f.image()?;
                let start = f.offset();
                check_json(payload.len() - start)?;
                payload.drain(..start);
                Request::Hold {
                    image,
                    meta_json: payload,
                }
            }
            Kind::Ping => {
                f.finish()?;
                Request::Ping
            }
            other => return Err(MessageError::NotARequest(other)),
        };
        Ok(request)
    }
}

/// The answer a request calls for, checked by the client before completing the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Ok,
    Data(usize),
    Checksums(usize),
    MetaJson,
}

impl Expect {
    /// Whether `response` answers a request expecting `self`.
    pub fn accepts(self, response: &Response) -> bool {
        match (self, response) {
            (_, Response::Error { .. }) | (Expect::Ok, Response::Ok) => true,
            (Expect::Data(n), Response::Data(data)) => data.len() == n,
            (Expect::Checksums(n), Response::Checksums(sums)) => sums.len() == n,
            (Expect::MetaJson, Response::MetaJson(_)) => true,
            _ => false,
        }
    }
}

/// Cuts `message` to at most `MAX_ERROR_MESSAGE` bytes at a character boundary.
fn clip(message: &str) -> &str {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl Response {
    /// An `Error` answer.
    pub fn error(code: u16, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Response::Ok => Kind::Ok,
            Response::Data(_) => Kind::Data,
            Response::Checksums(_) => Kind::ChecksumList,
            Response::MetaJson(_) => Kind::MetaJson,
            Response::Error { .. } => Kind::Error,
        }
    }

    /// Checks the response's limits and encodes it; data is moved, not copied. Error
    /// messages over the cap are cut rather than refused.
    pub fn encode(self) -> Result<Payload, MessageError> {
        let kind = self.kind();
        let mut head = Vec::new();
        let mut body = Vec::new();
        match self {
            Response::Ok => {}
            Response::Data(data) => {
                if data.len() > MAX_CHUNK as usize {
                    return Err(MessageError::ChunkTooLarge { len: data.len() });
                }
                body = data;
            }
            Response::Checksums(sums) => {
                if sums.len() as u64 > MAX_CHECKSUM_BLOCKS {
                    let blocks = sums.len() as u64;
                    return Err(MessageError::TooManyBlocks { blocks });
                }
                head.reserve(4 + sums.len() * 33);
                head.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for sum in sums {
                    match sum {
                        None => head.push(0),
                        Some(digest) => {
                            head.push(1);
                            head.extend_from_slice(&digest);
                        }
                    }
                }
            }
            Response::MetaJson(json) => {
                check_json(json.len())?;
                body = json;
            }
            Response::Error { code, message } => {
                let message = clip(&message);
                head.extend_from_slice(&code.to_le_bytes());
                head.extend_from_slice(&(message.len() as u16).to_le_bytes());
                head.extend_from_slice(message.as_bytes());
            }
        }
        Ok(Payload { kind, head, body })
    }

    /// Decodes and checks a response payload.
    pub fn decode(kind: Kind, payload: Vec<u8>) -> Result<Response, MessageError> {
        let response = match kind {
            Kind::Ok => {
                Fields::new(kind, &payload).finish()?;
                Response::Ok
            }
            Kind::Data => {
                if payload.len() > MAX_CHUNK as usize {
                    return Err(MessageError::ChunkTooLarge { len: payload.len() });
                }
                Response::Data(payload)
            }
            Kind::ChecksumList => Response::Checksums(decode_digests(&payload)?),
            Kind::MetaJson => {
                check_json(payload.len())?;
                Response::MetaJson(payload)
            }
            Kind::Error => decode_error(&payload)?,
            other => return Err(MessageError::NotAResponse(other)),
        };
        Ok(response)
    }
}

fn decode_digests(payload: &[u8]) -> Result<Vec<Option<BlockDigest>>, MessageError> {
    let mut f = Fields::new(Kind::ChecksumList, payload);
    let count = u64::from(f.u32()?);
    if count > MAX_CHECKSUM_BLOCKS {
        return Err(MessageError::TooManyBlocks { blocks: count });
    }
    let mut sums = Vec::with_capacity(count as usize);
    for _ in 0..count {
        sums.push(match f.u8()? {
            0 => None,
            1 => Some(f.array()?),
            tag => return Err(MessageError::BadDigestTag(tag)),
        });
    }
    f.finish()?;
    Ok(sums)
}

fn decode_error(payload: &[u8]) -> Result<Response, MessageError> {
    let mut f = Fields::new(Kind::Error, payload);
    let code = f.u16()?;
    let len = f.u16()? as usize;
    if len > MAX_ERROR_MESSAGE {
        return Err(MessageError::ErrorMessageTooLong { len });
    }
    let text = std::str::from_utf8(f.take(len)?).map_err(|_| MessageError::ErrorMessageNotUtf8)?;
    let message = text.to_string();
    f.finish()?;
    Ok(Response::Error { code, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn joined(payload: Payload) -> (Kind, Vec<u8>) {
        (payload.kind, [payload.head, payload.body].concat())
    }

    fn name(text: &str) -> ImageRef {
        ImageRef::new(text.parse().unwrap(), 7)
    }

    fn round_trip(request: Request) {
        let (kind, bytes) = joined(request.clone().encode().unwrap());
        assert_eq!(Request::decode(kind, bytes).unwrap(), request);
    }

    #[test]
    fn every_request_round_trips() {
        let image = name("disk0");
        let blocks = BlockRange::new(3, 9).unwrap();
        round_trip(Request::Read {
            image: image.clone(),
            tier: Tier::Ram,
            block: 7,
            offset: 512,
            len: 4096,
        });
        round_trip(Request::Write {
            image: image.clone(),
            tier: Tier::Volume,
            block: u64::MAX,
            offset: 1,
            data: vec![5; 100],
        });
        round_trip(Request::Flush {
            image: image.clone(),
        });
        round_trip(Request::Discard {
            image: image.clone(),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            len: u32::MAX,
        });
        round_trip(Request::Checksums {
            image: image.clone(),
            tier: Tier::Volume,
            blocks,
        });
        round_trip(Request::Hold {
            image: image.clone(),
            meta_json: b"{\"a\":1}".to_vec(),
        });
        round_trip(Request::Release {
            image: image.clone(),
            tier: Tier::Ram,
            blocks,
        });
        round_trip(Request::Meta { image });
        round_trip(Request::Ping);
    }

    #[test]
    fn read_layout_is_as_documented() {
        let request = Request::Read {
            image: name("ab"),
            tier: Tier::Volume,
            block: 2,
            offset: 3,
            len: 4,
        };
        let (kind, bytes) = joined(request.encode().unwrap());
        assert_eq!(kind, Kind::Read);
        let expected = [
            &[2u8, b'a', b'b'][..],
            &7u64.to_le_bytes(),
            &0u64.to_le_bytes(),
            &[1u8],
            &2u64.to_le_bytes(),
            &3u32.to_le_bytes(),
            &4u32.to_le_bytes(),
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let image = name("d");
        let big = Request::Write {
            image: image.clone(),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            data: vec![0; MAX_CHUNK as usize + 1],
        };
        assert!(matches!(
            big.encode(),
            Err(MessageError::ChunkTooLarge { .. })
        ));
        let empty = Request::Read {
            image: image.clone(),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            len: 0,
        };
        assert_eq!(
            empty.encode().unwrap_err(),
            MessageError::ZeroLength(Kind::Read)
        );
        let wide = BlockRange::new(0, MAX_CHECKSUM_BLOCKS + 1).unwrap();
        let sums = Request::Checksums {
            image: image.clone(),
            tier: Tier::Ram,
            blocks: wide,
        };
        assert!(matches!(
            sums.encode(),
            Err(MessageError::TooManyBlocks { .. })
        ));
        // The same, hand-encoded, is refused on decode.
        let mut raw = vec![1, b'd'];
        raw.extend_from_slice(&7u64.to_le_bytes());
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.push(0);
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.extend_from_slice(&(MAX_CHECKSUM_BLOCKS + 1).to_le_bytes());
        assert!(matches!(
            Request::decode(Kind::Checksums, raw),
            Err(MessageError::TooManyBlocks { .. })
        ));
        let read = |len: u32| {
            [
                &[1u8, b'd'][..],
                &[0; 16],
                &[0],
                &[0; 12],
                &len.to_le_bytes(),
            ]
            .concat()
        };
        assert!(matches!(
            Request::decode(Kind::Read, read(MAX_CHUNK + 1)),
            Err(MessageError::ChunkTooLarge { .. })
        ));
        assert!(Request::decode(Kind::Read, read(MAX_CHUNK)).is_ok());
    }

    #[test]
    fn bad_fields_are_refused() {
        let bad_name = [&[2u8, b'.', b'x'][..]].concat();
        assert!(matches!(
            Request::decode(Kind::Flush, bad_name),
            Err(MessageError::BadName(_))
        ));
        assert!(matches!(
            Request::decode(Kind::Flush, vec![2, b'a', b'/']),
            Err(MessageError::BadName(_))
        ));
        assert_eq!(
            Request::decode(Kind::Flush, vec![3, b'a']),
            Err(MessageError::Truncated(Kind::Flush))
        );
        assert_eq!(
            Request::decode(Kind::Flush, [&[1u8, b'a'][..], &[0; 17]].concat()),
            Err(MessageError::Trailing(Kind::Flush, 1))
        );
        assert_eq!(
            Request::decode(Kind::Flush, vec![1, 0xff]),
            Err(MessageError::NameNotUtf8)
        );
        let tier9 = [&[1u8, b'a'][..], &[0; 16], &[9], &[0; 16]].concat();
        assert_eq!(
            Request::decode(Kind::Release, tier9),
            Err(MessageError::BadTier(9))
        );
        let empty_range = [
            &[1u8, b'a'][..],
            &[0; 16],
            &[0],
            &5u64.to_le_bytes(),
            &5u64.to_le_bytes(),
        ]
        .concat();
        assert!(matches!(
            Request::decode(Kind::Release, empty_range),
            Err(MessageError::BadRange(_))
        ));
        assert_eq!(
            Request::decode(Kind::Ok, vec![]),
            Err(MessageError::NotARequest(Kind::Ok))
        );
        assert_eq!(
            Response::decode(Kind::Read, vec![]),
            Err(MessageError::NotAResponse(Kind::Read))
        );
    }

    #[test]
    fn responses_round_trip_and_check() {
        let all = [
            Response::Ok,
            Response::Data(vec![1, 2, 3]),
            Response::Checksums(vec![None, Some([7; 32]), None]),
            Response::MetaJson(b"{}".to_vec()),
            Response::error(code::NOT_HELD, "no copy of block 3 here"),
        ];
        for response in all {
            let (kind, bytes) = joined(response.clone().encode().unwrap());
            assert_eq!(Response::decode(kind, bytes).unwrap(), response);
        }
        let tag2 = [&1u32.to_le_bytes()[..], &[2]].concat();
        assert_eq!(
            Response::decode(Kind::ChecksumList, tag2),
            Err(MessageError::BadDigestTag(2))
        );
        let huge = (MAX_CHECKSUM_BLOCKS as u32 + 1).to_le_bytes().to_vec();
        assert!(matches!(
            Response::decode(Kind::ChecksumList, huge),
            Err(MessageError::TooManyBlocks { .. })
        ));
        assert_eq!(
            Response::decode(Kind::Ok, vec![0]),
            Err(MessageError::Trailing(Kind::Ok, 1))
        );
    }

    #[test]
    fn long_error_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let (kind, bytes) = joined(Response::error(3, long).encode().unwrap());
        match Response::decode(kind, bytes).unwrap() {
            Response::Error { code: 3, message } => {
                assert!(
                    message.len() <= MAX_ERROR_MESSAGE && message.len() >= MAX_ERROR_MESSAGE - 1
                );
                assert!(message.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expect_matches_answers_to_requests() {
        let read = Request::Read {
            image: name("a"),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            len: 4,
        };
        assert!(read.expects().accepts(&Response::Data(vec![0; 4])));
        assert!(!read.expects().accepts(&Response::Data(vec![0; 3])));
        assert!(read.expects().accepts(&Response::error(1, "x")));
        assert!(!read.expects().accepts(&Response::Ok));
        let blocks = BlockRange::new(0, 2).unwrap();
        let sums = Request::Checksums {
            image: name("a"),
            tier: Tier::Ram,
            blocks,
        };
        assert!(sums
            .expects()
            .accepts(&Response::Checksums(vec![None, None])));
        assert!(!sums.expects().accepts(&Response::Checksums(vec![None])));
        assert!(Expect::Ok.accepts(&Response::Ok));
        assert!(!Expect::MetaJson.accepts(&Response::Ok));
    }

    fn image() -> impl Strategy<Value = ImageRef> {
        ("[a-z0-9][a-z0-9._-]{0,63}", any::<u64>(), any::<u64>()).prop_map(|(s, epoch, stamp)| {
            ImageRef::new(s.parse().unwrap(), epoch).with_stamp(stamp)
        })
    }

    fn tier() -> impl Strategy<Value = Tier> {
        prop_oneof![Just(Tier::Ram), Just(Tier::Volume)]
    }

    fn range() -> impl Strategy<Value = BlockRange> {
        (
            0u64..u64::MAX - MAX_CHECKSUM_BLOCKS,
            1..=MAX_CHECKSUM_BLOCKS,
        )
            .prop_map(|(start, len)| BlockRange::new(start, start + len).unwrap())
    }

    fn request() -> impl Strategy<Value = Request> {
        let data = prop::collection::vec(any::<u8>(), 1..2000);
        prop_oneof![
            (image(), tier(), any::<u64>(), any::<u32>(), 1..=MAX_CHUNK).prop_map(
                |(image, tier, block, offset, len)| Request::Read {
                    image,
                    tier,
                    block,
                    offset,
                    len
                }
            ),
            (image(), tier(), any::<u64>(), any::<u32>(), data.clone()).prop_map(
                |(image, tier, block, offset, data)| Request::Write {
                    image,
                    tier,
                    block,
                    offset,
                    data
                }
            ),
            image().prop_map(|image| Request::Flush { image }),
            (image(), tier(), any::<u64>(), any::<u32>(), 1..=u32::MAX).prop_map(
                |(image, tier, block, offset, len)| Request::Discard {
                    image,
                    tier,
                    block,
                    offset,
                    len
                }
            ),
            (image(), tier(), range()).prop_map(|(image, tier, blocks)| Request::Checksums {
                image,
                tier,
                blocks
            }),
            (image(), prop::collection::vec(any::<u8>(), 0..2000))
                .prop_map(|(image, meta_json)| Request::Hold { image, meta_json }),
            (image(), tier(), range()).prop_map(|(image, tier, blocks)| Request::Release {
                image,
                tier,
                blocks
            }),
            image().prop_map(|image| Request::Meta { image }),
            Just(Request::Ping),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            Just(Response::Ok),
            prop::collection::vec(any::<u8>(), 0..2000).prop_map(Response::Data),
            prop::collection::vec(prop::option::of(any::<[u8; 32]>()), 0..100)
                .prop_map(Response::Checksums),
            prop::collection::vec(any::<u8>(), 0..2000).prop_map(Response::MetaJson),
            (any::<u16>(), ".{0,100}")
                .prop_map(|(code, message)| Response::Error { code, message }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in request()) {
            let (kind, bytes) = joined(request.clone().encode().unwrap());
            prop_assert_eq!(Request::decode(kind, bytes).unwrap(), request);
        }

        #[test]
        fn responses_round_trip(response in response()) {
            let (kind, bytes) = joined(response.clone().encode().unwrap());
            prop_assert_eq!(Response::decode(kind, bytes).unwrap(), response);
        }

        #[test]
        fn arbitrary_payloads_never_panic(
            kind in prop::sample::select(Kind::ALL.to_vec()),
            bytes in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = Request::decode(kind, bytes.clone());
            let _ = Response::decode(kind, bytes);
        }
    }
}
