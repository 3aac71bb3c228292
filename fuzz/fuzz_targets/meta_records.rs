//! Fuzzes what the cluster's metadata decoders read back from etcd: key names, JSON records,
//! and an image's metadata put back together from its header and extents records.
//!
//! Input: a mode byte, then
//! - mode 0: a key through `Keys::parse` (bit 7 of the mode byte puts the cluster's prefix in
//!   front, so the fuzzer starts past it). A key that parses re-encodes with the `Keys`
//!   builders to exactly the same bytes.
//! - mode 1: JSON through serde into every record type (`ImageRecord`, `ChunkRecord`,
//!   `NodeRecord`, `ActiveRecord`, `LostRecord`). A value that decodes serialises to JSON that
//!   decodes to the same value.
//! - mode 2: a header and extents in a compact binary form (below) through `meta_of`.
//! - mode 3: JSON `[ImageRecord, [ChunkRecord, ...]]` through `meta_of`.
//!
//! `meta_of` must answer Ok or Err; when it succeeds, `chunks_of` of the result gives records
//! (one per chunk, each holding only its chunk's blocks) that `meta_of` puts back to the same
//! metadata. Allocations are bounded by libFuzzer's `-malloc_limit_mb` (2 GiB by default; the
//! block table is 16 MiB at most, so run with `-malloc_limit_mb=64` to be strict).
//!
//! Binary form of mode 2: version u8, flags u8; with flag bit 0, size u64 and block size u64
//! (raw, any value); otherwise a block size shift u8 (4 KiB << shift % 19) and a size
//! `(u32 + 1) * 512`. Then extents while bytes remain: control u8 (bit 0 starts a new chunk
//! record; bit 1: raw range of two u64s, else a u16 length from where the last extent ended,
//! one block earlier with bit 2, one later with bit 3; bit 4: copies unsynced), then a u8
//! bitmask over eight (node, tier) places.
#![no_main]

use cormorant::image::table::Extent;
use cormorant::image::{BlockRange, ImageId, ImageMeta, ImageName, Location, NodeId, Tier};
use cormorant::meta::records::{
    self, ActiveRecord, ChunkRecord, ImageRecord, Key, Keys, LostRecord, NodeRecord, CHUNK_BLOCKS,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => key(rest, mode & 0x80 != 0),
        1 => json_records(rest),
        2 => {
            if let Some((record, chunks)) = binary_meta(rest) {
                check_meta(record, &chunks);
            }
        }
        _ => {
            if let Ok((record, chunks)) =
                serde_json::from_slice::<(ImageRecord, Vec<ChunkRecord>)>(rest)
            {
                check_meta(record, &chunks);
            }
        }
    }
});

fn key(bytes: &[u8], with_prefix: bool) {
    let keys = Keys::new("c1");
    let key = match with_prefix {
        true => [&keys.prefix()[..], bytes].concat(),
        false => bytes.to_vec(),
    };
    let Some(parsed) = keys.parse(&key) else {
        return;
    };
    let again = match &parsed {
        Key::Node(node) => keys.node(node),
        Key::Incarnation(node) => keys.incarnation(node),
        Key::Image(name) => keys.image(name),
        Key::Chunk(id, chunk) => keys.chunk(*id, *chunk),
        Key::Active(id) => keys.active(*id),
        Key::Lost(id, node) => keys.lost(*id, node),
        Key::Qos(id) => keys.qos(*id),
        Key::Stripe(id) => keys.stripe(*id),
        Key::Size(id) => keys.size(*id),
    };
    assert_eq!(again, key, "{parsed:?} re-encodes differently");
    assert_eq!(keys.encode(&parsed), key);
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(json: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(json) {
        let again = serde_json::to_vec(&value).expect("a decoded record encodes");
        let back: T = serde_json::from_slice(&again).expect("an encoded record decodes");
        assert_eq!(back, value);
    }
}

fn json_records(json: &[u8]) {
    round_trip::<ImageRecord>(json);
    round_trip::<ChunkRecord>(json);
    round_trip::<NodeRecord>(json);
    round_trip::<ActiveRecord>(json);
    round_trip::<LostRecord>(json);
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

fn places(mask: u8, synced: bool) -> Vec<Location> {
    (0..8)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| Location {
            node: ["a", "b", "c", "d"][bit / 2].parse().unwrap(),
            tier: if bit % 2 == 0 {
                Tier::Ram
            } else {
                Tier::Volume
            },
            synced,
        })
        .collect()
}

fn binary_meta(bytes: &[u8]) -> Option<(ImageRecord, Vec<ChunkRecord>)> {
    let mut input = Bytes(bytes);
    let version = u32::from(input.u8()?);
    let flags = input.u8()?;
    let (size, block_size) = if flags & 1 != 0 {
        (input.u64()?, input.u64()?)
    } else {
        let block_size = 4096u64 << (input.u8()? % 19);
        (u64::from(input.u32()?) * 512 + 512, block_size)
    };
    let record = ImageRecord {
        version,
        id: ImageId::LEGACY,
        owner: NodeId::local(),
        size,
        block_size,
        tier: Tier::Ram,
        read_only: flags & 2 != 0,
        chunk_blocks: CHUNK_BLOCKS,
    };
    let mut chunks = vec![ChunkRecord {
        extents: Vec::new(),
    }];
    let mut at = 0u64;
    while let Some(control) = input.u8() {
        if control & 1 != 0 {
            chunks.push(ChunkRecord {
                extents: Vec::new(),
            });
        }
        let (start, end) = if control & 2 != 0 {
            (input.u64()?, input.u64()?)
        } else {
            let start = match control & 0xc {
                4 => at.saturating_sub(1),
                8 => at.saturating_add(1),
                _ => at,
            };
            (start, start.saturating_add(u64::from(input.u16()?) + 1))
        };
        let locations = places(input.u8()?, control & 0x10 == 0);
        let Ok(blocks) = BlockRange::new(start, end) else {
            continue;
        };
        at = end;
        chunks
            .last_mut()
            .unwrap()
            .extents
            .push(Extent { blocks, locations });
    }
    Some((record, chunks))
}

fn check_meta(record: ImageRecord, chunks: &[ChunkRecord]) {
    let name: ImageName = "img".parse().unwrap();
    let Ok(meta) = records::meta_of(name.clone(), 7, record.clone(), chunks, Default::default())
    else {
        return;
    };
    let cut = records::chunks_of(&meta.table);
    assert_eq!(cut.len() as u64, records::chunk_count(meta.blocks()));
    for (i, (chunk, part)) in cut.iter().enumerate() {
        assert_eq!(*chunk, i as u64);
        for extent in &part.extents {
            assert_eq!(extent.blocks.start() / CHUNK_BLOCKS, *chunk);
            assert_eq!((extent.blocks.end() - 1) / CHUNK_BLOCKS, *chunk);
        }
    }
    let parts: Vec<ChunkRecord> = cut.into_iter().map(|(_, part)| part).collect();
    let again: ImageMeta =
        records::meta_of(name.clone(), 7, record, &parts, Default::default()).unwrap();
    assert_eq!(again, meta);
    let from_own = records::meta_of(name, 7, ImageRecord::of(&meta), &parts, meta.qos).unwrap();
    assert_eq!(from_own, meta);
    assert!(records::changed_chunks(&meta.table, &again.table).is_empty());
}
