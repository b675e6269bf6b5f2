//! PNG plots with plotters' bitmap backend. Text is drawn with ab_glyph from a TrueType file
//! read at run time (Debian's fonts-dejavu-core by default), so no system font library is
//! linked.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;

/// Registers `font` as plotters' "sans-serif". The bytes live for the rest of the process.
pub fn register_font(font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("reading font {}", font.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", font.display()))?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Reads one percentile of a latency measurement.
type Percentile = fn(&crate::latency::Latency) -> f64;

/// Latency percentiles against the insert rate: the default install's doorbell, and
/// polling every 500 ms.
pub fn latency(report: &Report, path: &Path) -> Result<()> {
    if report.latency.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_rate = report
        .latency
        .iter()
        .map(|l| l.target_rows_per_second.max(l.achieved_rows_per_second))
        .fold(0.0, f64::max)
        * 1.1;
    let values = report.latency.iter().flat_map(|l| {
        [l.p50_ms, l.p99_ms, l.p999_ms]
            .into_iter()
            .chain(l.ack.as_ref().map(|a| a.p99_ms))
    });
    let max_ms = values.clone().fold(1.0, f64::max) * 1.5;
    let min_ms = values.fold(f64::MAX, f64::min).clamp(0.1, 1.0) / 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency: insert commit -> record read by a consumer, and -> acknowledged",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_rate, (min_ms..max_ms).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("insert rate (rows/s, achieved)")
        .y_desc("latency (ms, log scale)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .draw()
        .map_err(err)?;
    for (doorbell, base) in [(true, 0usize), (false, 3usize)] {
        let mut points: Vec<_> = report
            .latency
            .iter()
            .filter(|l| {
                l.load != "broker only"
                    && if doorbell {
                        l.is_default_install()
                    } else {
                        l.wakeup_or_legacy() == Some(crate::latency::Wakeup::Polling)
                    }
            })
            .collect();
        points.sort_by(|a, b| {
            a.target_rows_per_second
                .total_cmp(&b.target_rows_per_second)
        });
        if points.is_empty() {
            continue;
        }
        let series: [(&str, Percentile); 3] = [
            ("p50", |l| l.p50_ms),
            ("p99", |l| l.p99_ms),
            ("p99.9", |l| l.p999_ms),
        ];
        for (i, (name, get)) in series.iter().enumerate() {
            let color = Palette99::pick(base + i).to_rgba();
            let data: Vec<(f64, f64)> = points
                .iter()
                .map(|l| (l.achieved_rows_per_second, get(l).max(min_ms)))
                .collect();
            let label = format!(
                "{name} to the consumer, {}",
                if doorbell {
                    "doorbell"
                } else {
                    "polling 500 ms"
                }
            );
            let style = color.stroke_width(if doorbell { 3 } else { 2 });
            if doorbell {
                chart
                    .draw_series(LineSeries::new(data.clone(), style))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            } else {
                chart
                    .draw_series(DashedLineSeries::new(data.clone(), 8, 5, style))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            chart
                .draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
    }
    // Commit -> ack (bounded by the row's sent_at), the quantity the targets name.
    let mut acked: Vec<(f64, f64)> = report
        .latency
        .iter()
        .filter(|l| l.is_default_install())
        .filter_map(|l| {
            Some((
                l.achieved_rows_per_second,
                l.ack.as_ref()?.p99_ms.max(min_ms),
            ))
        })
        .collect();
    acked.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !acked.is_empty() {
        // Dark brown: apart from the palette's reds and oranges of the other series.
        let color = RGBColor(110, 50, 10);
        let style = color.stroke_width(3);
        chart
            .draw_series(LineSeries::new(acked.clone(), style))
            .map_err(err)?
            .label("p99 commit -> acked (row's sent_at), doorbell")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(acked.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(err)?;
    }
    // The floor: the relay's producer straight to the consumer, no relay, no database.
    if let Some(floor) = report.latency.iter().find(|l| l.load == "broker only") {
        let grey = RGBColor(110, 110, 110);
        let points = [
            (floor.achieved_rows_per_second, floor.p50_ms.max(min_ms)),
            (floor.achieved_rows_per_second, floor.p99_ms.max(min_ms)),
        ];
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 7, grey.filled())),
            )
            .map_err(err)?
            .label("broker only (p50, p99): producer -> consumer")
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, grey.filled()));
        if let Some(ack) = &floor.ack {
            let point = (floor.achieved_rows_per_second, ack.p99_ms.max(min_ms));
            chart
                .draw_series(std::iter::once(TriangleMarker::new(point, 7, RED.filled())))
                .map_err(err)?
                .label("broker only p99: produce -> ack")
                .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, RED.filled()));
        }
    }
    // The targets: 10 ms at 1k rows/s and 50 ms at half load.
    for (rate, ms) in report
        .latency
        .iter()
        .filter(|l| l.is_default_install() && (l.load == "1k" || l.load == "50%"))
        .map(|l| {
            (
                l.achieved_rows_per_second,
                if l.load == "1k" { 10.0 } else { 50.0 },
            )
        })
    {
        chart
            .draw_series(std::iter::once(Cross::new(
                (rate, ms),
                8,
                BLACK.stroke_width(2),
            )))
            .map_err(err)?;
    }
    chart
        .draw_series(std::iter::once(Cross::new((0.0, min_ms), 0, BLACK)))
        .map_err(err)?
        .label("x = p99 target")
        .legend(|(x, y)| Cross::new((x + 10, y), 6, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Drain rates as horizontal bars, with the ceilings as bars of their own.
pub fn throughput(report: &Report, path: &Path) -> Result<()> {
    let mut bars: Vec<(String, f64, RGBColor)> = Vec::new();
    for c in &report.ceilings {
        let name = match c.kind.as_str() {
            "database" => format!("DB ceiling {} {}", c.mode, crate::drain::human_rows(c.rows)),
            _ => format!("broker ceiling {}", crate::drain::human_rows(c.rows)),
        };
        let color = if c.kind == "database" {
            RGBColor(120, 120, 120)
        } else {
            RGBColor(200, 140, 40)
        };
        bars.push((name, c.rows_per_second, color));
    }
    for p in &report.peers {
        bars.push((p.label(), p.rows_per_second, RGBColor(190, 60, 60)));
    }
    for d in &report.debezium {
        bars.push((d.label(), d.rows_per_second, RGBColor(60, 150, 80)));
    }
    for d in &report.drains {
        bars.push((d.label(), d.rows_per_second, RGBColor(40, 100, 190)));
    }
    if bars.is_empty() {
        return Ok(());
    }
    let n = bars.len();
    let height = 140 + 34 * n as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    draw_bars(&root, &bars)?;
    root.present().map_err(err)?;
    Ok(())
}

fn draw_bars(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    bars: &[(String, f64, RGBColor)],
) -> Result<()> {
    let n = bars.len() as u32;
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Draining 1 KB rows: relay (blue), peer (red), Debezium (green), ceilings (grey: database, orange: broker)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(230)
        // Segments 0..=n-1, one per bar; the first bar is drawn at the top.
        .build_cartesian_2d(0f64..max, (0u32..n.saturating_sub(1)).into_segmented())
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("rows/s")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .y_labels(n as usize)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => (n - 1)
                .checked_sub(*i)
                .and_then(|i| labels.get(i as usize).cloned())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, color))| {
            let i = n - 1 - i as u32;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                format!(" {v:.0}"),
                (*v, SegmentValue::CenterOf(n - 1 - i as u32)),
                ("sans-serif", 13).into_font(),
            )
        }))
        .map_err(err)?;
    Ok(())
}
