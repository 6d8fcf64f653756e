//! PNG charts of the results (plotters, bitmap backend; text through ab_glyph with
//! DejaVu Sans from Debian's fonts-dejavu-core, so no fontconfig is needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::report::{CEILING, CLEAN1, CLEAN8, Kind, LOSSY, RR, Results, STREAMS};

pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut err = None;
    ONCE.call_once(|| match std::fs::read(FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
                err = Some(anyhow!("{FONT} is not a font plotters can read"));
            }
        }
        Err(e) => err = Some(anyhow!("reading {FONT} (package fonts-dejavu-core): {e}")),
    });
    err.map_or(Ok(()), Err)
}

/// One bar of a chart: label, value, colour.
type Bar = (String, f64, RGBColor);

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Ceiling => RGBColor(90, 160, 90),
        Kind::Paqet => RGBColor(40, 90, 180),
        Kind::Kcptun { .. } => RGBColor(225, 130, 40),
        Kind::Tcp => RGBColor(120, 120, 120),
        Kind::Forwarders => RGBColor(170, 170, 170),
    }
}

/// One horizontal bar per item, with its value written at the end of the bar.
pub fn hbar(path: &Path, title: &str, unit: &str, items: &[Bar]) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    register_font()?;
    let n = items.len();
    let height = 70 + 26 * n as u32;
    let root = BitMapBackend::new(path, (860, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let max = items.iter().map(|i| i.1).fold(0.0f64, f64::max).max(1e-9) * 1.18;
    let labels: Vec<String> = items.iter().map(|i| i.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(250)
        .build_cartesian_2d(0f64..max, (0..n).into_segmented())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(n)
        .label_style(("sans-serif", 13))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => labels[n - 1 - *i].clone(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v, c))| {
            let y = n - 1 - i;
            let mut r = Rectangle::new(
                [(0.0, SegmentValue::Exact(y)), (*v, SegmentValue::Exact(y + 1))],
                c.filled(),
            );
            r.set_margin(3, 3, 0, 0);
            r
        }))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v, _))| {
            let y = n - 1 - i;
            let text = if *v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            };
            Text::new(
                text,
                (*v + max * 0.005, SegmentValue::CenterOf(y)),
                ("sans-serif", 12).into_font(),
            )
        }))
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Draws every chart into `dir`; returns the file names written.
pub fn draw_all(results: &Results, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let pick = |test: &str, f: &dyn Fn(&super::report::Row) -> Option<f64>| -> Vec<Bar> {
        results
            .rows
            .iter()
            .filter(|r| r.test == test)
            .filter_map(|r| f(r).map(|v| (r.system.clone(), v, color(r.kind))))
            .collect()
    };
    let mut clean: Vec<_> = pick(CEILING, &|r| Some(r.value));
    clean.extend(pick(CLEAN1, &|r| Some(r.value)));
    let charts: Vec<(&str, &str, &str, Vec<Bar>)> = vec![
        (
            "clean-1.png",
            "Clean link, one stream (ceilings: frame bytes)",
            "MB/s",
            clean,
        ),
        (
            "clean-8.png",
            "Clean link, 8 streams at once",
            "MB/s",
            pick(CLEAN8, &|r| Some(r.value)),
        ),
        (
            "lossy.png",
            "40 ms RTT, 1 % loss each way, one stream",
            "MB/s",
            pick(LOSSY, &|r| Some(r.value)),
        ),
        (
            "rr-p50.png",
            "64-byte request/response, p50",
            "µs",
            pick(RR, &|r| Some(r.value)),
        ),
        (
            "rr-p99.png",
            "64-byte request/response, p99",
            "µs",
            pick(RR, &|r| Some(r.value2)),
        ),
        (
            "cpu-clean-1.png",
            "CPU seconds per GiB, relay processes, clean link, one stream",
            "CPU s / GiB",
            pick(CLEAN1, &|r| r.cpu_per_gib),
        ),
        (
            "streams.png",
            "1,000 concurrent streams × 1 MiB (wall time)",
            "s",
            pick(STREAMS, &|r| Some(r.value)),
        ),
    ];
    for (file, title, unit, items) in charts {
        if items.is_empty() {
            continue;
        }
        hbar(&dir.join(file), title, unit, &items)?;
        written.push(file.to_string());
    }
    Ok(written)
}
