//! Line charts over time as plain SVG, for every scenario that has a time series.
//!
//! The layout keeps apart what readers look for: the title on the first line, the
//! legend on its own line below it, then the plot, whose left axis (a rate) and right
//! axis (milliseconds) each carry ticks with their unit, and whose time axis carries
//! ticks in seconds. Events (a restart) are dashed vertical lines with a label.

use std::fmt::Write as _;

/// Which axis a series is read against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Left,
    Right,
}

pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub axis: Axis,
    /// One value per second.
    pub values: Vec<f64>,
}

/// A moment to mark, in seconds from the start.
pub struct Mark {
    pub at: f64,
    pub label: String,
}

pub struct Chart<'a> {
    pub title: &'a str,
    /// The left axis's unit, e.g. `requests/s`.
    pub left_unit: &'a str,
    /// The right axis's unit, e.g. `ms`.
    pub right_unit: &'a str,
    pub series: Vec<Series>,
    pub marks: Vec<Mark>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 50.0;
const TICKS: f64 = 5.0;

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about [`TICKS`] ticks up
/// to `max`.
fn step(max: f64) -> f64 {
    step_for(max, TICKS)
}

fn step_for(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual <= 1.0 {
        1.0
    } else if residual <= 2.0 {
        2.0
    } else if residual <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A tick label: as many decimals as the step needs, thousands as `k`.
fn label(value: f64, step: f64) -> String {
    if step >= 1000.0 && value != 0.0 {
        let k = value / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else if step >= 1.0 {
        format!("{value:.0}")
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let seconds = self
            .series
            .iter()
            .map(|s| s.values.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let bottom = TOP + plot_h;
        let span = (seconds - 1) as f64;
        let x = |t: f64| LEFT + plot_w * t / span;
        let axis_max = |axis: Axis| {
            let max = self
                .series
                .iter()
                .filter(|s| s.axis == axis)
                .flat_map(|s| s.values.iter().copied())
                .fold(0.0f64, f64::max);
            let step = step(if max > 0.0 { max } else { 1.0 });
            (step * (max / step).ceil().max(1.0), step)
        };
        let (left_max, left_step) = axis_max(Axis::Left);
        let (right_max, right_step) = axis_max(Axis::Right);
        let y = |value: f64, max: f64| TOP + plot_h * (1.0 - value / max);

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"##,
            escape(self.title)
        );
        // The legend, on its own line under the title.
        let mut lx = LEFT;
        for series in &self.series {
            let side = match series.axis {
                Axis::Left => self.left_unit,
                Axis::Right => self.right_unit,
            };
            let text = format!("{} ({side})", series.label);
            let _ = writeln!(
                svg,
                r##"<line x1="{lx}" y1="41" x2="{}" y2="41" stroke="{}" stroke-width="3"/><text x="{}" y="45">{}</text>"##,
                lx + 18.0,
                series.color,
                lx + 23.0,
                escape(&text)
            );
            lx += 23.0 + 7.0 * text.len() as f64 + 18.0;
        }
        // Grid and ticks: the left axis's values also draw the grid lines.
        let mut value = 0.0;
        while value <= left_max + left_step / 2.0 {
            let ty = y(value, left_max);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#eee"/><line x1="{:.1}" y1="{ty:.1}" x2="{LEFT}" y2="{ty:.1}" stroke="#999"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 5.0,
                LEFT - 8.0,
                ty + 4.0,
                label(value, left_step)
            );
            value += left_step;
        }
        let mut value = 0.0;
        while value <= right_max + right_step / 2.0 {
            let ty = y(value, right_max);
            let _ = writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#999"/><text x="{:.1}" y="{:.1}">{}</text>"##,
                LEFT + plot_w,
                LEFT + plot_w + 5.0,
                LEFT + plot_w + 8.0,
                ty + 4.0,
                label(value, right_step)
            );
            value += right_step;
        }
        // Time is read more finely than values: twice the ticks.
        let time_step = step_for(span, 2.0 * TICKS).max(1.0);
        let mut t = 0.0;
        while t <= span + 1e-9 {
            let tx = x(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" y1="{bottom}" x2="{tx:.1}" y2="{:.1}" stroke="#999"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"##,
                bottom + 5.0,
                bottom + 18.0
            );
            t += time_step;
        }
        // Axes and their titles.
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#666"/>
<line x1="{LEFT}" y1="{bottom}" x2="{r:.1}" y2="{bottom}" stroke="#666"/>
<line x1="{r:.1}" y1="{TOP}" x2="{r:.1}" y2="{bottom}" stroke="#666"/>
<text x="{mid:.1}" y="{tt:.1}" text-anchor="middle">time (s)</text>
<text transform="translate(16 {my:.1}) rotate(-90)" text-anchor="middle">{lu}</text>
<text transform="translate({ru:.1} {my:.1}) rotate(90)" text-anchor="middle">{rn}</text>"##,
            r = LEFT + plot_w,
            mid = LEFT + plot_w / 2.0,
            tt = HEIGHT - 8.0,
            my = TOP + plot_h / 2.0,
            lu = escape(self.left_unit),
            ru = WIDTH - 14.0,
            rn = escape(self.right_unit),
        );
        for (i, mark) in self.marks.iter().enumerate() {
            let mx = x(mark.at.clamp(0.0, span));
            // Labels of nearby marks step down so they do not overwrite each other.
            let ly = TOP + 12.0 + 13.0 * (i % 3) as f64;
            let _ = writeln!(
                svg,
                r##"<line x1="{mx:.1}" y1="{TOP}" x2="{mx:.1}" y2="{bottom}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" font-size="11" fill="#333">{}</text>"##,
                mx + 3.0,
                ly,
                escape(&mark.label)
            );
        }
        for series in &self.series {
            let max = match series.axis {
                Axis::Left => left_max,
                Axis::Right => right_max,
            };
            let points: Vec<String> = series
                .values
                .iter()
                .enumerate()
                .map(|(t, v)| format!("{:.1},{:.1}", x(t as f64), y(*v, max)))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"##,
                series.color,
                points.join(" ")
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// `chart --result FILE.json`: draws FILE.svg again from a committed `rest`, `diurnal`
/// or `rollout` result, with this module's layout, without running the scenario.
pub fn redraw(flags: &crate::Flags) -> anyhow::Result<()> {
    let path = std::path::PathBuf::from(flags.text("result", ""));
    let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let (series, title) = if result["scenario"] == "rollout" {
        (&result["rest"], crate::rollout::TITLE.to_owned())
    } else {
        (&result, result["title"].as_str().unwrap_or("").to_owned())
    };
    let marks = result["marks"]
        .as_array()
        .map(|marks| {
            marks
                .iter()
                .map(|m| Mark {
                    at: m["at"].as_f64().unwrap_or(0.0),
                    label: m["label"].as_str().unwrap_or("").to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    let svg = crate::open_loop::svg(series, &title, marks);
    let out = path.with_extension("svg");
    std::fs::write(&out, svg)?;
    eprintln!("written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_labelled_with_their_unit() {
        assert_eq!(step(100.0), 20.0);
        assert_eq!(step(4_300.0), 1_000.0);
        assert_eq!(step(0.9), 0.2);
        assert_eq!(label(2_000.0, 1_000.0), "2k");
        assert_eq!(label(0.4, 0.2), "0.4");
        let chart = Chart {
            title: "a <title>",
            left_unit: "requests/s",
            right_unit: "ms",
            series: vec![
                Series {
                    label: "ok".into(),
                    color: "#1f77b4",
                    axis: Axis::Left,
                    values: vec![0.0, 950.0, 1_000.0],
                },
                Series {
                    label: "p99".into(),
                    color: "#ff7f0e",
                    axis: Axis::Right,
                    values: vec![1.0, 2.5, 3.0],
                },
            ],
            marks: vec![Mark {
                at: 1.0,
                label: "restart".into(),
            }],
        }
        .render();
        assert!(chart.contains("a &lt;title&gt;"));
        assert!(chart.contains(">ok (requests/s)<") && chart.contains(">p99 (ms)<"));
        assert!(chart.contains(">1000<") && chart.contains(">3<"));
        assert!(chart.contains("stroke-dasharray") && chart.contains(">restart<"));
        assert!(chart.contains(">time (s)<"));
    }
}
