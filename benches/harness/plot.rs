//! PNG plots of the ratios, drawn with plotters' pure-Rust bitmap backend: one horizontal bar per
//! (case, other system), a line at 1.0x. Text needs a TrueType font, found at run time under
//! /usr/share/fonts (DejaVu Sans on Debian); without one the bars are drawn unlabelled.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{ratios, Measurement};

/// Family name the found font is registered under.
const FAMILY: &str = "sans-serif";
/// Width and row height of a chart, in pixels.
const WIDTH: u32 = 1100;
const ROW: u32 = 26;
/// Pixels left of the bars for the labels.
const LABEL_W: i32 = 430;

/// Registers a font once; true if text can be drawn.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let Some(path) = find_font() else {
            return false;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        // plotters keeps fonts for the life of the program: leak the bytes once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
    })
}

fn find_font() -> Option<PathBuf> {
    let preferred = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if preferred.exists() {
        return Some(preferred.to_path_buf());
    }
    let mut stack = vec![PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ttf") {
                return Some(p);
            }
        }
    }
    None
}

/// One bar.
struct Bar {
    label: String,
    value: f64,
}

/// Writes `<group>-iops.png` and `<group>-p50.png` for every group; returns the files written.
pub fn write_all(dir: &Path, ms: &[Measurement]) -> Vec<PathBuf> {
    let mut groups: Vec<&str> = Vec::new();
    for m in ms {
        if !groups.contains(&m.group.as_str()) {
            groups.push(&m.group);
        }
    }
    let mut written = Vec::new();
    for g in groups {
        let (iops, p50) = bars(ms, g);
        let slug = g.replace(' ', "-");
        for (kind, bars, title) in [
            ("iops", iops, "IOPS, Cormorant / other (higher is better)"),
            (
                "p50",
                p50,
                "p50 latency, Cormorant / other (lower is better)",
            ),
        ] {
            if bars.is_empty() {
                continue;
            }
            let path = dir.join(format!("{slug}-{kind}.png"));
            match draw(&path, &format!("{g}: {title}"), &bars) {
                Ok(()) => written.push(path),
                Err(e) => eprintln!("plot {}: {e}", path.display()),
            }
        }
    }
    written
}

fn bars(ms: &[Measurement], group: &str) -> (Vec<Bar>, Vec<Bar>) {
    let in_group: Vec<&Measurement> = ms.iter().filter(|m| m.group == group).collect();
    let (mut iops, mut p50) = (Vec::new(), Vec::new());
    for ours in in_group.iter().filter(|m| m.system == "cormorant") {
        for other in in_group
            .iter()
            .filter(|m| m.case == ours.case && m.system != "cormorant")
        {
            let (ri, rl) = ratios(&ours.result, &other.result);
            let label = format!("{} vs {}", ours.case, other.system);
            if ri.is_finite() {
                iops.push(Bar {
                    label: label.clone(),
                    value: ri,
                });
            }
            if rl.is_finite() {
                p50.push(Bar { label, value: rl });
            }
        }
    }
    (iops, p50)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, title: &str, bars: &[Bar]) -> DrawResult {
    let text = font_ready();
    let height = 60 + ROW * bars.len() as u32 + 30;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|b| b.value).fold(1.0, f64::max) * 1.1;
    let (x0, x1) = (LABEL_W, WIDTH as i32 - 80);
    let x_of = |v: f64| x0 + ((x1 - x0) as f64 * (v / max)) as i32;
    if text {
        root.draw(&Text::new(title, (10, 10), (FAMILY, 20).into_font()))?;
    }
    for (i, b) in bars.iter().enumerate() {
        let y = 50 + ROW as i32 * i as i32;
        let color = if b.label.contains("host-fio") {
            RGBColor(150, 150, 150)
        } else {
            RGBColor(40, 100, 170)
        };
        root.draw(&Rectangle::new(
            [(x0, y + 3), (x_of(b.value), y + ROW as i32 - 3)],
            color.filled(),
        ))?;
        if text {
            let font = (FAMILY, 14).into_font();
            root.draw(&Text::new(b.label.as_str(), (8, y + 6), font.clone()))?;
            let v = format!("{:.2}x", b.value);
            root.draw(&Text::new(v, (x_of(b.value) + 5, y + 6), font))?;
        }
    }
    let bottom = 50 + ROW as i32 * bars.len() as i32;
    root.draw(&PathElement::new(
        vec![(x_of(1.0), 40), (x_of(1.0), bottom + 5)],
        BLACK.stroke_width(2),
    ))?;
    if text {
        root.draw(&Text::new(
            "1.0x",
            (x_of(1.0) - 12, bottom + 8),
            (FAMILY, 14).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}
