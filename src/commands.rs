//! The client subcommands: each builds a control request, sends it, and prints the answer.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{Command, ImageCommand, LocationCommand};
use crate::control::client::{call, ClientError};
use crate::control::protocol::Request;
use crate::qos::QosUpdate;
use crate::tiering::TierMode;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("bad path {path}: {source}", path = path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("cannot run qemu-img (is it installed?): {0}")]
    QemuImg(#[source] std::io::Error),
    #[error("qemu-img convert {} -> {} failed ({status})", from.display(), to.display())]
    Convert {
        from: PathBuf,
        to: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("cannot print the answer: {0}")]
    Print(#[from] serde_json::Error),
}

pub fn run(run_dir: &Path, command: Command) -> Result<(), CommandError> {
    let socket = run_dir.join("control.sock");
    let value = match command {
        Command::Image(image) => image_command(&socket, image)?,
        Command::Location(LocationCommand::Add {
            name,
            blocks,
            at,
            replace,
        }) => call_quiet(
            &socket,
            Request::LocationAdd {
                name,
                blocks,
                at,
                replace,
            },
        )?,
        Command::Location(LocationCommand::Rm { name, blocks, at }) => {
            call_quiet(&socket, Request::LocationRm { name, blocks, at })?
        }
        Command::Sync { name, blocks, rate } => {
            let request = Request::Sync {
                name,
                blocks,
                rate: rate.map(|r| r.0),
            };
            call_with_progress(&socket, request, "sync")?
        }
        Command::Stats { name } => call_quiet(&socket, Request::Stats { name })?,
        Command::Node(crate::cli::NodeCommand::List) => call_quiet(&socket, Request::NodeList)?,
        Command::Serve(_) => unreachable!("serve is not a client command"),
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn image_command(socket: &Path, command: ImageCommand) -> Result<serde_json::Value, CommandError> {
    let socket = socket.to_path_buf();
    let value = match command {
        ImageCommand::Create {
            name,
            size,
            layout,
            at,
            read_only,
            limits,
            stripe,
        } => call_quiet(
            &socket,
            Request::ImageCreate {
                name,
                size: size.0,
                block_size: layout.block_size.0,
                tier: layout.tier.tier(),
                read_only,
                at,
                qos: QosUpdate {
                    tiering: layout.tier.is_auto().then_some(TierMode::Auto),
                    ..limits.update()
                },
                stripe: stripe.spec(),
            },
        )?,
        ImageCommand::Set { name, limits, tier } => {
            let qos = QosUpdate {
                tiering: tier,
                ..limits.update()
            };
            if qos.is_empty() {
                return Err(CommandError::Usage(
                    "image set changes an image's limits, cache and tiering: give --iops-limit \
                     N|none, --bps-limit BYTES|none, --burst TIME|default, --cache \
                     ram|volume|off, --cache-size SIZE|none and/or --tier auto|manual"
                        .into(),
                ));
            }
            call_quiet(&socket, Request::ImageSet { name, qos })?
        }
        ImageCommand::List => call_quiet(&socket, Request::ImageList)?,
        ImageCommand::Adopt { name, from } => {
            call_quiet(&socket, Request::ImageAdopt { name, from })?
        }
        ImageCommand::Info { name } => call_quiet(&socket, Request::ImageInfo { name })?,
        ImageCommand::Prefetch {
            name,
            rate,
            no_wait,
        } => {
            let rate = rate.map(|r| r.0);
            let started = call_quiet(
                &socket,
                Request::ImagePrefetch {
                    name: name.clone(),
                    rate,
                },
            )?;
            if no_wait {
                started
            } else {
                prefetch_progress(&socket, &name)?
            }
        }
        ImageCommand::Rm { name } => call_quiet(&socket, Request::ImageRm { name })?,
        ImageCommand::Snapshot { group, mut names } => {
            let Some(snapshot) = names.pop() else {
                return Err(CommandError::Usage("image snapshot NAME SNAP".into()));
            };
            if !group && names.len() != 1 {
                return Err(CommandError::Usage(
                    "image snapshot NAME SNAP takes one image; use --group NAME... SNAP for several at one instant".into(),
                ));
            }
            call_quiet(&socket, Request::ImageSnapshot { names, snapshot })?
        }
        ImageCommand::Clone {
            source,
            name,
            tier,
            at,
        } => call_quiet(
            &socket,
            Request::ImageClone {
                source,
                name,
                tier,
                at,
            },
        )?,
        ImageCommand::Flatten { name } => {
            call_with_progress(&socket, Request::ImageFlatten { name }, "flatten")?
        }
        ImageCommand::Import { name, file, layout } => {
            let raw = RawSource::prepare(&file)?;
            let request = Request::ImageImport {
                name: name.clone(),
                path: absolute(raw.path())?,
                block_size: layout.block_size.0,
                tier: layout.tier.tier(),
            };
            let imported = call_with_progress(&socket, request, "import")?;
            if layout.tier.is_auto() {
                // Imported onto the volume tier; from now on its blocks move by heat.
                let qos = QosUpdate {
                    tiering: Some(TierMode::Auto),
                    ..QosUpdate::default()
                };
                call_quiet(&socket, Request::ImageSet { name, qos })?;
            }
            imported
        }
        ImageCommand::Resize {
            name,
            size,
            allow_shrink,
        } => call_quiet(
            &socket,
            Request::ImageResize {
                name,
                size: size.0,
                allow_shrink,
            },
        )?,
        ImageCommand::Export { name, file, format } => {
            let raw_path = if format == "raw" {
                file.clone()
            } else {
                temp_path(&file)
            };
            let request = Request::ImageExport {
                name,
                path: absolute(&raw_path)?,
            };
            let value = call_with_progress(&socket, request, "export")?;
            if format != "raw" {
                let converted = convert(&raw_path, "raw", &file, &format);
                let _ = std::fs::remove_file(&raw_path);
                converted?;
            }
            value
        }
    };
    Ok(value)
}

fn call_quiet(socket: &Path, request: Request) -> Result<serde_json::Value, ClientError> {
    call(socket, &request, |_, _| {})
}

/// How often the prefetch's progress bar asks the daemon.
const PREFETCH_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Follows a prefetch in the daemon (polling `stats`) with a progress bar until it ends;
/// returns its final figures.
fn prefetch_progress(
    socket: &Path,
    name: &crate::image::ImageName,
) -> Result<serde_json::Value, ClientError> {
    let bar = progress_bar("prefetch");
    loop {
        let stats = call_quiet(
            socket,
            Request::Stats {
                name: Some(name.clone()),
            },
        )?;
        let prefetch = stats["cache"]["prefetch"].clone();
        bar.set_length(prefetch["blocks"].as_u64().unwrap_or(0));
        bar.set_position(prefetch["blocks_done"].as_u64().unwrap_or(0));
        if prefetch["running"] != serde_json::Value::Bool(true) {
            bar.finish_and_clear();
            if let Some(why) = prefetch["stopped"].as_str() {
                eprintln!("cormorant: prefetch of {name} stopped early: {why}");
            }
            return Ok(stats["cache"].clone());
        }
        std::thread::sleep(PREFETCH_POLL);
    }
}

/// Calls with a progress bar on a terminal (indicatif draws nothing when stderr is not one).
fn call_with_progress(
    socket: &Path,
    request: Request,
    what: &str,
) -> Result<serde_json::Value, ClientError> {
    let bar = progress_bar(what);
    let result = call(socket, &request, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    result
}

/// A progress bar in blocks on a terminal (indicatif draws nothing when stderr is not one).
fn progress_bar(what: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    // The template is fixed text; were it refused, the default style does as well.
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} blocks"))
    {
        bar.set_style(style);
    }
    bar
}

/// The daemon opens the file itself, so it gets an absolute path.
fn absolute(path: &Path) -> Result<String, CommandError> {
    let path = std::path::absolute(path).map_err(|source| CommandError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| CommandError::NotUtf8(path.clone()))
}

/// A raw view of an import source: the file itself, or a converted temporary copy.
struct RawSource {
    path: PathBuf,
    temporary: bool,
}

impl RawSource {
    fn prepare(file: &Path) -> Result<RawSource, CommandError> {
        let format = probe_format(file);
        match format.as_deref() {
            None | Some("raw") => Ok(RawSource {
                path: file.to_path_buf(),
                temporary: false,
            }),
            Some(format) => {
                let tmp = temp_path(file);
                convert(file, format, &tmp, "raw")?;
                Ok(RawSource {
                    path: tmp,
                    temporary: true,
                })
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RawSource {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The image format `qemu-img` sees, or None when qemu-img is not installed (then raw).
fn probe_format(file: &Path) -> Option<String> {
    let output = Process::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(file)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    info["format"].as_str().map(str::to_string)
}

fn temp_path(beside: &Path) -> PathBuf {
    let name = beside
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(".cormorant-{}-{name}.raw", std::process::id()))
}

fn convert(from: &Path, from_format: &str, to: &Path, to_format: &str) -> Result<(), CommandError> {
    let status = Process::new("qemu-img")
        .args(["convert", "-f", from_format, "-O", to_format])
        .arg(from)
        .arg(to)
        .status()
        .map_err(CommandError::QemuImg)?;
    if !status.success() {
        return Err(CommandError::Convert {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            status,
        });
    }
    Ok(())
}
