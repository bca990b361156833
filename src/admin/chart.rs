//! The status page's rate chart (inline SVG, drawn here) and the page's HTML helpers.

use serde_json::Value;

/// Colours of the clients' stacks, in order (repeated past the eighth client).
const PALETTE: [&str; 8] = [
    "#3b6fd8", "#e07b39", "#2f9e6e", "#b5477e", "#8a6ad1", "#c9a227", "#4aa3b8", "#7b7f86",
];

/// One upstream's chart: calls per 10 s over the last 10 minutes, stacked by client, with
/// the rate budget per 10 s as a dashed line. Inline SVG drawn here, so the page needs
/// no script and fetches nothing.
pub(super) fn rate_chart(u: &Value) -> String {
    let (w, h, left, bottom) = (600.0_f64, 140.0_f64, 34.0_f64, 16.0_f64);
    let empty = Vec::new();
    let series: Vec<(&str, Vec<f64>)> = u["calls_per_10s"]["clients"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| {
            let counts = c["counts"].as_array().unwrap_or(&empty);
            (
                c["client"].as_str().unwrap_or(""),
                counts.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
            )
        })
        .collect();
    let buckets = series.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let budget = u["calls_per_10s"]["budget_per_bucket"].as_f64();
    let tallest = (0..buckets)
        .map(|i| {
            series
                .iter()
                .map(|(_, c)| c.get(i).copied().unwrap_or(0.0))
                .sum::<f64>()
        })
        .fold(budget.unwrap_or(0.0), f64::max)
        .max(1.0)
        * 1.1;
    let plot_h = h - bottom;
    let y = |v: f64| plot_h - v / tallest * (plot_h - 4.0);
    let bar = if buckets == 0 {
        0.0
    } else {
        (w - left) / buckets as f64
    };
    let mut svg = String::new();
    for i in 0..buckets {
        let mut base = 0.0;
        for (k, (client, counts)) in series.iter().enumerate() {
            let v = counts.get(i).copied().unwrap_or(0.0);
            if v > 0.0 {
                svg.push_str(&format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} calls</title></rect>",
                    left + i as f64 * bar,
                    y(base + v),
                    (bar - 1.0).max(1.0),
                    y(base) - y(base + v),
                    PALETTE[k % PALETTE.len()],
                    esc(client),
                    v
                ));
            }
            base += v;
        }
    }
    if let Some(b) = budget {
        svg.push_str(&format!(
            "<line class=\"budget\" x1=\"{left}\" x2=\"{w}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#c92a2a\" stroke-dasharray=\"5 3\"/><text x=\"{1}\" y=\"{2:.1}\" fill=\"#c92a2a\" font-size=\"10\" text-anchor=\"end\">budget {3:.0}</text>",
            y(b),
            w - 2.0,
            y(b) - 3.0,
            b
        ));
    }
    let legend: String = series
        .iter()
        .enumerate()
        .map(|(k, (client, _))| {
            format!(
                "<span><i style=\"background:{}\"></i>{}</span>",
                PALETTE[k % PALETTE.len()],
                esc(client)
            )
        })
        .collect();
    let name = esc(&text(&u["name"]));
    let budget_text = match u["rate_budget"].as_object() {
        Some(b) => format!(
            "{} of {} calls left in this {} s window, {} waiting",
            text(&b["remaining"]),
            text(&b["allowed"]),
            text(&b["window_secs"]),
            text(&b["waiting"])
        ),
        None => "no budget known yet (the platform has not said, and no rate_limit is set)".into(),
    };
    format!(
        "<figure class=\"chart\" id=\"chart-{name}\"><figcaption>{name} <small>— {budget_text}</small></figcaption>\
         <svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"calls per 10 seconds to {name}, by client\">\
         <line x1=\"{left}\" x2=\"{w}\" y1=\"{plot_h}\" y2=\"{plot_h}\" stroke=\"#adb5bd\"/>\
         <text x=\"{tx}\" y=\"10\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6472\">{top:.0}</text>\
         <text x=\"{tx}\" y=\"{plot_h}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6472\">0</text>\
         <text x=\"{left}\" y=\"{h}\" font-size=\"10\" fill=\"#5b6472\">10 min ago</text>\
         <text x=\"{w}\" y=\"{h}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b6472\">now</text>{svg}</svg>\
         <div class=\"legend\">{legend}</div></figure>\n",
        tx = left - 4.0,
        top = tallest / 1.1,
    )
}

/// Escape text for HTML element content and attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}
