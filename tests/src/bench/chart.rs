//! The report's chart: four panels of horizontal bars (TTFB, connections/s, throughput,
//! connect() latency), drawn with plotters' SVG backend. Each bar group carries its label above
//! it and each bar its value, so the long path names need no axis.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{coord::Shift, prelude::*};

use super::report::Results;

/// One panel: categories (top to bottom) and one or more series of values over them.
struct Panel {
    title: String,
    labels: Vec<String>,
    series: Vec<(&'static str, RGBColor, Vec<Option<f64>>)>,
}

const DARK: RGBColor = RGBColor(31, 119, 180);
const LIGHT: RGBColor = RGBColor(158, 202, 225);

pub fn write(path: &Path, results: &Results) -> Result<()> {
    let root = SVGBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, body) = root.split_vertically(40);
    top.draw(&Text::new(
        format!(
            "egress benchmark ({} mode, {}): shorter is better for times, longer for rates",
            results.mode, results.date
        ),
        (20, 12),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<String> = results.paths.iter().map(|p| p.label.clone()).collect();
    let ms = |f: fn(&super::measure::Summary) -> f64| {
        results
            .paths
            .iter()
            .map(|p| p.latency_us.as_ref().map(|s| f(s) / 1000.0))
            .collect::<Vec<_>>()
    };
    let mut panels = vec![
        Panel {
            title: "New HTTPS connection: time to first byte (ms)".into(),
            labels: labels.clone(),
            series: vec![("p50", DARK, ms(|s| s.p50)), ("p99", LIGHT, ms(|s| s.p99))],
        },
        Panel {
            title: "New HTTPS connections per second, 64 concurrent".into(),
            labels: labels.clone(),
            series: vec![(
                "conns/s",
                DARK,
                results.paths.iter().map(|p| p.conns_per_s).collect(),
            )],
        },
        Panel {
            title: "Bulk throughput (MiB/s)".into(),
            labels,
            series: vec![
                (
                    "1 tunnel",
                    DARK,
                    results.paths.iter().map(|p| p.bulk1_mib_s).collect(),
                ),
                (
                    "16 tunnels",
                    LIGHT,
                    results.paths.iter().map(|p| p.bulk16_mib_s).collect(),
                ),
            ],
        },
    ];
    if let Some(c) = &results.connect {
        let kinds = [c.plain_ns, c.bypass_ns, c.deny_ns];
        panels.push(Panel {
            title: "connect() latency (µs): in-kernel decisions".into(),
            labels: vec![
                "no eBPF attached".into(),
                "bypassed in the kernel".into(),
                "denied in the kernel (EPERM)".into(),
            ],
            series: vec![
                ("p50", DARK, kinds.iter().map(|s| Some(s.p50 / 1000.0)).collect()),
                ("p99", LIGHT, kinds.iter().map(|s| Some(s.p99 / 1000.0)).collect()),
            ],
        });
    }
    for (panel, area) in panels.iter().zip(body.split_evenly((2, 2)).iter()) {
        draw_panel(area, panel).map_err(|e| anyhow!("drawing {}: {e}", panel.title))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    panel: &Panel,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = panel.labels.len();
    let max = panel
        .series
        .iter()
        .flat_map(|(_, _, values)| values.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    // Room on the right for the value printed after the longest bar.
    let x_max = if max > 0.0 { max * 1.25 } else { 1.0 };
    // The legend is part of the caption: dark and light bars.
    let caption = match panel.series.as_slice() {
        [(a, _, _), (b, _, _)] => format!("{}: dark {a}, light {b}", panel.title),
        _ => panel.title.clone(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(15)
        .x_label_area_size(25)
        .y_label_area_size(5)
        .build_cartesian_2d(0f64..x_max, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .x_max_light_lines(1)
        .x_label_formatter(&|v| {
            if x_max > 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .label_style(("sans-serif", 11))
        .draw()?;
    let series_count = panel.series.len() as f64;
    // Band i (from the top) spans y in [n-1-i, n-i]: the label in its upper part, bars below.
    let bar_height = 0.58 / series_count;
    for (i, label) in panel.labels.iter().enumerate() {
        let band = (n - 1 - i) as f64;
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (x_max * 0.005, band + 0.95),
            ("sans-serif", 13).into_font(),
        )))?;
        for (s, (_, color, values)) in panel.series.iter().enumerate() {
            let Some(value) = values[i] else { continue };
            let y1 = band + 0.66 - s as f64 * bar_height;
            let y0 = y1 - bar_height * 0.9;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y0), (value, y1)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format_value(value),
                (value + x_max * 0.01, y1),
                ("sans-serif", 11).into_font(),
            )))?;
        }
    }
    Ok(())
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        measure::Summary,
        report::{ConnectResult, PathResult},
    };

    #[test]
    fn renders_every_panel() {
        let summary = |p50: f64| Summary {
            n: 100,
            p10: p50,
            p50,
            p90: p50,
            p99: p50 * 2.0,
            mean: p50,
        };
        let labels = [
            "direct (no proxy)",
            "application-level → squid",
            "egress → squid",
            "redsocks → squid",
            "application-level → fast proxy",
            "egress → fast proxy",
            "redsocks → fast proxy",
        ];
        let results = Results {
            mode: "test".into(),
            date: "today".into(),
            paths: labels
                .iter()
                .enumerate()
                .map(|(i, label)| PathResult {
                    label: label.to_string(),
                    latency_us: Some(summary(1000.0 + 300.0 * i as f64)),
                    conns_per_s: Some(3000.0 - 200.0 * i as f64),
                    bulk1_mib_s: Some(1200.0 - 100.0 * i as f64),
                    bulk16_mib_s: (i != 3).then_some(1500.0 - 100.0 * i as f64),
                    ..Default::default()
                })
                .collect(),
            connect: Some(ConnectResult {
                plain_ns: summary(30_000.0),
                bypass_ns: summary(30_500.0),
                deny_ns: summary(2_000.0),
                kernel: None,
            }),
            ..Default::default()
        };
        let path = std::env::temp_dir().join(format!("egress-bench-chart-{}.svg", std::process::id()));
        write(&path, &results).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("KEEP_CHART").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        for needle in [
            "<svg",
            "redsocks → fast proxy",
            "connect() latency",
            "16 tunnels",
            "1500",
        ] {
            assert!(svg.contains(needle), "{needle} missing");
        }
    }
}
