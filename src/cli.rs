//! The command line: clap structures only. Validation into a `Config` happens in main.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::image::{ImageName, Tier};
use crate::size::Size;

#[derive(Debug, Parser)]
#[command(
    name = "cormorant",
    version,
    about = "Distributed, operator-controlled VM disk store served to QEMU over vhost-user-blk"
)]
pub struct Cli {
    /// Directory of the control socket and the images' vhost-user sockets.
    #[arg(long, global = true, default_value = "/run/cormorant")]
    pub run_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: export every image and serve the control socket.
    Serve(ServeArgs),
    /// Create, inspect, remove, import and export images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// RAM tier directory (on tmpfs).
    #[arg(long, default_value = "/dev/shm/cormorant")]
    pub ram_dir: PathBuf,
    /// Volume tier directory (on a disk file system).
    #[arg(long, default_value = "/var/lib/cormorant")]
    pub volume_dir: PathBuf,
    /// Use synchronous I/O on the volume tier even where io_uring works (for comparison).
    #[arg(long)]
    pub no_uring: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a thin image: it takes no space until written.
    Create {
        name: ImageName,
        /// Size, with an optional K, M, G or T suffix.
        #[arg(long)]
        size: Size,
        #[command(flatten)]
        layout: Layout,
        /// Refuse guest writes.
        #[arg(long)]
        read_only: bool,
    },
    /// List the images.
    List,
    /// Print an image's metadata as JSON, with the locations of every block.
    Info { name: ImageName },
    /// Remove an image and its block files (refused while a VM uses it).
    Rm { name: ImageName },
    /// Create an image from a file: raw, or any format `qemu-img` reads.
    Import {
        name: ImageName,
        file: PathBuf,
        #[command(flatten)]
        layout: Layout,
    },
    /// Write an image to a file: raw, or another format through `qemu-img convert`.
    Export {
        name: ImageName,
        file: PathBuf,
        /// Output format (raw, qcow2, ...); anything but raw needs qemu-img.
        #[arg(long, default_value = "raw")]
        format: String,
    },
}

#[derive(Debug, Args)]
pub struct Layout {
    /// Block size: a power of two from 4K to 1G.
    #[arg(long, default_value = "4M")]
    pub block_size: Size,
    /// Tier the image's blocks are placed on.
    #[arg(long, default_value = "ram")]
    pub tier: Tier,
}
