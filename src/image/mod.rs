//! What an image is: its name, shape, and where each block's copies live. Nothing here does
//! I/O on block files; only the metadata file is read and written.

pub mod id;
pub mod location;
pub mod meta;
pub mod name;
pub mod range;
pub mod table;

pub use id::ImageId;
pub use location::{Location, LocationError, NodeId, Placement, Tier};
pub use meta::{ImageMeta, MetaError, SECTOR_SIZE};
pub use name::ImageName;
pub use range::BlockRange;
pub use table::BlockTable;
